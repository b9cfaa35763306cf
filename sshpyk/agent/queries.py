"""AgentQueries: the agent's requests about the host, not about this process's kernels
(a kernelspec, every sshpyk kernel of the user, kills, a launcher's probe, a connection
file), on top of :meth:`RemoteAgent.request <sshpyk.agent.client.RemoteAgent.request>`."""

from __future__ import annotations

from typing import Any

from .remote.protocol import Op

__all__ = ["DEFAULT_REQUEST_TIMEOUT", "AgentQueries"]

#: seconds an agent request may take before it fails (a silent remote never hangs us)
DEFAULT_REQUEST_TIMEOUT = 30.0


class AgentQueries:
    """Requests answered by the agent from what it finds on the host."""

    async def request(
        self, op: str, *, timeout: float = DEFAULT_REQUEST_TIMEOUT, **fields: Any
    ) -> dict[str, Any]:
        raise NotImplementedError  # RemoteAgent's

    async def inspect(self, kernel_name: str) -> dict[str, Any]:
        """The remote kernelspec ``kernel_name`` (argv, display_name, language, ...)."""
        event = await self.request(Op.INSPECT, kernel_name=kernel_name)
        return dict(event.get("kernelspec") or {})

    async def ps(
        self,
        run_root: str | None = None,
        *,
        all_users: bool = False,
        usage: bool = False,
        timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ) -> list[dict[str, Any]]:
        """Every sshpyk kernel of this user on the host (any agent, any local process).

        Each entry: kernel_id, kernel_name, pid, alive, started (epoch), agent_pid,
        agent_alive, attached (a local side was heard within its grace), last_contact
        (epoch or None), persistent, transport, run_dir, launcher, client. Batch kernels
        also have job_id, job_name, node, host and, once their launcher is loaded (its
        ``prepare``), ``<launcher>_state`` and ``<launcher>_reason`` from the scheduler.
        ``usage``: also cpu_percent, cpu_window_s, rss_bytes and gpu (see the agent's
        usage.py; the answer may then take a second longer).
        """
        event = await self.request(
            Op.PS, run_root=run_root, all_users=all_users, usage=usage, timeout=timeout
        )
        return list(event.get("kernels") or [])

    async def kill(
        self,
        kernel_id: str | None = None,
        *,
        orphans: bool = False,
        run_root: str | None = None,
        all_users: bool = False,
        timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ) -> list[dict[str, Any]]:
        """Kill one kernel (by id or unique id prefix) or every orphan; remove run dirs.
        Once a batch launcher is loaded (its ``prepare``) the jobs of its kernels are
        cancelled too.

        Only this remote user's kernels are touched; ``all_users`` (the remote user must
        be root) widens that to every user's. Each returned entry has ``killed`` (bool)
        and ``error`` (None, or why the kill or the removal failed)."""
        if not kernel_id and not orphans:
            raise ValueError("kill() needs a kernel_id or orphans=True")
        event = await self.request(
            Op.KILL,
            kernel_id=kernel_id,
            orphans=orphans,
            run_root=run_root,
            all_users=all_users,
            timeout=timeout,
        )
        return list(event.get("kernels") or [])

    async def probe(self, launcher: str, args: list[str] | None = None) -> dict[str, Any]:
        """Whether ``launcher`` (loaded: its ``prepare``) can run kernels here, as the
        agent sees it (a scheduler's version, its commands, its queues); with ``args``,
        also whether the scheduler takes them as job arguments (a SchedulerArgsError
        if not). What it found, a JSON-able dict."""
        event = await self.request(Op.PROBE, launcher=launcher, args=args)
        return {k: v for k, v in event.items() if k not in ("v", "event", "rid")}

    async def discover(
        self, roots: list[str] | None = None, *, search_only: bool = False, timeout: float = 30.0
    ) -> dict[str, Any]:
        """The host's Pythons that have jupyter_client and the kernelspecs each offers
        (``agent/remote/discover.py``): the common env roots and ``roots`` (only those if
        ``search_only``), all asked within ``timeout`` seconds on the host (what did not
        answer by then is left out, with a warning). Keys: pythons, skipped, warnings,
        elapsed."""
        event = await self.request(
            Op.DISCOVER,
            roots=list(roots or []),
            search_only=search_only,
            limit=timeout,
            timeout=timeout + 15.0,  # the remote's deadline, then its kill of the late ones
        )
        return {k: v for k, v in event.items() if k not in ("v", "event", "rid")}

    async def connection_info(self, kid: str) -> dict[str, Any]:
        """The remote connection file of a kernel of this agent (includes the key)."""
        event = await self.request(Op.CONNECTION_INFO, kid=kid)
        return dict(event.get("info") or {})

"""The kernels sshpyk started on remote hosts: list them (``sshpyk ps``), stop them
(``sshpyk kill``).

The remote agent finds them by their run directories (``sshpyk-*`` under the run
roots: ``$XDG_RUNTIME_DIR``, the temp dir, and any ``remote_run_root`` of an installed
kernelspec for that host) and tells whether the local side that owns each one is still
heard from (``attached``). Killing a kernel kills its process group and removes its run
directory; a kill that failed says why. Only the remote user's own kernels are
touched unless ``all_users`` (the remote user must be root). Every exchange with a host
is bounded by a timeout, hanging up included. SLURM kernels (launcher ``slurm``) also
show their job id, node and job state (from squeue); killing one also scancels its job.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..agent.client import RemoteAgent
from ..errors import RequestTimeoutError, SSHPykError
from ..kernels.session import SSHSession
from ..kernelspec import SSHKernelSpec
from ..ssh.hosts import config_path

__all__ = [
    "HostKernels",
    "HostTarget",
    "age",
    "host_targets",
    "kill_failed",
    "kill_kernels",
    "kill_orphans",
    "ps_hosts",
    "ps_table",
]


@dataclass
class HostTarget:
    """A host to inspect, and how to run the agent there."""

    alias: str
    ssh_config: str | None = None
    python: str = "python3"
    pre_command: str | None = None
    #: extra run roots to scan besides the defaults (None = the defaults only)
    run_roots: list[str | None] = field(default_factory=lambda: [None])
    #: a kernelspec of this host uses the SLURM launcher: ask squeue about jobs
    slurm: bool = False


@dataclass
class HostKernels:
    """The answer for one host: its kernels, or why it could not be asked."""

    alias: str
    kernels: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"alias": self.alias, "kernels": self.kernels, "error": self.error}


def host_targets(
    aliases: Iterable[str],
    specs: Iterable[SSHKernelSpec],
    *,
    ssh_config: str | None = None,
    python: str | None = None,
    run_root: str | None = None,
) -> list[HostTarget]:
    """One target per host: the named aliases, or else every host of ``specs``.

    A host's installed kernelspecs supply its ssh config, remote python, pre-command
    and run roots unless given here.
    """
    specs = list(specs)
    config = config_path(ssh_config) if ssh_config else None
    wanted = list(dict.fromkeys(aliases))
    if not wanted:
        wanted = list(dict.fromkeys(s.ssh_host_alias for s in specs))
    targets: list[HostTarget] = []
    for alias in wanted:
        mine = [s for s in specs if s.ssh_host_alias == alias]
        if config:
            mine = [s for s in mine if _same_config(s.ssh_config, config)]
        by_config: dict[str | None, list[SSHKernelSpec]] = {}
        for spec in mine:
            by_config.setdefault(config or _config_or_none(spec.ssh_config), []).append(spec)
        if not by_config:
            by_config[config] = []
        for host_config, host_specs in by_config.items():
            first = host_specs[0] if host_specs else None
            roots: list[str | None] = [run_root] if run_root else []
            if not run_root:
                roots += [s.remote_run_root for s in host_specs if s.remote_run_root]
                roots.append(None)
            targets.append(
                HostTarget(
                    alias=alias,
                    ssh_config=host_config,
                    python=python or (first.remote_python if first else "python3"),
                    pre_command=first.pre_command if first and not python else None,
                    run_roots=list(dict.fromkeys(roots)),
                    slurm=any(s.launcher == "slurm" for s in host_specs),
                )
            )
    return targets


def _config_or_none(path: str | None) -> str | None:
    try:
        return config_path(path) if path else None
    except SSHPykError:
        return path


def _same_config(a: str | None, b: str | None) -> bool:
    return _config_or_none(a) == _config_or_none(b)


#: What closing a host's connection may take beyond the caller's timeout when the host
#: stopped answering (it is cut off then).
CLOSE_GRACE = 0.5

T = TypeVar("T")


async def _on_host(
    target: HostTarget, timeout: float, work: Callable[[RemoteAgent], Awaitable[T]]
) -> T:
    """Connect, start the agent and run ``work`` on it, all within ``timeout`` seconds;
    the connection is then closed with what is left (at least CLOSE_GRACE seconds).

    A host that stops answering raises RequestTimeoutError (one line) instead of hanging.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    session: SSHSession | None = None

    async def body() -> T:
        nonlocal session
        session = await SSHSession.connect(
            target.alias, ssh_config=target.ssh_config, connect_timeout=timeout
        )
        agent = await session.agent(target.python, target.pre_command)
        return await work(agent)

    try:
        return await asyncio.wait_for(body(), timeout)
    except asyncio.TimeoutError:
        raise RequestTimeoutError(f"no answer from {target.alias!r} within {timeout:g}s") from None
    finally:
        if session is not None:
            await session.aclose(timeout=max(CLOSE_GRACE, deadline - loop.time()))


async def _ps(
    agent: RemoteAgent, target: HostTarget, all_users: bool = False
) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    slurm = target.slurm
    for root in target.run_roots:
        kernels = await agent.ps(run_root=root, slurm=slurm, all_users=all_users)
        if not slurm and any(k.get("launcher") == "slurm" for k in kernels):
            slurm = True  # SLURM kernels without a SLURM kernelspec here: ask again
            kernels = await agent.ps(run_root=root, slurm=True, all_users=all_users)
        for kernel in kernels:
            seen.setdefault(str(kernel.get("run_dir")), kernel)
    return sorted(seen.values(), key=lambda k: (k.get("started") or 0, str(k.get("kernel_id"))))


async def _ps_host(target: HostTarget, timeout: float, all_users: bool) -> HostKernels:
    result = HostKernels(target.alias)
    try:
        result.kernels = await _on_host(target, timeout, lambda a: _ps(a, target, all_users))
    except SSHPykError as exc:
        result.error = str(exc)
    return result


async def ps_hosts(
    targets: Iterable[HostTarget], *, timeout: float = 30.0, all_users: bool = False
) -> list[HostKernels]:
    """Every host's sshpyk kernels, hosts asked concurrently; errors are per host.

    Each host answers within ``timeout`` seconds (plus CLOSE_GRACE to hang up) or
    gets an error. ``all_users`` (the remote user must be root) lists every user's
    kernels, not only the remote user's own."""
    return list(await asyncio.gather(*(_ps_host(t, timeout, all_users) for t in targets)))


async def kill_kernels(
    target: HostTarget,
    kernel_ids: Iterable[str],
    *,
    all_users: bool = False,
    timeout: float = 30.0,
) -> list[dict[str, Any]]:
    """Kill kernels by id or unique id prefix; returns one entry per kernel tried, with
    ``error`` set (a one-line reason) for those that could not be killed or removed.

    Every id is resolved before any kernel is killed: an unknown or ambiguous one
    raises SSHPykError and nothing is killed. The whole exchange takes at most
    ``timeout`` seconds (RequestTimeoutError otherwise).
    """
    wanted = list(kernel_ids)

    async def work(agent: RemoteAgent) -> list[dict[str, Any]]:
        kernels = await _ps(agent, target, all_users)
        chosen: dict[str, dict[str, Any]] = {}
        for kernel_id in wanted:
            matches = {
                str(k["kernel_id"]): k for k in kernels if str(k["kernel_id"]).startswith(kernel_id)
            }
            if not matches:
                raise SSHPykError(
                    f"no sshpyk kernel {kernel_id!r} on {target.alias!r} "
                    f"(see `sshpyk ps {target.alias}`)"
                )
            if len(matches) > 1:
                raise SSHPykError(
                    f"{kernel_id!r} matches {len(matches)} kernels on {target.alias!r}: "
                    f"{', '.join(sorted(matches))}; give more of the id"
                )
            chosen.update(matches)
        killed = []
        for full_id, kernel in chosen.items():
            root = os.path.dirname(str(kernel["run_dir"]))
            slurm = kernel.get("launcher") == "slurm"
            killed += await agent.kill(
                full_id, run_root=root, slurm=slurm, all_users=all_users, timeout=timeout
            )
        return killed

    return await _on_host(target, timeout, work)


async def kill_orphans(
    target: HostTarget, *, all_users: bool = False, timeout: float = 30.0
) -> list[dict[str, Any]]:
    """Kill every kernel whose local owner is gone; returns one entry per kernel tried
    (``error`` set for failures). Bounded by ``timeout`` like :func:`kill_kernels`."""

    async def work(agent: RemoteAgent) -> list[dict[str, Any]]:
        killed: dict[str, dict[str, Any]] = {}
        slurm = target.slurm or any(
            k.get("launcher") == "slurm" for k in await _ps(agent, target, all_users)
        )
        for root in target.run_roots:
            for kernel in await agent.kill(
                orphans=True, run_root=root, slurm=slurm, all_users=all_users, timeout=timeout
            ):
                killed.setdefault(str(kernel.get("run_dir")), kernel)
        return list(killed.values())

    return await _on_host(target, timeout, work)


def kill_failed(entry: dict[str, Any]) -> str | None:
    """Why the kill of this ``kill`` answer entry failed, or None if it was killed.

    An entry with ``error`` set failed (the kernel or its run dir is still there);
    any other entry was killed (agents before the ``killed``/``error`` fields only
    listed what they killed)."""
    error = entry.get("error")
    if error:
        return " ".join(str(error).split())
    return None


def age(epoch: float | None, now: float | None = None) -> str:
    """``12s ago``, ``5m ago``, ``3h ago``, ``2d ago`` (``-`` for None)."""
    if not epoch:
        return "-"
    seconds = max(0.0, (now or time.time()) - float(epoch))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def ps_table(hosts: Iterable[HostKernels]) -> list[list[str]]:
    """Rows (header first) for the kernels of ``hosts``; with SLURM kernels among them,
    three more columns: JOB ID, NODE, JOB STATE (with the reason while pending)."""
    hosts = list(hosts)
    rows = [["HOST", "KERNEL ID", "NAME", "PID", "STARTED", "LAST CONTACT", "LOCAL OWNER", "STATE"]]
    slurm = any(k.get("launcher") == "slurm" for h in hosts for k in h.kernels)
    if slurm:
        rows[0] += ["JOB ID", "NODE", "JOB STATE"]
    now = time.time()
    for host in hosts:
        for k in host.kernels:
            started = k.get("started")
            owner = "alive" if k.get("attached") else "gone"
            if k.get("persistent"):
                owner += " (persistent)"
            rows.append(
                [
                    host.alias,
                    str(k.get("kernel_id")),
                    str(k.get("kernel_name")),
                    str(k.get("pid")),
                    time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "-",
                    age(k.get("last_contact"), now),
                    owner,
                    "running" if k.get("alive") else "dead",
                ]
            )
            if slurm:
                rows[-1] += _slurm_cells(k)
    return rows


def _slurm_cells(kernel: dict[str, Any]) -> list[str]:
    if kernel.get("launcher") != "slurm":
        return ["-", "-", "-"]
    state = str(kernel.get("slurm_state") or "?")
    if kernel.get("slurm_reason") and state != "RUNNING":
        state += f" ({kernel['slurm_reason']})"
    return [str(kernel.get("job_id") or "-"), str(kernel.get("node") or "-"), state]

"""SSHSession: the public session, an SSH connection handle plus agents and kernels.

Every kernel started in a process on the same host shares one SSH connection
(:mod:`sshpyk.ssh.pool`): the remote agents, the forwards per kernel and keepalives
all ride on it as channels. The agents of a connection are kept in its ``services``
slot and shut down (persistent kernels stay) when the connection closes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .kernel import KernelOptions, RemoteKernel
from .remote import RemoteAgent
from .ssh import session as ssh_session
from .ssh.pool import SharedConnection

__all__ = ["SSHSession"]


class _Agents:
    """The remote agents running over one shared connection, one per settings key."""

    def __init__(self) -> None:
        self.agents: dict[Any, RemoteAgent] = {}
        self._locks: dict[Any, asyncio.Lock] = {}

    @classmethod
    def of(cls, shared: SharedConnection) -> _Agents:
        agents = shared.services.get(cls)
        if not isinstance(agents, cls):
            agents = shared.services[cls] = cls()
            shared.on_close(agents.close)
        return agents

    async def get(self, key: Any, start: Any) -> RemoteAgent:
        """The live agent for ``key``, else the one ``await start()`` returns."""
        async with self._locks.setdefault(key, asyncio.Lock()):
            agent = self.agents.get(key)
            if agent is None or not agent.alive:
                agent = self.agents[key] = await start()
            return agent

    async def close(self, timeout: float) -> None:
        """Shut the agents down; persistent kernels outlive the connection (only an
        explicit shutdown stops them). An agent's close waits at most three times its
        timeout."""
        agents, self.agents = list(self.agents.values()), {}
        await asyncio.gather(
            *(a.close(timeout / 3, keep_persistent=True) for a in agents),
            return_exceptions=True,
        )


class SSHSession(ssh_session.Session):
    """A handle on the shared SSH connection to one host, with its agents and kernels.

    Use ``async with await SSHSession.connect("alias") as session: ...``.
    """

    async def agent(
        self,
        python: str = "python3",
        pre_command: str | None = None,
        *,
        grace: float = 60.0,
        run_root: str | None = None,
    ) -> RemoteAgent:
        """The remote agent for ``python`` (started on first use, then shared)."""
        await self.connection()

        async def start() -> RemoteAgent:
            agent = RemoteAgent(self, python, pre_command, grace=grace, run_root=run_root)
            await agent.start()
            return agent

        return await _Agents.of(self.shared).get((python, pre_command, grace, run_root), start)

    async def attach_agent(
        self,
        socket_path: str,
        python: str = "python3",
        pre_command: str | None = None,
        *,
        grace: float = 60.0,
    ) -> RemoteAgent:
        """Join an agent that already runs on the host (see :meth:`RemoteKernel.attach`)."""
        await self.connection()

        async def start() -> RemoteAgent:
            return await RemoteAgent.attach(self, socket_path, python, pre_command, grace=grace)

        return await _Agents.of(self.shared).get(("attached", socket_path), start)

    async def inspect(
        self, python: str = "python3", kernel_name: str = "python3", pre_command: str | None = None
    ) -> dict[str, Any]:
        """Facts about the remote Python and one of its kernelspecs."""
        agent = await self.agent(python, pre_command)
        spec = await agent.inspect(kernel_name)
        info = {k: agent.info.get(k) for k in ("python", "python_version", "jupyter_client")}
        return {**info, "kernelspec": spec}

    async def start_kernel(
        self, kernel_name: str = "python3", options: KernelOptions | None = None, **kw: Any
    ) -> RemoteKernel:
        """Start a remote kernel with its forwards; see :class:`sshpyk.RemoteKernel`."""
        options = options or KernelOptions(kernel_name=kernel_name, **kw)
        kernel = RemoteKernel(self, options)
        try:
            await kernel.start()
        except BaseException:
            await asyncio.shield(kernel.close())
            raise
        return kernel

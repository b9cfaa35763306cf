"""SSHSession: the public session, an SSH connection handle plus agents and kernels.

Every kernel started in a process on the same host shares one SSH connection
(:mod:`sshpyk.ssh.pool`): the remote agents, the forwards per kernel and keepalives
all ride on it as channels. The agents of a connection are kept in its ``services``
slot (:class:`~sshpyk.agent.registry.AgentRegistry`) and shut down (persistent kernels
stay) when the connection closes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..agent.client import LaunchRequest, RemoteAgent
from ..agent.process import EventListener
from ..agent.registry import AgentRegistry, start_or_join
from ..config import DEFAULTS
from ..ssh import session as ssh_session
from .kernel import KernelOptions, RemoteKernel

__all__ = ["SSHSession"]


class SSHSession(ssh_session.Session):
    """A handle on the shared SSH connection to one host, with its agents and kernels.

    Use ``async with await SSHSession.connect("alias") as session: ...``.
    """

    async def agent(
        self,
        python: str = "python3",
        pre_command: str | None = None,
        *,
        grace: float = DEFAULTS.grace_period,
        link_grace: float = DEFAULTS.link_grace,
        run_root: str | None = None,
        launch: tuple[str, LaunchRequest, EventListener | None] | None = None,
    ) -> RemoteAgent:
        """The remote agent for ``python`` (started on first use, then shared). It keeps
        kernels ``grace`` seconds once this side is known gone, ``link_grace`` seconds
        while this side is silent (see :class:`~sshpyk.agent.client.RemoteAgent`).
        ``launch``: a first launch, sent with the hello if this starts the agent (see
        :meth:`RemoteAgent.start`)."""
        await self.connection()
        key = (python, pre_command, grace, link_grace, run_root)

        async def start() -> RemoteAgent:
            agent = RemoteAgent(
                self, python, pre_command, grace=grace, link_grace=link_grace, run_root=run_root
            )
            await agent.start(launch)
            return agent

        async def join(socket_path: str, token: str) -> RemoteAgent:
            return await RemoteAgent.attach(
                self, socket_path, python, pre_command, grace=grace, link_grace=link_grace,
                run_root=run_root, owner=True, token=token,
            )  # fmt: skip

        async def start_or_join_shared() -> RemoteAgent:
            control = await self.shared.control(self._connect_timeout)
            if control is None:  # not through a connection broker: this process's own
                return await start()
            return await start_or_join(control, key, start, join)

        return await AgentRegistry.of(self.shared).get(key, start_or_join_shared)

    async def attach_agent(
        self,
        socket_path: str,
        python: str = "python3",
        pre_command: str | None = None,
        *,
        grace: float = DEFAULTS.grace_period,
        link_grace: float = DEFAULTS.link_grace,
    ) -> RemoteAgent:
        """Join an agent that already runs on the host (see :meth:`RemoteKernel.attach`)."""
        await self.connection()

        async def start() -> RemoteAgent:
            return await RemoteAgent.attach(
                self, socket_path, python, pre_command, grace=grace, link_grace=link_grace
            )

        return await AgentRegistry.of(self.shared).get(("attached", socket_path), start)

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

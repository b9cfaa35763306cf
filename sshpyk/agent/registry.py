"""AgentRegistry: the remote agents of one shared SSH connection.

Kept in the connection's ``services`` slot (:class:`~sshpyk.ssh.pool.SharedConnection`),
one agent per settings key (remote python, pre-command, grace, run root; or the socket
of an agent joined with ``attach``); its close hook shuts the agents down, persistent
kernels kept, when the connection closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable

from ..ssh.pool import SharedConnection
from .client import RemoteAgent

__all__ = ["AgentRegistry"]

log = logging.getLogger("sshpyk")


class AgentRegistry:
    """The remote agents running over one shared connection, one per settings key.

    Kept in the connection's ``services`` slot (:meth:`of`); its close hook shuts the
    agents down when the connection closes.
    """

    def __init__(self) -> None:
        self.agents: dict[Hashable, RemoteAgent] = {}
        self._locks: dict[Hashable, asyncio.Lock] = {}

    @classmethod
    def of(cls, shared: SharedConnection) -> AgentRegistry:
        agents = shared.services.get(cls)
        if not isinstance(agents, cls):
            agents = shared.services[cls] = cls()
            shared.on_close(agents.close)
        return agents

    async def get(self, key: Hashable, start: Callable[[], Awaitable[RemoteAgent]]) -> RemoteAgent:
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
        results = await asyncio.gather(
            *(a.close(timeout / 3, keep_persistent=True) for a in agents),
            return_exceptions=True,
        )
        for agent, result in zip(agents, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("[%s] closing the agent failed: %r", agent.alias, result)

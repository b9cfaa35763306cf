"""AgentRegistry: the remote agents of one shared SSH connection.

Kept in the connection's ``services`` slot (:class:`~sshpyk.ssh.pool.SharedConnection`),
one agent per settings key (remote python, pre-command, grace, run root; or the socket
of an agent joined with ``attach``); its close hook shuts the agents down, persistent
kernels kept, when the connection closes.

Through the connection broker, the processes of this user share one agent per settings
key as well (:func:`start_or_join`): the broker's slot for the key names the agent's
control socket; the first process starts the agent, the others join it. Each process
owns the kernels it launched (remote/owners.py): closing stops only its own. Each
leaves the broker a last will, "this process is gone", which the broker delivers to
the agent when the process exits, so that its kernels get the short grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

from ..errors import ConnectionLostError, SSHPykError
from ..ssh.control import BrokerControl
from ..ssh.pool import SharedConnection
from .client import AGENT_START_TIMEOUT, RemoteAgent
from .command import AGENT_SOURCE
from .remote.protocol import PROTOCOL, Op

__all__ = ["AgentRegistry", "start_or_join"]

log = logging.getLogger("sshpyk")


class AgentRegistry:
    """The remote agents running over one shared connection, one per settings key.

    Kept in the connection's ``services`` slot (:meth:`of`); its close hook shuts the
    agents down when the connection closes.
    """

    def __init__(self, shared: SharedConnection | None = None) -> None:
        self.shared = shared
        self.agents: dict[Hashable, RemoteAgent] = {}
        #: the agent sockets this process left a last will for (revoked at close)
        self.wills: set[str] = set()
        #: agent socket -> (broker slot, its value): dropped when the agent exits with us
        self.slots: dict[str, tuple[str, dict[str, Any]]] = {}
        self._locks: dict[Hashable, asyncio.Lock] = {}

    @classmethod
    def of(cls, shared: SharedConnection) -> AgentRegistry:
        agents = shared.services.get(cls)
        if not isinstance(agents, cls):
            agents = shared.services[cls] = cls(shared)
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
        await self._revoke_wills(agents)

    async def _revoke_wills(self, agents: list[RemoteAgent]) -> None:
        """This process left on purpose: its last wills are void, and the slots of the
        agents that exited with it are emptied, so that the next process starts an agent
        at once instead of trying a dead one first (bounded; a broker that is gone has
        neither left anyway)."""
        control = self.shared.current_control() if self.shared is not None else None
        sockets = [a.socket_path for a in agents if a.socket_path in self.wills]
        gone = [self.slots[a.socket_path] for a in agents
                if a.exited_on_close and a.socket_path in self.slots]  # fmt: skip
        if control is None or not (sockets or gone):
            return
        requests = [control.revoke(s) for s in sockets]
        requests += [control.drop(slot, value) for slot, value in gone]  # not for the next
        with contextlib.suppress(SSHPykError, asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*requests), 2.0)


#: tries of claim-then-join when the agent a slot names turns out to be gone
JOIN_TRIES = 3


def slot_key(key: Hashable) -> str:
    """The broker slot of an agent settings key: agents of another sshpyk (another
    agent code) never mix."""
    digest = hashlib.sha256(AGENT_SOURCE)
    digest.update(repr(key).encode())
    return "agent-" + digest.hexdigest()[:32]


async def start_or_join(
    control: BrokerControl,
    key: Hashable,
    start: Callable[[], Awaitable[RemoteAgent]],
    join: Callable[[str, str], Awaitable[RemoteAgent]],
) -> RemoteAgent:
    """The agent for ``key`` that the processes of this user share through the broker:
    joined (``join(socket, token)``) when the broker's slot names one, else started (by one
    process at a time: the others wait for it and join)."""
    slot = slot_key(key)
    error: SSHPykError | None = None
    for _ in range(JOIN_TRIES):
        found, value = await control.claim(slot, AGENT_START_TIMEOUT + 10)
        if not found:
            try:
                agent = await start()
            except BaseException:
                with contextlib.suppress(SSHPykError):
                    await asyncio.shield(control.abandon(slot))
                raise
            value = _slot_value(agent)
            try:
                if value is None:  # no control socket (no short path): not shareable
                    await control.abandon(slot)
                else:
                    await control.put(slot, value)
                    await _leave_will(control, agent, slot)
            except BaseException:  # nobody will have it: it goes, with a launch sent ahead
                await asyncio.shield(agent.close())
                raise
            return agent
        try:
            agent = await join(str(value["socket"]), str(value["token"]))
        except (SSHPykError, KeyError, TypeError) as exc:
            error = exc if isinstance(exc, SSHPykError) else None
            agent_pid = value.get("pid") if isinstance(value, dict) else None
            log.info(
                "[%s] the shared agent %s is gone (%s): starting anew",
                control.alias,
                agent_pid,
                exc,
            )
            await control.drop(slot, value)
            continue
        log.info(
            "[%s] joined the agent pid %s (shared with other processes)", agent.alias, agent.pid
        )
        await _leave_will(control, agent, slot)
        return agent
    raise error or ConnectionLostError(f"no agent to share on {control.alias!r}")


def _slot_value(agent: RemoteAgent) -> dict[str, Any] | None:
    if not agent.socket_path:
        return None
    return {"socket": agent.socket_path, "pid": agent.pid, "token": agent.agent_token}


async def _leave_will(control: BrokerControl, agent: RemoteAgent, slot: str) -> None:
    """The broker tells the agent when this process exits (its kernels: the short grace);
    again after each reattach (a restarted broker knows neither slot nor will)."""
    shared = agent.session.shared

    async def tell(put: bool) -> None:
        current = await shared.control(10.0)
        value = _slot_value(agent)
        if current is None or value is None:
            return
        if put:
            await current.put(slot, value)
        line = json.dumps({"v": PROTOCOL, "op": Op.GONE, "owner": agent.token})
        await current.will(str(agent.socket_path), line)
        registry = AgentRegistry.of(shared)
        registry.wills.add(str(agent.socket_path))
        registry.slots[str(agent.socket_path)] = (slot, value)

    await tell(put=False)

    async def again() -> None:
        await tell(put=True)

    agent.on_reattach.append(again)

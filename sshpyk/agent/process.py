"""KernelProcess: the local view of one kernel a remote agent supervises.

Its state is fed by the agent's events (:meth:`KernelProcess.on_event`) and by a
``state`` answer after a (re)attach (:meth:`KernelProcess.restore`); it never asks
the host, so polling costs no round trip. The states, each an :class:`asyncio.Event`
that is never cleared but ``reachable``::

    started -> running -> ready (+ reachable)    the kernel comes up
    any state -> exited -> stopped               it ended; the agent cleaned up

``running`` is set at once for a kernel that runs where the agent does; a launcher that
queues kernels (a batch scheduler's) starts them with no endpoints, and ``running``
follows the event that brings them. Every state is set when the kernel ends, to wake every waiter.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from ..errors import KernelStartError, SSHPykError
from ..tasks import wait_event
from .remote.protocol import IDLE_TIMEOUT, Event, Op

__all__ = ["LOST", "AgentLink", "EventListener", "KernelProcess"]

log = logging.getLogger("sshpyk")

#: exit code reported when the agent's channel closed without an ``exited`` event
LOST = -1

#: called with the kernel and each launcher event (queue state, job start, walltime warning)
EventListener = Callable[["KernelProcess", dict[str, Any]], None]

#: the fields every ``state`` entry has; the others are the launcher's own (details)
_COMMON_STATE = frozenset(
    (
        "kid",
        "pid",
        "run_dir",
        "transport",
        "endpoints",
        "relay",
        "relay_ahead",
        "ready",
        "exit_code",
        "persistent",
        "ports",
    )
)
_EVENT_FIELDS = frozenset(("v", "event", "kid", "endpoints"))


class AgentLink(Protocol):
    """What a KernelProcess needs of its agent (:class:`sshpyk.agent.client.RemoteAgent`)."""

    alias: str
    pid: int | None
    connected: asyncio.Event

    def send(self, message: dict[str, Any]) -> None: ...

    def forget(self, kid: str) -> None: ...

    def error_from_event(self, event: dict[str, Any]) -> SSHPykError: ...


class KernelProcess:
    """The local view of one kernel supervised by a remote agent.

    :attr:`exit_code` is set from the agent's ``exited`` event (or :data:`LOST` if the
    agent went away).
    """

    def __init__(self, agent: AgentLink, kid: str) -> None:
        self.agent = agent
        self.kid = kid
        self.pid = 0
        self.pgid = 0
        self.run_dir = ""
        self.transport = ""
        self.endpoints: dict[str, Any] = {}
        #: the agent's end of the kernel's resumable relay (a unix socket), or None
        self.relay: str | None = None
        #: the relay gives ZMTP's first bytes ahead (agent/remote/zmtp.py)
        self.relay_ahead = False
        #: the key of a warm spare that serves this launch (its own), else ""
        self.key = ""
        #: where the kernel's tcp sockets listen, as seen from the remote host
        self.host = "127.0.0.1"
        self.launcher = "direct"
        #: the launcher's own view, as last reported (a batch job: job_id, job_name, state,
        #: reason, node, waited, time_left, node_pid)
        self.details: dict[str, Any] = {}
        self.listeners: list[EventListener] = []
        #: the TCP ports the kernel's processes listen on (``ports`` events):
        #: [{"port", "host"[, "path"]}]; ``on_ports`` is told of each change
        self.web_ports: list[dict[str, Any]] = []
        self.on_ports: Callable[[KernelProcess], None] | None = None
        self.argv: list[str] = []
        self.exit_code: int | None = None
        self.stderr_tail = ""
        #: seconds idle after which the agent shut the kernel down (its idle timeout)
        self.idle_shutdown: float | None = None
        self.persistent = False
        self.started = asyncio.Event()
        #: set once the kernel process runs (or the kernel ended)
        self.running = asyncio.Event()
        #: set once all five sockets are bound (or the kernel ended)
        self.ready = asyncio.Event()
        #: set while the kernel is ready AND the link to it is up; forwards wait on it
        self.reachable = asyncio.Event()
        self.exited = asyncio.Event()
        self.stopped = asyncio.Event()
        self.error: SSHPykError | None = None

    @property
    def supervisor_pid(self) -> int | None:
        return self.agent.pid

    # -- events from the agent ----------------------------------------------------------
    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == Event.STARTED:
            self.pid = int(event["pid"])
            self.pgid = int(event["pgid"])
            self.run_dir = str(event["run_dir"])
            self.transport = str(event["transport"])
            self.endpoints = dict(event["endpoints"])
            self.relay = event.get("relay") or None
            self.relay_ahead = event.get("relay_ahead") is True
            self.key = str(event.get("key") or "")
            self.argv = list(event.get("argv") or [])
            self.launcher = str(event.get("launcher") or self.launcher)
            if event.get("job_name"):
                self.details["job_name"] = event["job_name"]
            if self.endpoints:  # else the launcher queued it: endpoints come when it runs
                self.running.set()
            self.started.set()
        elif kind == Event.JOB:
            self._on_launcher_event(event)
        elif kind == Event.PORTS:
            self._set_ports(event.get("ports"))
        elif kind == Event.READY:
            self.ready.set()
            self.reachable.set()
        elif kind == Event.EXITED:
            if event.get("reason") == IDLE_TIMEOUT and self.exit_code is None:
                self.idle_shutdown = float(event.get("idle_s") or 0.0)
                line = "[%s] kernel %s shut down after %.0f s idle (idle timeout %g s)"
                timeout = float(event.get("idle_timeout") or 0.0)
                log.warning(line, self.agent.alias, self.kid, self.idle_shutdown, timeout)
            self._set_exit(int(event.get("code", LOST)), str(event.get("stderr_tail") or ""))
        elif kind == Event.ERROR:
            self.error = self.agent.error_from_event(event)
            self._set_exit(int(event.get("code") or LOST), str(event.get("stderr_tail") or ""))
            self.stopped.set()  # the agent cleaned up a failed launch itself
        elif kind == Event.STOPPED:
            if self.exit_code is None:
                self._set_exit(LOST, "")
            self.stopped.set()

    def _set_exit(self, code: int, stderr_tail: str) -> None:
        if self.exit_code is None:
            self.exit_code = code
            self.stderr_tail = stderr_tail
        for event in (self.exited, self.started, self.running, self.ready, self.reachable):
            event.set()  # wake every waiter; they look at exit_code/error

    def _set_ports(self, ports: Any) -> None:
        self.web_ports = [dict(p) for p in ports or [] if isinstance(p, dict)]
        if self.on_ports is not None:
            try:
                self.on_ports(self)
            except Exception:  # the forwards' failure must not break the event stream
                log.exception("[%s] kernel %s: port forwarding failed", self.agent.alias, self.kid)

    def _on_launcher_event(self, event: dict[str, Any]) -> None:
        if "endpoints" in event:
            self.endpoints = dict(event["endpoints"])
            self.host = str(event.get("host") or self.host)
            self.running.set()
        self.details.update({k: v for k, v in event.items() if k not in _EVENT_FIELDS})
        for listener in list(self.listeners):
            try:
                listener(self, event)
            except Exception:  # a logging hook must not break the event stream
                log.exception("[%s] kernel %s: event hook failed", self.agent.alias, self.kid)

    def restore(self, state: dict[str, Any]) -> None:
        """Adopt the agent's view (a ``state`` entry) after a (re)attach."""
        self.pid = int(state.get("pid") or self.pid or 0)
        self.pgid = self.pid
        self.run_dir = str(state.get("run_dir") or self.run_dir)
        self.transport = str(state.get("transport") or self.transport)
        self.endpoints = dict(state.get("endpoints") or self.endpoints)
        self.relay = state.get("relay") or self.relay
        self.relay_ahead = state.get("relay_ahead", self.relay_ahead) is True
        self.persistent = bool(state.get("persistent"))
        self.host = str(state.get("host") or self.host)
        self.launcher = str(state.get("launcher") or self.launcher)
        # the launcher's own fields; "<launcher>_x" is its x (<launcher>_state: the state)
        prefix = self.launcher + "_"
        for key, value in state.items():
            if key not in _COMMON_STATE and key != "launcher" and value:
                self.details[key.removeprefix(prefix)] = value
        # a kernel whose state has a host runs once the host is known (a queued job)
        if "host" not in state or state.get("host"):
            self.running.set()
        self.started.set()
        if state.get("exit_code") is not None:
            self._set_exit(int(state["exit_code"]), "")
        elif state.get("ready"):
            self.ready.set()
            self.reachable.set()
        if "ports" in state:
            self._set_ports(state.get("ports"))

    def on_agent_lost(self, error: SSHPykError) -> None:
        if self.error is None and not self.ready.is_set():
            self.error = error
        self._set_exit(LOST, "")
        self.stopped.set()

    # -- API -----------------------------------------------------------------------------
    async def wait_started(self) -> None:
        await self.started.wait()
        if self.error is not None:
            raise self.error
        if self.exit_code is not None and not self.pid:
            raise KernelStartError(f"the kernel on {self.agent.alias!r} did not start")

    async def wait_ready(self) -> None:
        """Wait until all five sockets are bound; raise if the kernel died first."""
        await self.ready.wait()
        if self.exit_code is not None:
            raise self.error or KernelStartError(
                f"the kernel on {self.agent.alias!r} exited with code {self.exit_code} during start"
            )

    def poll(self) -> int | None:
        return self.exit_code

    async def wait(self) -> int:
        await self.exited.wait()
        assert self.exit_code is not None
        return self.exit_code

    def tell_forwards(self, forwards: list[dict[str, Any]]) -> None:
        """Tell the agent where the web ports are forwarded (``sshpyk ps`` shows it)."""
        if self.agent.connected.is_set() and self.exit_code is None:
            self.agent.send({"op": Op.FORWARDED, "kid": self.kid, "forwards": forwards})

    def tell_client(self, client: str) -> None:
        """Tell the agent who drives the kernel now (``sshpyk ps`` shows it)."""
        if self.agent.connected.is_set() and self.exit_code is None:
            self.agent.send({"op": Op.CLIENT, "kid": self.kid, "client": client})

    def send_signal(self, signum: int) -> None:
        self.agent.send({"op": Op.SIGNAL, "kid": self.kid, "signum": int(signum)})

    async def stop(self, timeout: float = 10.0) -> None:
        """Kill the kernel's process group and remove its run dir; wait until done,
        at most ``timeout`` seconds.

        While the link is down this returns at once: the agent reaps the kernel
        when the grace period ends without a reattach.
        """
        if self.stopped.is_set() or not self.agent.connected.is_set():
            self.agent.forget(self.kid)
            return
        started = time.monotonic()
        self.agent.send({"op": Op.STOP, "kid": self.kid})
        try:
            if not await wait_event(self.stopped, timeout):
                log.warning(
                    "[%s] kernel %s: no stop confirmation in %gs",
                    self.agent.alias,
                    self.kid,
                    timeout,
                )
        finally:
            self.agent.forget(self.kid)
        log.debug(
            "[%s] kernel %s stopped in %.3fs",
            self.agent.alias,
            self.kid,
            time.monotonic() - started,
        )

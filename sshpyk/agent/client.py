"""RemoteAgent: the local client of one remote agent, over an SSH exec channel.

The agent's code is sent on the channel's stdin (:mod:`sshpyk.agent.command`), followed
by JSON request lines (:mod:`sshpyk.agent.remote.protocol`; launch requests carry the
HMAC key: never argv). The agents of a connection are found in :mod:`sshpyk.agent.registry`.
Every request has a timeout; the background tasks (heartbeat, recovery, channel readers)
are owned (:class:`~sshpyk.tasks.TaskOwner`) and closed with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncssh

from ..config import DEFAULTS
from ..errors import (
    AgentGoneError,
    ConnectionLostError,
    ProtocolError,
    RemoteError,
    RemotePythonNotFoundError,
    RequestTimeoutError,
    SSHPykError,
    translating,
)
from ..ssh.session import Session
from ..tasks import TaskOwner
from .channel import AgentChannel, SocketChannel
from .command import load_fields, remote_command
from .kinds import last_lines, remote_error
from .process import LOST, EventListener, KernelProcess
from .queries import DEFAULT_REQUEST_TIMEOUT, AgentQueries
from .remote.protocol import PROTOCOL, Event, Op
from .request import LaunchRequest

__all__ = [
    "AGENT_START_TIMEOUT",
    "DEFAULT_REQUEST_TIMEOUT",
    "LOST",
    "PROTOCOL",
    "LaunchRequest",
    "RemoteAgent",
]

log = logging.getLogger("sshpyk")

_STDERR_LIMIT = 8000
#: lines of login-script output tolerated before the agent's hello
_MAX_NOISE_LINES = 200
#: seconds from the exec to the agent's hello (login shell, pre-command, interpreter)
AGENT_START_TIMEOUT = 120.0


def _heartbeat_interval(grace: float) -> float:
    return max(0.5, min(5.0, grace / 4)) if grace else 5.0


class RemoteAgent(AgentQueries):
    """One agent process on the remote host, speaking the JSON line protocol.

    When the SSH link drops (the channel ends without an exit status), the agent
    keeps this process's kernels for ``link_grace`` seconds (a reset and a crash look
    alike from there); ``grace`` seconds only once the connection broker tells it
    this process exited (remote/owners.py). Meanwhile this object reconnects (with backoff) and
    reattaches through the agent's control socket (a small relay started over a new
    exec channel) and resynchronises kernel state. Kernels read as alive throughout;
    only when ``link_grace`` ends without a reattach, or the agent says a kernel is
    gone, are they declared lost.
    """

    def __init__(
        self,
        session: Session,
        python: str,
        pre_command: str | None,
        *,
        grace: float,
        link_grace: float | None = None,
        run_root: str | None,
    ) -> None:
        self.session = session
        self.alias = session.alias
        self.python = python
        self.pre_command = pre_command
        self.grace = grace
        self.link_grace = max(grace, link_grace if link_grace is not None else grace)
        self.run_root = run_root
        self.pid: int | None = None
        self.socket_path: str | None = None
        self.info: dict[str, Any] = {}
        self.process: AgentChannel | None = None
        #: the agent's secret from its hello: a socket that does not say it is not ours
        self.agent_token: str | None = None
        self.kernels: dict[str, KernelProcess] = {}
        #: set while a channel to the agent is up
        self.connected = asyncio.Event()
        #: set once the agent is gone for good (exited, or not reattached in time)
        self.closed = asyncio.Event()
        self.reattached = 0
        self._stderr = bytearray()
        # several local sides may talk to one agent: request ids must not collide
        self._requests: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._rid_prefix = secrets.token_hex(4)
        self._rids = itertools.count(1)
        #: the tasks of the current channel (its stderr drain, its event reader)
        self._channel = TaskOwner(f"[{self.alias}] agent channel")
        self._stderr_task: asyncio.Task[None] | None = None
        #: heartbeat and recovery
        self._tasks = TaskOwner(f"[{self.alias}] agent")
        self._lost_error: SSHPykError | None = None
        self._closing = False
        #: closing tells it to stop our (non-persistent) kernels; False: only hang up
        self.owner = True
        #: who this process is to the agent (its kernels are ours: see remote/owners.py)
        self.token = secrets.token_hex(16)
        self._loaded: set[str] = set()
        self._load_lock = asyncio.Lock()
        self.exited_on_close = False
        #: the host asked for the agent's code (not in its cache): it was sent
        self.code_uploaded = False
        #: kernels whose launch request went with the hello (see :meth:`start`)
        self._ahead: set[str] = set()
        #: awaited after each reattach (a new broker must learn the agent again)
        self.on_reattach: list[Callable[[], Awaitable[None]]] = []

    @property
    def alive(self) -> bool:
        return self.process is not None and not self.closed.is_set()

    # -- channels --------------------------------------------------------------------
    async def _open_channel(
        self, first_line: dict[str, Any], stream: SocketChannel | None = None, ahead: bytes = b""
    ) -> dict[str, Any]:
        """Run the agent over a new exec channel (or read ``stream``, a channel to its
        control socket); return its hello. ``ahead``: request lines sent right after the
        first, without waiting for the hello."""
        process: AgentChannel
        if stream is None:
            conn = await self.session.connection()
            command = remote_command(self.python, self.pre_command)
            with translating(self.alias, config=self.session.ssh_config):
                process = await conn.create_process(command.command, encoding=None)
        else:
            process = stream
        self.process = process
        self._stderr = bytearray()
        self._channel = TaskOwner(f"[{self.alias}] agent channel")
        self._stderr_task = self._channel.create_task(self._drain_stderr(process))
        if stream is None:
            hello = json.dumps({"v": PROTOCOL, **first_line}).encode() + b"\n"
            process.stdin.write(command.stdin + hello + ahead)
        try:
            event = await asyncio.wait_for(self._read_first_event(), AGENT_START_TIMEOUT)
            if stream is None and event is not None and event.get("event") == Event.NEED_CODE:
                log.info("[%s] sending the agent's code (%s)", self.alias, event.get("why"))
                self.code_uploaded = True
                process.stdin.write(command.code)
                event = await asyncio.wait_for(self._read_first_event(), AGENT_START_TIMEOUT)
        except asyncio.TimeoutError:
            raise RequestTimeoutError(
                f"the remote agent on {self.alias!r} did not start within "
                f"{AGENT_START_TIMEOUT:g}s: the remote login shell or the pre-command hangs "
                "(see `sshpyk check`)"
            ) from None
        if event is None:
            raise await self._failure()
        if event.get("event") == Event.ERROR:
            raise self.error_from_event(event)
        if event.get("event") != Event.HELLO:
            raise ProtocolError(f"unexpected first event from the agent: {event!r:.200}")
        if self.agent_token is not None and event.get("token") != self.agent_token:
            raise AgentGoneError(f"the agent socket on {self.alias!r} is another agent's")
        self.agent_token = event.get("token")
        self.pid = int(event["pid"])
        self.socket_path = event.get("socket") or self.socket_path
        self.info = event
        self._channel.create_task(self._read_events(process), name="agent-events")
        self.connected.set()
        return event

    async def _open_attached(self, socket_path: str) -> dict[str, Any]:
        """A channel to the agent's control socket; this process claims its kernels on it
        (its first message: the agent counts it as this owner's contact from then on)."""
        stream = await self._open_stream(socket_path) if self.agent_token else None
        hello = await self._open_channel({"op": Op.ATTACH, "socket": socket_path}, stream)
        self.send({"op": Op.CLAIM, "owner": self.token})
        return hello

    async def _open_stream(self, socket_path: str) -> SocketChannel | None:
        """A direct-streamlocal channel to the agent's socket, None where sshd refuses
        it (AllowStreamLocalForwarding no: the exec relay serves instead)."""
        conn = await self.session.connection()
        try:
            reader, writer = await conn.open_unix_connection(socket_path)
        except asyncssh.ChannelOpenError as exc:
            log.debug("[%s] no stream to the agent socket (%s): exec relay", self.alias, exc)
            return None
        return SocketChannel(reader, writer)

    async def _close_channel(self) -> None:
        """Close the current channel and wait for its tasks (bounded)."""
        process, channel = self.process, self._channel
        if process is not None:
            process.close()
        await channel.aclose()

    async def _start_heartbeat(self) -> None:
        self._tasks.create_task(
            self._send_heartbeats(_heartbeat_interval(self.grace)), name="agent-heartbeat"
        )

    async def start(
        self, launch: tuple[str, LaunchRequest, EventListener | None] | None = None
    ) -> None:
        """Spawn the agent and wait for its hello. ``launch`` (kernel id, request,
        listener): a first launch, sent right after the hello without waiting for it;
        :meth:`launch` of that kernel id then only waits for it to start."""
        ahead = b""
        if launch is not None:
            kid, request, on_event = launch
            self._track(kid, request, on_event)
            self._ahead.add(kid)
            ahead = json.dumps(request.message(kid)).encode() + b"\n"
        hello = {
            "op": Op.HELLO,
            "grace": self.grace,
            "link_grace": self.link_grace,
            "heartbeat": _heartbeat_interval(self.grace),
            "run_root": self.run_root,
            "owner": self.token,
        }
        try:
            await self._open_channel(hello, ahead=ahead)
        except BaseException:
            self.unlaunch()
            await asyncio.shield(self._close_channel())
            raise
        await self._start_heartbeat()
        log.debug("[%s] agent pid %s up (%s)", self.alias, self.pid, self.info.get("python"))

    @classmethod
    async def attach(
        cls,
        session: Session,
        socket_path: str,
        python: str,
        pre_command: str | None = None,
        *,
        grace: float = DEFAULTS.grace_period,
        link_grace: float = DEFAULTS.link_grace,
        run_root: str | None = None,
        owner: bool = False,
        token: str | None = None,
    ) -> RemoteAgent:
        """Connect to an agent that already runs (e.g. one holding persistent kernels).

        ``owner``: this process launches kernels there (an agent shared with other
        processes): closing stops them; else closing only hangs up."""
        agent = cls(
            session, python, pre_command, grace=grace, link_grace=link_grace, run_root=run_root
        )
        agent.socket_path = socket_path
        agent.owner = owner
        agent.agent_token = token  # known (a shared agent's slot): a direct stream
        try:
            await agent._open_attached(socket_path)
        except BaseException:
            await asyncio.shield(agent._close_channel())
            raise
        await agent._start_heartbeat()
        return agent

    async def _drain_stderr(self, process: AgentChannel) -> None:
        with contextlib.suppress(asyncssh.Error, OSError):
            while chunk := await process.stderr.read(4096):
                self._stderr += chunk
                del self._stderr[:-_STDERR_LIMIT]

    async def _read_first_event(self) -> dict[str, Any] | None:
        """The agent's first event. Login scripts may print text before the agent
        runs (a banner, ``echo`` in ~/.bashrc): such lines are skipped, boundedly."""
        for _ in range(_MAX_NOISE_LINES + 1):
            try:
                return await self._read_event()
            except ProtocolError:
                continue
        raise ProtocolError(
            f"the remote shell on {self.alias!r} printed more than {_MAX_NOISE_LINES} lines "
            "before the agent started: make the login scripts quiet for non-interactive shells"
        )

    async def _read_event(self) -> dict[str, Any] | None:
        assert self.process is not None
        try:
            line = await self.process.stdout.readline()
        except (asyncssh.Error, OSError):
            return None
        if not line:
            return None
        try:
            event = json.loads(line)
        except ValueError:
            raise ProtocolError(
                f"unexpected output from the remote agent on {self.alias!r}: {line[:200]!r} "
                "(does the remote shell print something at login?)"
            ) from None
        if not isinstance(event, dict) or event.get("v") != PROTOCOL:
            raise ProtocolError(
                f"the remote agent on {self.alias!r} speaks another protocol: {line[:200]!r}"
            )
        return event

    async def _failure(self) -> SSHPykError:
        """The error to report when the channel ended without an answer."""
        assert self.process is not None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.process.wait_closed(), 5)
        if self._stderr_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._stderr_task), 1)
        status = self.process.exit_status
        stderr = self._stderr.decode("utf-8", "replace")
        if status == 127 or "not found" in stderr or "No such file" in stderr:
            return RemotePythonNotFoundError(
                f"remote python {self.python!r} not found on {self.alias!r}: "
                f"{last_lines(stderr, 1) or f'exit status {status}'} (set --remote-python)"
            )
        if status is None and not stderr:
            return ConnectionLostError(f"the SSH connection to {self.alias!r} was lost")
        detail = last_lines(stderr) or f"exit status {status}"
        return RemoteError(f"the remote agent on {self.alias!r} failed: {detail}")

    def error_from_event(self, event: dict[str, Any]) -> SSHPykError:
        """The error an ``error`` event reports (its kind's class, see agent.kinds)."""
        return remote_error(event, self.alias)

    async def _read_events(self, process: AgentChannel) -> None:
        try:
            while (event := await self._read_event()) is not None:
                self._dispatch(event)
        except ProtocolError as exc:
            self._give_up(exc)
            return
        if self._closing or process is not self.process:
            return
        # The channel ended. An exit status means the agent itself ended; none means
        # the link dropped under it, and the agent waits for us to reattach.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(process.wait_closed(), 1)
        self.connected.clear()
        if process.exit_status is not None or process.exit_signal is not None or not self.kernels:
            self._give_up(await self._failure())
            return
        for kernel in self.kernels.values():
            kernel.reachable.clear()
        for future in self._requests.values():
            if not future.done():
                future.set_exception(ConnectionLostError(f"link to {self.alias!r} lost"))
        log.info(
            "[%s] link down: %d kernel(s) kept for up to %gs while reconnecting",
            self.alias,
            len(self.kernels),
            self.link_grace,
        )
        self._tasks.create_task(self._recover(), name="agent-recover")

    async def _recover(self) -> None:
        """Reconnect and reattach within the link grace, or declare the kernels lost.
        Backoff: 0.05 s doubling to 0.1 s for 10 s (a link that comes back is noticed
        within 0.1 s; a refused attempt costs a TCP handshake), 0.25 s until 30 s, 1 s
        until a minute, then 10 s."""
        started = time.monotonic()
        deadline = started + (self.link_grace or 60.0)
        attempt = 0
        error: SSHPykError = ConnectionLostError(f"the SSH connection to {self.alias!r} was lost")
        while not self._closing and time.monotonic() < deadline:
            attempt += 1
            try:
                remaining = max(0.5, deadline - time.monotonic())
                await self.session.reconnect(timeout=min(10.0, remaining))
                await asyncio.wait_for(self._reattach(), min(30.0, remaining))
            except AgentGoneError as exc:
                error = exc
                break
            except (SSHPykError, asyncio.TimeoutError, OSError, asyncssh.Error) as exc:
                error = exc if isinstance(exc, SSHPykError) else ConnectionLostError(str(exc))
                down = time.monotonic() - started
                cap = 0.1 if down < 10 else 0.25 if down < 30 else 1.0 if down < 60 else 10.0
                delay = min(cap, 0.05 * 2 ** (attempt - 1))
                log.log(
                    logging.INFO if attempt == 1 or attempt % 20 == 0 else logging.DEBUG,
                    "[%s] reconnect attempt %d failed after %.1fs down (%s); next in %.2fs",
                    *(self.alias, attempt, down, error, delay),
                )
                await asyncio.sleep(delay)
                continue
            log.info(
                "[%s] link restored: reattached to the agent after %.2fs down (%d attempt(s))",
                self.alias,
                time.monotonic() - started,
                attempt,
            )
            for hook in self.on_reattach:
                try:
                    await hook()
                except (SSHPykError, asyncio.TimeoutError) as exc:
                    log.warning("[%s] after the reattach: %s", self.alias, exc)
            return
        if not self._closing:
            log.error("[%s] kernels lost: %s", self.alias, error)
            self._give_up(error)

    async def _reattach(self) -> None:
        if not self.socket_path:
            raise AgentGoneError(f"the agent on {self.alias!r} has no control socket")
        await self._close_channel()
        await self._open_attached(self.socket_path)
        self.reattached += 1
        event = await self.request(Op.STATE)
        states = {str(k["kid"]): k for k in event.get("kernels") or []}
        for kid, kernel in list(self.kernels.items()):
            if kid in states:
                kernel.restore(states[kid])
            else:
                kernel.on_agent_lost(
                    ConnectionLostError(f"kernel {kid} is gone from {self.alias!r}")
                )

    def _give_up(self, error: SSHPykError) -> None:
        self._lost_error = error
        self.connected.clear()
        self.closed.set()
        for kernel in list(self.kernels.values()):
            kernel.on_agent_lost(error)
        for future in self._requests.values():
            if not future.done():
                future.set_exception(error)
        if self.kernels:
            log.warning("[%s] remote agent gone: %s", self.alias, error)

    def _dispatch(self, event: dict[str, Any]) -> None:
        rid = event.get("rid")
        if rid is not None and rid in self._requests:
            future = self._requests.pop(rid)
            if not future.done():
                if event.get("event") == Event.ERROR:
                    future.set_exception(self.error_from_event(event))
                else:
                    future.set_result(event)
            return
        kernel = self.kernels.get(str(event.get("kid")))
        if kernel is not None:
            kernel.on_event(event)

    async def _send_heartbeats(self, interval: float) -> None:
        while not self.closed.is_set():
            await asyncio.sleep(interval)
            self.send({"op": Op.PING})

    def send(self, message: dict[str, Any]) -> None:
        if self.process is not None and self.connected.is_set():
            # a channel that is closing refuses writes: the reader notices the loss
            with contextlib.suppress(asyncssh.Error, OSError, RuntimeError):
                self.process.stdin.write(json.dumps(message).encode() + b"\n")

    # -- requests ----------------------------------------------------------------------
    async def request(
        self, op: str, *, timeout: float = DEFAULT_REQUEST_TIMEOUT, **fields: Any
    ) -> dict[str, Any]:
        """Send one request and wait for the event that answers it (matched by rid).

        Raises :class:`RequestTimeoutError` when no answer comes within ``timeout``
        seconds (a remote that stopped answering)."""
        if self.closed.is_set():
            raise self._lost_error or ConnectionLostError(f"the agent on {self.alias!r} is gone")
        if not self.connected.is_set():
            raise ConnectionLostError(f"the link to {self.alias!r} is down (reconnecting)")
        rid = f"{self._rid_prefix}-{next(self._rids)}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._requests[rid] = future
        self.send({"op": op, "rid": rid, **fields})
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise RequestTimeoutError(
                f"the remote agent on {self.alias!r} did not answer {op!r} within {timeout:g}s"
            ) from None
        finally:
            self._requests.pop(rid, None)

    async def load(self, name: str, modules: tuple[str, ...]) -> None:
        """Send the remote code of extension ``name`` (a launcher's: its agent
        ``modules``) to the agent, once: agents that never need it never receive nor
        compile it."""
        async with self._load_lock:
            if name not in self._loaded:
                await self.request(Op.LOAD, **load_fields(name, modules))
                self._loaded.add(name)

    async def adopt(self, kid: str) -> KernelProcess:
        """Track a kernel this agent already runs (after :meth:`attach`)."""
        event = await self.request(Op.STATE)
        for state in event.get("kernels") or []:
            if str(state.get("kid")) == kid:
                kernel = self.kernels[kid] = KernelProcess(self, kid)
                kernel.restore(state)
                return kernel
        raise RemoteError(f"no kernel {kid} in the agent on {self.alias!r}")

    def unlaunch(self) -> None:
        """Stop the kernels whose launch went with the hello (:meth:`start`) and that
        :meth:`launch` has not taken: the start failed or was cancelled in between. The
        agent reads the stop after the launch (one stdin), whether it has started yet."""
        for kid in list(self._ahead):
            self._ahead.discard(kid)
            self.kernels.pop(kid, None)
            if self.process is not None:  # also before the hello (send() waits for it)
                with contextlib.suppress(asyncssh.Error, OSError, RuntimeError):
                    self.process.stdin.write(
                        json.dumps({"op": Op.STOP, "kid": kid}).encode() + b"\n"
                    )

    async def launch(
        self, kid: str, request: LaunchRequest, *, on_event: EventListener | None = None
    ) -> KernelProcess:
        """Start a kernel; returns once its process exists (not yet ready: a queued
        kernel may still wait). The launcher's remote code must be loaded (its
        ``prepare``). ``on_event`` sees the launcher's events (queue, start, walltime)."""
        if not self.alive or not self.connected.is_set():
            raise self._lost_error or ConnectionLostError(f"the agent on {self.alias!r} is gone")
        kernel = self.kernels.get(kid) if kid in self._ahead else None
        self._ahead.discard(kid)
        if kernel is None:  # not sent with the hello: now
            kernel = self._track(kid, request, on_event)
            self.send(request.message(kid))
        try:
            await kernel.wait_started()
        except BaseException:
            await asyncio.shield(kernel.stop())
            raise
        return kernel

    def _track(
        self, kid: str, request: LaunchRequest, on_event: EventListener | None
    ) -> KernelProcess:
        kernel = self.kernels[kid] = KernelProcess(self, kid)
        kernel.persistent = request.persistent
        if on_event is not None:
            kernel.listeners.append(on_event)
        return kernel

    def forget(self, kid: str) -> None:
        self.kernels.pop(kid, None)

    async def close(
        self, timeout: float = 10.0, *, keep_persistent: bool = False, detach: bool = False
    ) -> None:
        """Tell the agent the local side is leaving on purpose.

        It stops every kernel (but persistent ones if ``keep_persistent``), removes
        their run dirs and exits. Waits for that, bounded by ``timeout``. Without this
        (a crash, a lost link) the agent keeps the kernels for the grace period.
        ``detach`` only hangs up, leaving every kernel to its owner (``sshpyk attach``).
        """
        self._closing = True
        detach = detach or not self.owner
        process = self.process
        agent_exits = not detach
        if process is not None and self.connected.is_set() and not detach:
            try:
                bye = await self.request(
                    Op.SHUTDOWN, keep_persistent=keep_persistent, timeout=timeout
                )
                agent_exits = not bye.get("kept")
            except SSHPykError:
                pass  # gone or silent: the agent's grace period reaps its kernels
            with contextlib.suppress(asyncssh.Error, OSError, RuntimeError):
                process.stdin.write_eof()
            if agent_exits:
                # the channel closes once the agent has cleaned up and exited
                with contextlib.suppress(asyncio.TimeoutError, asyncssh.Error, OSError):
                    await asyncio.wait_for(process.wait_closed(), timeout)
        self.connected.clear()
        await self._close_channel()
        #: the agent left with this close (nothing of anyone's was kept)
        self.exited_on_close = process is not None and agent_exits
        if process is not None and agent_exits:
            with contextlib.suppress(asyncio.TimeoutError, asyncssh.Error, OSError):
                await asyncio.wait_for(process.wait_closed(), timeout)
        await self._tasks.aclose()
        self.closed.set()

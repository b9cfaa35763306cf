"""Drives the remote agent (``sshpyk/agent/remote/``) over an SSH exec channel.

The agent's modules are sent on the channel's stdin to ``python -c <loader>``,
followed by JSON request lines (launch requests carry the HMAC key: never argv).
One :class:`RemoteAgent` runs per (SSH connection, remote python, pre-command)
and supervises every kernel started through it; a :class:`KernelProcess` is the
local view of one of those kernels.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import secrets
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncssh

from .agent.bundle import agent_bundle, slurm_modules
from .agent.remote.protocol import LOADER, PROTOCOL, Kind
from .config import DEFAULTS
from .errors import (
    ConnectionLostError,
    KernelStartError,
    KernelStartTimeoutError,
    ProtocolError,
    RemoteError,
    RemoteJupyterClientMissingError,
    RemoteKernelSpecNotFoundError,
    RemotePythonNotFoundError,
    RequestTimeoutError,
    SSHPykError,
    UnsafePathError,
    translate_error,
)

if TYPE_CHECKING:
    from .session import SSHSession

__all__ = [
    "LOST",
    "PROTOCOL",
    "KernelProcess",
    "LaunchRequest",
    "RemoteAgent",
    "RemoteCommand",
    "SlurmListener",
    "python_command",
    "remote_command",
]

log = logging.getLogger("sshpyk")


_STDERR_LIMIT = 8000
#: lines of login-script output tolerated before the agent's hello
_MAX_NOISE_LINES = 200
#: exit code reported when the agent's channel closed without an ``exited`` event
LOST = -1
#: seconds an agent request may take before it fails (a silent remote never hangs us)
DEFAULT_REQUEST_TIMEOUT = 30.0
#: seconds from the exec to the agent's hello (login shell, pre-command, interpreter)
AGENT_START_TIMEOUT = 120.0


#: reads the pre-command from stdin (a line count, then the lines) and runs it: the
#: shell's argv, which every user on the host can read in ``ps``, never holds its text
_READ_PRE_COMMAND = (
    'IFS= read -r n || exit 98; s=; i=0; while [ "$i" -lt "$n" ]; do '
    'IFS= read -r l || exit 98; s="$s$l\n"; i=$((i+1)); done; eval "$s"; unset n s i l'
)


@dataclass(frozen=True)
class RemoteCommand:
    """A shell command for the remote host and what it reads first on stdin."""

    #: what sshd's shell runs; visible to every user on the host (``ps``): no secrets
    command: str
    #: written to the channel's stdin before anything else (the pre-command's text)
    stdin: bytes = b""


def python_command(python: str, pre_command: str | None, code: str, *args: str) -> RemoteCommand:
    """The shell command that runs ``python -c code args...`` on the remote host.

    ``python`` is an executable (``python3``, ``/usr/bin/python3``, ``~/venv/bin/python``)
    or an environment prefix such as ``/opt/conda/envs/x`` (then its ``bin/python``);
    ``pre_command`` runs first in the same shell. It travels on stdin, not in the
    command line, so a token it exports does not show in other users' ``ps``.
    """
    if not python or python.startswith("-"):
        raise SSHPykError(
            f"remote python {python!r} is not a path or command name "
            "(it must not be empty or start with '-')"
        )
    if python.startswith("~/"):
        quoted = '"$HOME"/' + shlex.quote(python[2:])
    else:
        quoted = shlex.quote(python)
    argv = "".join(" " + shlex.quote(a) for a in args)
    lines = []
    stdin = b""
    if pre_command:
        text = pre_command.rstrip("\n").split("\n")
        stdin = (f"{len(text)}\n" + "".join(line + "\n" for line in text)).encode("utf-8")
        lines.append(_READ_PRE_COMMAND)
    if "/" in python:
        lines.append(f'p={quoted}; [ -d "$p" ] && p="$p/bin/python"')
        lines.append(f'exec "$p" -c {shlex.quote(code)}{argv}')
    else:
        lines.append(f"exec {quoted} -c {shlex.quote(code)}{argv}")
    return RemoteCommand("\n".join(lines), stdin)


def remote_command(python: str, pre_command: str | None = None) -> RemoteCommand:
    """The shell command that starts the agent with the remote Python (its modules
    follow on stdin, after the pre-command: see ``sshpyk.agent.bundle``)."""
    return python_command(python, pre_command, LOADER)


_ERROR_KINDS: dict[str, type[SSHPykError]] = {
    Kind.JUPYTER_CLIENT_MISSING: RemoteJupyterClientMissingError,
    Kind.KERNELSPEC_NOT_FOUND: RemoteKernelSpecNotFoundError,
    Kind.KERNEL_EXITED: KernelStartError,
    Kind.PROTOCOL: ProtocolError,
    Kind.NOT_FOUND: RemoteError,
    # a run root, run dir or name another user could tamper with (see the security model)
    Kind.UNSAFE_PATH: UnsafePathError,
    # SLURM launcher: the job waited in the queue too long, or ended before the kernel ran
    Kind.SLURM_QUEUE_TIMEOUT: KernelStartTimeoutError,
    Kind.SLURM_FAILED: KernelStartError,
}


def _last_lines(text: str, count: int = 3) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-count:])


@dataclass
class LaunchRequest:
    """A ``launch`` request: the kernel's HMAC key and its launch options, i.e. the
    :class:`~sshpyk.config.KernelConfig` fields marked ``request``, under their kernel
    names (kernel_name, transport, env, cwd, persistent, launcher, slurm_args, ...)."""

    key: str
    signature_scheme: str = "hmac-sha256"
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def launcher(self) -> str:
        return str(self.options.get("launcher") or DEFAULTS.launcher)

    @property
    def persistent(self) -> bool:
        return bool(self.options.get("persistent", DEFAULTS.persistent))

    def message(self, kid: str) -> dict[str, Any]:
        return {
            "op": "launch",
            "kid": kid,
            "key": self.key,
            "signature_scheme": self.signature_scheme,
            **self.options,
        }


#: called with the kernel and each ``slurm`` event (queue state, job start, walltime warning)
SlurmListener = Callable[["KernelProcess", dict[str, Any]], None]


class KernelProcess:
    """The local view of one kernel supervised by a :class:`RemoteAgent`.

    State is local: :attr:`exit_code` is set from the agent's ``exited`` event
    (or :data:`LOST` if the agent went away), so polling costs no round trip.
    """

    def __init__(self, agent: RemoteAgent, kid: str) -> None:
        self.agent = agent
        self.kid = kid
        self.pid = 0
        self.pgid = 0
        self.run_dir = ""
        self.transport = ""
        self.endpoints: dict[str, Any] = {}
        #: where the kernel's tcp sockets listen, as seen from the remote host
        self.host = "127.0.0.1"
        self.launcher = "direct"
        #: the SLURM job as last reported: job_id, state, reason, node, waited, time_left
        self.slurm: dict[str, Any] = {}
        self.slurm_listeners: list[SlurmListener] = []
        self.argv: list[str] = []
        self.exit_code: int | None = None
        self.stderr_tail = ""
        self.persistent = False
        self.started = asyncio.Event()
        #: set once the kernel process runs: at once for direct kernels, when the job
        #: starts for SLURM kernels (or the kernel ended)
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

    # events from the agent
    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "started":
            self.pid = int(event["pid"])
            self.pgid = int(event["pgid"])
            self.run_dir = str(event["run_dir"])
            self.transport = str(event["transport"])
            self.endpoints = dict(event["endpoints"])
            self.argv = list(event.get("argv") or [])
            self.launcher = str(event.get("launcher") or "direct")
            if self.launcher == "slurm":
                self.slurm["job_name"] = event.get("job_name")
            else:
                self.running.set()
            self.started.set()
        elif kind == "slurm":
            self._on_slurm(event)
        elif kind == "ready":
            self.ready.set()
            self.reachable.set()
        elif kind == "exited":
            self._set_exit(int(event.get("code", LOST)), str(event.get("stderr_tail") or ""))
        elif kind == "error":
            self.error = self.agent.error_from_event(event)
            self._set_exit(int(event.get("code") or LOST), str(event.get("stderr_tail") or ""))
            self.stopped.set()  # the agent cleaned up a failed launch itself
        elif kind == "stopped":
            if self.exit_code is None:
                self._set_exit(LOST, "")
            self.stopped.set()

    def _set_exit(self, code: int, stderr_tail: str) -> None:
        if self.exit_code is None:
            self.exit_code = code
            self.stderr_tail = stderr_tail
        for event in (self.exited, self.started, self.running, self.ready, self.reachable):
            event.set()  # wake every waiter; they look at exit_code/error

    def _on_slurm(self, event: dict[str, Any]) -> None:
        if "endpoints" in event:
            self.endpoints = dict(event["endpoints"])
            self.host = str(event.get("host") or self.host)
            self.running.set()
        self.slurm.update(
            {k: v for k, v in event.items() if k not in ("v", "event", "kid", "endpoints")}
        )
        for listener in list(self.slurm_listeners):
            try:
                listener(self, event)
            except Exception:  # a logging hook must not break the event stream
                log.exception("[%s] SLURM event hook failed", self.agent.alias)

    def _restore(self, state: dict[str, Any]) -> None:
        """Adopt the agent's view after a (re)attach."""
        self.pid = int(state.get("pid") or self.pid or 0)
        self.pgid = self.pid
        self.run_dir = str(state.get("run_dir") or self.run_dir)
        self.transport = str(state.get("transport") or self.transport)
        self.endpoints = dict(state.get("endpoints") or self.endpoints)
        self.persistent = bool(state.get("persistent"))
        self.host = str(state.get("host") or self.host)
        self.launcher = str(state.get("launcher") or self.launcher)
        if self.launcher == "slurm":
            for key in ("job_id", "node", "host"):
                if state.get(key):
                    self.slurm[key] = state[key]
            if state.get("slurm_state"):
                self.slurm["state"] = state["slurm_state"]
        if self.launcher != "slurm" or state.get("host"):
            self.running.set()
        self.started.set()
        if state.get("exit_code") is not None:
            self._set_exit(int(state["exit_code"]), "")
        elif state.get("ready"):
            self.ready.set()
            self.reachable.set()

    def _on_agent_lost(self, error: SSHPykError) -> None:
        if self.error is None and not self.ready.is_set():
            self.error = error
        self._set_exit(LOST, "")
        self.stopped.set()

    # API
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

    def send_signal(self, signum: int) -> None:
        self.agent.send({"op": "signal", "kid": self.kid, "signum": int(signum)})

    async def stop(self, timeout: float = 10.0) -> None:
        """Kill the kernel's process group and remove its run dir; wait until done.

        While the link is down this returns at once: the agent reaps the kernel
        when the grace period ends without a reattach.
        """
        if self.stopped.is_set() or not self.agent.connected.is_set():
            self.agent.forget(self.kid)
            return
        started = time.monotonic()
        self.agent.send({"op": "stop", "kid": self.kid})
        try:
            await asyncio.wait_for(asyncio.shield(self.stopped.wait()), timeout)
        except asyncio.TimeoutError:
            log.warning(
                "[%s] kernel %s: no stop confirmation in %gs", self.agent.alias, self.kid, timeout
            )
        finally:
            self.agent.forget(self.kid)
        log.debug(
            "[%s] kernel %s stopped in %.3fs",
            self.agent.alias,
            self.kid,
            time.monotonic() - started,
        )


class RemoteAgent:
    """One agent process on the remote host, speaking the JSON line protocol.

    When the SSH link drops (the channel ends without an exit status), the agent
    keeps its kernels for ``grace`` seconds. Meanwhile this object waits for the
    session to reconnect, then reattaches through the agent's control socket (a
    small relay started over a new exec channel) and resynchronises kernel state.
    Kernels read as alive throughout; only when the grace period ends without a
    reattach are they declared lost.
    """

    def __init__(
        self,
        session: SSHSession,
        python: str,
        pre_command: str | None,
        *,
        grace: float,
        run_root: str | None,
    ) -> None:
        self.session = session
        self.alias = session.alias
        self.python = python
        self.pre_command = pre_command
        self.grace = grace
        self.run_root = run_root
        self.pid: int | None = None
        self.socket_path: str | None = None
        self.info: dict[str, Any] = {}
        self.process: asyncssh.SSHClientProcess[bytes] | None = None
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
        self._channel_tasks: list[asyncio.Task[None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._lost_error: SSHPykError | None = None
        self._closing = False
        #: we spawned it: closing tells it to stop (non-persistent) kernels
        self.owner = True
        self._slurm_loaded = False
        self._slurm_lock = asyncio.Lock()

    @property
    def alive(self) -> bool:
        return self.process is not None and not self.closed.is_set()

    # -- channels --------------------------------------------------------------------
    async def _open_channel(self, first_line: dict[str, Any]) -> dict[str, Any]:
        """Start the agent's loader over a new exec channel; return the agent's hello."""
        conn = await self.session.connection()
        command = remote_command(self.python, self.pre_command)
        try:
            process = await conn.create_process(command.command, encoding=None)
        except Exception as exc:
            raise translate_error(exc, self.alias) from exc
        self.process = process
        self._stderr = bytearray()
        self._channel_tasks = [asyncio.ensure_future(self._drain_stderr(process))]
        hello = json.dumps({"v": PROTOCOL, **first_line}).encode() + b"\n"
        process.stdin.write(command.stdin + agent_bundle() + hello)
        try:
            event = await asyncio.wait_for(self._read_first_event(), AGENT_START_TIMEOUT)
        except asyncio.TimeoutError:
            raise RequestTimeoutError(
                f"the remote agent on {self.alias!r} did not start within "
                f"{AGENT_START_TIMEOUT:g}s: the remote login shell or the pre-command hangs "
                "(see `sshpyk check`)"
            ) from None
        if event is None:
            raise await self._failure()
        if event.get("event") == "error":
            raise self.error_from_event(event)
        if event.get("event") != "hello":
            raise ProtocolError(f"unexpected first event from the agent: {event!r:.200}")
        self.pid = int(event["pid"])
        self.socket_path = event.get("socket") or self.socket_path
        self.info = event
        self._channel_tasks.append(asyncio.ensure_future(self._read_events(process)))
        self.connected.set()
        return event

    async def _close_channel(self) -> None:
        process, tasks = self.process, self._channel_tasks
        self._channel_tasks = []
        if process is not None:
            process.close()
        for task in tasks:
            if task is not asyncio.current_task():
                task.cancel()
        await asyncio.gather(
            *(t for t in tasks if t is not asyncio.current_task()), return_exceptions=True
        )

    async def start(self) -> None:
        """Spawn the agent and wait for its hello."""
        hello = {"op": "hello", "grace": self.grace, "run_root": self.run_root}
        try:
            await self._open_channel(hello)
        except BaseException:
            await asyncio.shield(self._close_channel())
            raise
        heartbeat = max(0.5, min(5.0, self.grace / 4)) if self.grace else 5.0
        self._tasks.append(asyncio.ensure_future(self._send_heartbeats(heartbeat)))
        log.debug("[%s] agent pid %s up (%s)", self.alias, self.pid, self.info.get("python"))

    @classmethod
    async def attach(
        cls,
        session: SSHSession,
        socket_path: str,
        python: str,
        pre_command: str | None = None,
        *,
        grace: float = 60.0,
    ) -> RemoteAgent:
        """Connect to an agent that already runs (e.g. one holding persistent kernels)."""
        agent = cls(session, python, pre_command, grace=grace, run_root=None)
        agent.socket_path = socket_path
        agent.owner = False  # closing only hangs up: the kernels belong to their owner
        try:
            await agent._open_channel({"op": "attach", "socket": socket_path})
        except BaseException:
            await asyncio.shield(agent._close_channel())
            raise
        heartbeat = max(0.5, min(5.0, grace / 4)) if grace else 5.0
        agent._tasks.append(asyncio.ensure_future(agent._send_heartbeats(heartbeat)))
        return agent

    async def _drain_stderr(self, process: asyncssh.SSHClientProcess[bytes]) -> None:
        with contextlib.suppress(Exception):
            while chunk := await process.stderr.read(4096):
                self._stderr += chunk
                del self._stderr[:-_STDERR_LIMIT]

    async def _read_first_event(self) -> dict[str, Any] | None:
        """The agent's first event. Login scripts may print text before the agent
        runs (a banner, ``echo`` in ~/.bashrc): such lines are skipped, boundedly."""
        skipped = 0
        while True:
            try:
                return await self._read_event()
            except ProtocolError:
                skipped += 1
                if skipped > _MAX_NOISE_LINES:
                    raise ProtocolError(
                        f"the remote shell on {self.alias!r} printed more than "
                        f"{_MAX_NOISE_LINES} lines before the agent started: make the login "
                        "scripts quiet for non-interactive shells"
                    ) from None

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
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._channel_tasks[0]), 1)
        status = self.process.exit_status
        stderr = self._stderr.decode("utf-8", "replace")
        if status == 127 or "not found" in stderr or "No such file" in stderr:
            return RemotePythonNotFoundError(
                f"remote python {self.python!r} not found on {self.alias!r}: "
                f"{_last_lines(stderr, 1) or f'exit status {status}'} (set --remote-python)"
            )
        if status is None and not stderr:
            return ConnectionLostError(f"the SSH connection to {self.alias!r} was lost")
        detail = _last_lines(stderr) or f"exit status {status}"
        return RemoteError(f"the remote agent on {self.alias!r} failed: {detail}")

    def error_from_event(self, event: dict[str, Any]) -> SSHPykError:
        cls = _ERROR_KINDS.get(str(event.get("kind")), RemoteError)
        message = f"{event.get('message')} on {self.alias!r}"
        tail = _last_lines(str(event.get("stderr_tail") or ""), 5)
        if tail:
            message += f"; kernel output: {tail}"
        return cls(message)

    async def _read_events(self, process: asyncssh.SSHClientProcess[bytes]) -> None:
        try:
            while (event := await self._read_event()) is not None:
                self._dispatch(event)
        except ProtocolError as exc:
            self._lost_error = exc
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
        log.warning(
            "[%s] link to the agent lost; %d kernel(s) kept for up to %gs while reconnecting",
            self.alias,
            len(self.kernels),
            self.grace,
        )
        self._tasks.append(asyncio.ensure_future(self._recover()))

    async def _recover(self) -> None:
        """Reconnect and reattach within the grace period, or declare the kernels lost."""
        started = time.monotonic()
        deadline = started + (self.grace or 60.0)
        attempt = 0
        error: SSHPykError = ConnectionLostError(f"the SSH connection to {self.alias!r} was lost")
        while not self._closing and time.monotonic() < deadline:
            attempt += 1
            try:
                remaining = max(0.5, deadline - time.monotonic())
                await self.session.reconnect(timeout=min(10.0, remaining))
                await asyncio.wait_for(self._reattach(), min(30.0, remaining))
            except _AgentGoneError as exc:
                error = exc
                break
            except (SSHPykError, asyncio.TimeoutError, OSError, asyncssh.Error) as exc:
                error = exc if isinstance(exc, SSHPykError) else ConnectionLostError(str(exc))
                await asyncio.sleep(min(0.5, 0.05 * 2**attempt))
                continue
            log.warning(
                "[%s] reattached to the agent after %.2fs (%d attempt(s))",
                self.alias,
                time.monotonic() - started,
                attempt,
            )
            return
        if not self._closing:
            log.error("[%s] kernels lost: %s", self.alias, error)
            self._give_up(error)

    async def _reattach(self) -> None:
        if not self.socket_path:
            raise _AgentGoneError(f"the agent on {self.alias!r} has no control socket")
        await self._close_channel()
        await self._open_channel({"op": "attach", "socket": self.socket_path})
        self.reattached += 1
        event = await self.request("state")
        states = {str(k["kid"]): k for k in event.get("kernels") or []}
        for kid, kernel in list(self.kernels.items()):
            if kid in states:
                kernel._restore(states[kid])
            else:
                kernel._on_agent_lost(
                    ConnectionLostError(f"kernel {kid} is gone from {self.alias!r}")
                )

    def _give_up(self, error: SSHPykError) -> None:
        self._lost_error = error
        self.connected.clear()
        self.closed.set()
        for kernel in list(self.kernels.values()):
            kernel._on_agent_lost(error)
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
                if event.get("event") == "error":
                    future.set_exception(self.error_from_event(event))
                else:
                    future.set_result(event)
            return
        kernel = self.kernels.get(str(event.get("kid")))
        if kernel is not None:
            kernel._on_event(event)

    async def _send_heartbeats(self, interval: float) -> None:
        while not self.closed.is_set():
            await asyncio.sleep(interval)
            self.send({"op": "ping"})

    def send(self, message: dict[str, Any]) -> None:
        if self.process is not None and self.connected.is_set():
            with contextlib.suppress(Exception):
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

    async def inspect(self, kernel_name: str) -> dict[str, Any]:
        """The remote kernelspec ``kernel_name`` (argv, display_name, language, ...)."""
        event = await self.request("inspect", kernel_name=kernel_name)
        return dict(event.get("kernelspec") or {})

    async def load_slurm(self) -> None:
        """Send the SLURM launcher's modules to the agent, once: agents that only run
        direct kernels never receive nor compile them."""
        async with self._slurm_lock:
            if not self._slurm_loaded:
                await self.request("load", name="slurm", modules=slurm_modules())
                self._slurm_loaded = True

    async def ps(
        self,
        run_root: str | None = None,
        *,
        slurm: bool = False,
        all_users: bool = False,
        timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ) -> list[dict[str, Any]]:
        """Every sshpyk kernel of this user on the host (any agent, any local process).

        Each entry: kernel_id, kernel_name, pid, alive, started (epoch), agent_pid,
        agent_alive, attached (a local side was heard within its grace), last_contact
        (epoch or None), persistent, transport, run_dir. SLURM kernels also have
        launcher ("slurm"), job_id, job_name, node, host and, with ``slurm`` (or once
        the agent runs SLURM kernels), slurm_state and slurm_reason from squeue.
        """
        if slurm:
            await self.load_slurm()
        event = await self.request("ps", run_root=run_root, all_users=all_users, timeout=timeout)
        return list(event.get("kernels") or [])

    async def kill(
        self,
        kernel_id: str | None = None,
        *,
        orphans: bool = False,
        run_root: str | None = None,
        slurm: bool = False,
        all_users: bool = False,
        timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ) -> list[dict[str, Any]]:
        """Kill one kernel (by id or unique id prefix) or every orphan; remove run dirs.
        With ``slurm`` the jobs of SLURM kernels are scancelled too.

        Only this remote user's kernels are touched; ``all_users`` (the remote user must
        be root) widens that to every user's. Each returned entry has ``killed`` (bool)
        and ``error`` (None, or why the kill or the removal failed)."""
        if not kernel_id and not orphans:
            raise ValueError("kill() needs a kernel_id or orphans=True")
        if slurm:
            await self.load_slurm()
        event = await self.request(
            "kill",
            kernel_id=kernel_id,
            orphans=orphans,
            run_root=run_root,
            all_users=all_users,
            timeout=timeout,
        )
        return list(event.get("kernels") or [])

    async def slurm_info(self, args: list[str] | None = None) -> dict[str, Any]:
        """SLURM as the agent sees it: version, srun's path, partitions; with ``args``,
        also whether ``srun --test-only ARGS`` accepts them (RemoteError if not)."""
        await self.load_slurm()
        event = await self.request("slurm_info", args=args)
        return {k: v for k, v in event.items() if k not in ("v", "event", "rid")}

    async def connection_info(self, kid: str) -> dict[str, Any]:
        """The remote connection file of a kernel of this agent (includes the key)."""
        event = await self.request("connection_info", kid=kid)
        return dict(event.get("info") or {})

    async def adopt(self, kid: str) -> KernelProcess:
        """Track a kernel this agent already runs (after :meth:`attach`)."""
        event = await self.request("state")
        for state in event.get("kernels") or []:
            if str(state.get("kid")) == kid:
                kernel = self.kernels[kid] = KernelProcess(self, kid)
                kernel._restore(state)
                return kernel
        raise RemoteError(f"no kernel {kid} in the agent on {self.alias!r}")

    async def launch(
        self, kid: str, request: LaunchRequest, *, on_slurm: SlurmListener | None = None
    ) -> KernelProcess:
        """Start a kernel; returns once its process exists (not yet ready; a SLURM
        kernel's job may still wait in the queue). ``on_slurm`` sees its SLURM events."""
        if not self.alive or not self.connected.is_set():
            raise self._lost_error or ConnectionLostError(f"the agent on {self.alias!r} is gone")
        if request.launcher == "slurm":
            await self.load_slurm()
        kernel = self.kernels[kid] = KernelProcess(self, kid)
        kernel.persistent = request.persistent
        if on_slurm is not None:
            kernel.slurm_listeners.append(on_slurm)
        self.send(request.message(kid))
        try:
            await kernel.wait_started()
        except BaseException:
            await asyncio.shield(kernel.stop())
            raise
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
                bye = await asyncio.wait_for(
                    self.request("shutdown", keep_persistent=keep_persistent), timeout
                )
                agent_exits = not bye.get("kept")
            except (SSHPykError, asyncio.TimeoutError):
                pass
            with contextlib.suppress(Exception):
                process.stdin.write_eof()
            if agent_exits:
                # the channel closes once the agent has cleaned up and exited
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(process.wait_closed(), timeout)
        self.connected.clear()
        await self._close_channel()
        if process is not None and agent_exits:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(process.wait_closed(), timeout)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.closed.set()


class _AgentGoneError(RemoteError):
    """The agent cannot be reattached: its kernels are lost."""


_ERROR_KINDS[Kind.AGENT_GONE] = _AgentGoneError

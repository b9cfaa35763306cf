"""Drives the remote agent (``bootstrap.py``) over an SSH exec channel.

The agent's source is sent on the channel's stdin to ``python -c <loader>``,
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
import shlex
import time
from dataclasses import asdict, dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

import asyncssh

from .errors import (
    ConnectionLostError,
    KernelStartError,
    ProtocolError,
    RemoteError,
    RemoteJupyterClientMissingError,
    RemoteKernelSpecNotFoundError,
    RemotePythonNotFoundError,
    SSHPykError,
    translate_error,
)

if TYPE_CHECKING:
    from .session import SSHSession

__all__ = ["LOST", "PROTOCOL", "KernelProcess", "LaunchRequest", "RemoteAgent", "remote_command"]

log = logging.getLogger("sshpyk")

PROTOCOL = 1
_BOOTSTRAP = resources.files("sshpyk").joinpath("bootstrap.py").read_bytes()
_STDERR_LIMIT = 8000
#: exit code reported when the agent's channel closed without an ``exited`` event
LOST = -1


def remote_command(python: str, pre_command: str | None = None) -> str:
    """The shell command that starts the agent with the remote Python.

    ``python`` is an executable (``python3``, ``/usr/bin/python3``) or an
    environment prefix such as ``/opt/conda/envs/x`` (then its ``bin/python``).
    """
    loader = (
        f"import sys;exec(compile(sys.stdin.buffer.read({len(_BOOTSTRAP)}),"
        "'sshpyk-bootstrap','exec'))"
    )
    if python.startswith("~/"):
        quoted = '"$HOME"/' + shlex.quote(python[2:])
    else:
        quoted = shlex.quote(python)
    lines = []
    if pre_command:
        lines.append(pre_command)
    if "/" in python:
        lines.append(f'p={quoted}; [ -d "$p" ] && p="$p/bin/python"')
        lines.append(f'exec "$p" -c {shlex.quote(loader)}')
    else:
        lines.append(f"exec {quoted} -c {shlex.quote(loader)}")
    return "\n".join(lines)


_ERROR_KINDS: dict[str, type[RemoteError]] = {
    "jupyter_client_missing": RemoteJupyterClientMissingError,
    "kernelspec_not_found": RemoteKernelSpecNotFoundError,
    "kernel_exited": KernelStartError,
    "protocol": ProtocolError,
    "not_found": RemoteError,
}


def _last_lines(text: str, count: int = 3) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-count:])


@dataclass
class LaunchRequest:
    kernel_name: str
    key: str
    signature_scheme: str = "hmac-sha256"
    transport: str = "auto"
    env: dict[str, str] | None = None
    cwd: str | None = None


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
        self.argv: list[str] = []
        self.exit_code: int | None = None
        self.stderr_tail = ""
        self.started = asyncio.Event()
        self.ready = asyncio.Event()
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
            self.started.set()
        elif kind == "ready":
            self.ready.set()
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
        for event in (self.exited, self.started, self.ready):
            event.set()  # wake every waiter; they look at exit_code/error

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
        """Kill the kernel's process group and remove its run dir; wait until done."""
        if self.stopped.is_set():
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
    """One agent process on the remote host, speaking the JSON line protocol."""

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
        self.info: dict[str, Any] = {}
        self.process: asyncssh.SSHClientProcess[bytes] | None = None
        self.kernels: dict[str, KernelProcess] = {}
        self.closed = asyncio.Event()
        self._stderr = bytearray()
        self._requests: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._rids = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self._lost_error: SSHPykError | None = None

    @property
    def alive(self) -> bool:
        return self.process is not None and not self.closed.is_set()

    async def start(self) -> None:
        """Spawn the agent and wait for its hello."""
        conn = await self.session.connection()
        command = remote_command(self.python, self.pre_command)
        try:
            self.process = await conn.create_process(command, encoding=None)
        except Exception as exc:
            raise translate_error(exc, self.alias) from exc
        self._tasks.append(asyncio.ensure_future(self._drain_stderr()))
        hello = {"v": PROTOCOL, "op": "hello", "grace": self.grace, "run_root": self.run_root}
        self.process.stdin.write(_BOOTSTRAP + json.dumps(hello).encode() + b"\n")
        try:
            event = await self._read_event()
            if event is None:
                raise await self._failure()
            if event.get("event") == "error":
                raise self.error_from_event(event)
            if event.get("event") != "hello":
                raise ProtocolError(f"unexpected first event from the agent: {event!r:.200}")
        except BaseException:
            await asyncio.shield(self.close())
            raise
        self.pid = int(event["pid"])
        self.info = event
        self._tasks.append(asyncio.ensure_future(self._read_events()))
        heartbeat = max(0.5, min(5.0, self.grace / 4)) if self.grace else 5.0
        self._tasks.append(asyncio.ensure_future(self._send_heartbeats(heartbeat)))
        log.debug("[%s] agent pid %s up (%s)", self.alias, self.pid, self.info.get("python"))

    async def _drain_stderr(self) -> None:
        assert self.process is not None
        with contextlib.suppress(Exception):
            while chunk := await self.process.stderr.read(4096):
                self._stderr += chunk
                del self._stderr[:-_STDERR_LIMIT]

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
        """The error to report when the agent ended without answering."""
        assert self.process is not None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.process.wait_closed(), 5)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._tasks[0]), 1)
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

    async def _read_events(self) -> None:
        try:
            while (event := await self._read_event()) is not None:
                self._dispatch(event)
            self._lost_error = await self._failure()
        except ProtocolError as exc:
            self._lost_error = exc
        finally:
            error = self._lost_error or ConnectionLostError(f"the agent on {self.alias!r} ended")
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
        if self.process is not None and not self.closed.is_set():
            with contextlib.suppress(Exception):
                self.process.stdin.write(json.dumps(message).encode() + b"\n")

    # requests
    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and wait for the event that answers it (matched by rid)."""
        if not self.alive:
            raise self._lost_error or ConnectionLostError(f"the agent on {self.alias!r} is gone")
        rid = next(self._rids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._requests[rid] = future
        self.send({"op": op, "rid": rid, **fields})
        try:
            return await future
        finally:
            self._requests.pop(rid, None)

    async def inspect(self, kernel_name: str) -> dict[str, Any]:
        """The remote kernelspec ``kernel_name`` (argv, display_name, language, ...)."""
        event = await self.request("inspect", kernel_name=kernel_name)
        return dict(event.get("kernelspec") or {})

    async def ps(self, run_root: str | None = None) -> list[dict[str, Any]]:
        """Every sshpyk kernel of this user on the host (any agent, any local process).

        Each entry: kernel_id, kernel_name, pid, alive, started (epoch), agent_pid,
        agent_alive, attached (a local side was heard within its grace), last_contact
        (epoch or None), persistent, transport, run_dir.
        """
        event = await self.request("ps", run_root=run_root)
        return list(event.get("kernels") or [])

    async def kill(
        self, kernel_id: str | None = None, *, orphans: bool = False, run_root: str | None = None
    ) -> list[dict[str, Any]]:
        """Kill one kernel (by id or unique id prefix) or every orphan; remove run dirs."""
        if not kernel_id and not orphans:
            raise ValueError("kill() needs a kernel_id or orphans=True")
        event = await self.request("kill", kernel_id=kernel_id, orphans=orphans, run_root=run_root)
        return list(event.get("kernels") or [])

    async def launch(self, kid: str, request: LaunchRequest) -> KernelProcess:
        """Start a kernel; returns once its process exists (not yet ready)."""
        if not self.alive:
            raise self._lost_error or ConnectionLostError(f"the agent on {self.alias!r} is gone")
        kernel = self.kernels[kid] = KernelProcess(self, kid)
        self.send({"op": "launch", "kid": kid, **asdict(request)})
        try:
            await kernel.wait_started()
        except BaseException:
            await asyncio.shield(kernel.stop())
            raise
        return kernel

    def forget(self, kid: str) -> None:
        self.kernels.pop(kid, None)

    async def close(self, timeout: float = 10.0, *, keep_persistent: bool = False) -> None:
        """Tell the agent the local side is leaving on purpose.

        It stops every kernel (but persistent ones if ``keep_persistent``), removes
        their run dirs and exits. Waits for that, bounded by ``timeout``. Without this
        (a crash, a lost link) the agent keeps the kernels for the grace period.
        """
        if self.process is not None:
            if not self.closed.is_set():
                self.send({"op": "shutdown", "keep_persistent": keep_persistent})
                with contextlib.suppress(Exception):
                    self.process.stdin.write_eof()
                if not keep_persistent:
                    # the channel closes once the agent has cleaned up and exited
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self.process.wait_closed(), timeout)
            self.process.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.process.wait_closed(), timeout)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.closed.set()

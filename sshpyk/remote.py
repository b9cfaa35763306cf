"""Drives the remote bootstrap (``bootstrap.py``) over an SSH exec channel.

The bootstrap's source is sent on the channel's stdin to ``python -c <loader>``,
followed by one JSON request line (which carries the HMAC key: never argv).
:func:`inspect_remote` asks about the remote Python and a kernelspec;
:class:`KernelProcess` is one running remote kernel and its supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shlex
import time
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

import asyncssh

from .errors import (
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

__all__ = ["PROTOCOL", "KernelProcess", "LaunchRequest", "inspect_remote", "remote_command"]

log = logging.getLogger("sshpyk")

PROTOCOL = 1
_BOOTSTRAP = resources.files("sshpyk").joinpath("bootstrap.py").read_bytes()
_STDERR_LIMIT = 8000
#: exit code of the bootstrap when the local side lost the link (no "exited" event)
LOST = -1


def remote_command(python: str, pre_command: str | None = None) -> str:
    """The shell command that starts the bootstrap with the remote Python.

    ``python`` is an executable (``python3``, ``/usr/bin/python3``) or an
    environment prefix such as ``/opt/conda/envs/x`` (then ``bin/python`` in it).
    """
    loader = "import sys;exec(compile(sys.stdin.buffer.read(%d),'sshpyk-bootstrap','exec'))" % len(
        _BOOTSTRAP
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
}


def _last_lines(text: str, count: int = 3) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-count:])


class _Bootstrap:
    """One run of the bootstrap: write the request, read JSON event lines."""

    def __init__(self, session: SSHSession, python: str, pre_command: str | None) -> None:
        self.session = session
        self.python = python
        self.pre_command = pre_command
        self.process: asyncssh.SSHClientProcess[bytes] | None = None
        self.stderr = bytearray()
        self._stderr_task: asyncio.Task[None] | None = None

    async def open(self, request: dict[str, Any]) -> None:
        conn = await self.session.connection()
        command = remote_command(self.python, self.pre_command)
        try:
            self.process = await conn.create_process(command, encoding=None)
        except Exception as exc:
            raise translate_error(exc, self.session.alias) from exc
        self._stderr_task = asyncio.ensure_future(self._drain_stderr())
        payload = json.dumps({"v": PROTOCOL, **request}).encode() + b"\n"
        self.process.stdin.write(_BOOTSTRAP + payload)

    async def _drain_stderr(self) -> None:
        assert self.process is not None
        with contextlib.suppress(Exception):
            while chunk := await self.process.stderr.read(4096):
                self.stderr += chunk
                del self.stderr[:-_STDERR_LIMIT]

    def send(self, message: dict[str, Any]) -> None:
        if self.process is not None and not self.process.stdin.is_closing():
            with contextlib.suppress(Exception):
                self.process.stdin.write(json.dumps(message).encode() + b"\n")

    async def read_event(self) -> dict[str, Any] | None:
        """The next event line, or None when the channel is closed."""
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
                f"unexpected output from the remote bootstrap on {self.session.alias!r}: "
                f"{line[:200]!r} (does the remote shell print something at login?)"
            ) from None
        if not isinstance(event, dict) or event.get("v") != PROTOCOL:
            raise ProtocolError(
                f"the remote bootstrap on {self.session.alias!r} speaks another protocol: "
                f"{line[:200]!r}"
            )
        return event

    async def failure(self) -> SSHPykError:
        """The error to report when the bootstrap ended without answering."""
        assert self.process is not None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.process.wait_closed(), 5)
        if self._stderr_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._stderr_task, 1)
        status = self.process.exit_status
        stderr = self.stderr.decode("utf-8", "replace")
        if status == 127 or "not found" in stderr or "No such file" in stderr:
            return RemotePythonNotFoundError(
                f"remote python {self.python!r} not found on {self.session.alias!r}: "
                f"{_last_lines(stderr, 1) or f'exit status {status}'} (set --remote-python)"
            )
        detail = _last_lines(stderr) or f"exit status {status}"
        return RemoteError(f"the remote bootstrap on {self.session.alias!r} failed: {detail}")

    def error_from_event(self, event: dict[str, Any]) -> SSHPykError:
        cls = _ERROR_KINDS.get(str(event.get("kind")), RemoteError)
        message = f"{event.get('message')} on {self.session.alias!r}"
        tail = _last_lines(str(event.get("stderr_tail") or ""), 5)
        if tail:
            message += f"; kernel output: {tail}"
        return cls(message)

    async def expect(self, *names: str) -> dict[str, Any]:
        event = await self.read_event()
        if event is None:
            raise await self.failure()
        if event.get("event") == "error":
            raise self.error_from_event(event)
        if event.get("event") not in names:
            raise ProtocolError(f"unexpected bootstrap event {event.get('event')!r}")
        return event

    async def close(self, timeout: float = 10.0) -> None:
        """End the run: EOF tells the supervisor the local side is done; it kills the
        kernel's process group, removes the run dir and exits, closing the channel."""
        if self.process is not None:
            with contextlib.suppress(Exception):
                self.process.stdin.write_eof()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.process.wait_closed(), timeout)
            self.process.close()
        if self._stderr_task is not None:
            self._stderr_task.cancel()
            with contextlib.suppress(BaseException):
                await self._stderr_task


async def inspect_remote(
    session: SSHSession, python: str, kernel_name: str | None, pre_command: str | None = None
) -> dict[str, Any]:
    """Ask the remote Python for its version, jupyter_client and a kernelspec."""
    boot = _Bootstrap(session, python, pre_command)
    try:
        await boot.open({"op": "inspect", "kernel_name": kernel_name})
        return await boot.expect("info")
    finally:
        await asyncio.shield(boot.close())


@dataclass
class LaunchRequest:
    kernel_name: str
    key: str
    signature_scheme: str = "hmac-sha256"
    transport: str = "auto"
    env: dict[str, str] | None = None
    cwd: str | None = None
    run_root: str | None = None
    grace: float = 60.0
    kernel_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"op": "launch", **self.__dict__}


class KernelProcess:
    """A kernel running on the remote host under its supervisor.

    State is local: :attr:`exit_code` is set from the supervisor's ``exited``
    event (or :data:`LOST` if the channel closed without one), so polling it
    costs nothing on the network.
    """

    def __init__(self, boot: _Bootstrap, started: dict[str, Any], heartbeat: float) -> None:
        self._boot = boot
        self.pid: int = started["pid"]
        self.pgid: int = started["pgid"]
        self.run_dir: str = started["run_dir"]
        self.transport: str = started["transport"]
        self.endpoints: dict[str, Any] = started["endpoints"]
        self.supervisor_pid: int | None = started.get("supervisor_pid")
        self.argv: list[str] = started.get("argv") or []
        self.exit_code: int | None = None
        self.stderr_tail = ""
        self.ready = asyncio.Event()
        self.exited = asyncio.Event()
        self._start_error: SSHPykError | None = None
        self._heartbeat = heartbeat
        self._tasks = [
            asyncio.ensure_future(self._read_events()),
            asyncio.ensure_future(self._send_heartbeats()),
        ]

    @classmethod
    async def start(
        cls,
        session: SSHSession,
        request: LaunchRequest,
        *,
        python: str = "python3",
        pre_command: str | None = None,
    ) -> KernelProcess:
        """Start the supervisor and kernel; returns once the kernel process exists."""
        boot = _Bootstrap(session, python, pre_command)
        try:
            await boot.open(request.to_json())
            started = await boot.expect("started")
        except BaseException:
            await asyncio.shield(boot.close())
            raise
        heartbeat = max(0.5, min(5.0, request.grace / 4)) if request.grace else 5.0
        return cls(boot, started, heartbeat)

    async def _read_events(self) -> None:
        try:
            while True:
                event = await self._boot.read_event()
                if event is None:
                    break
                kind = event.get("event")
                if kind == "ready":
                    self.ready.set()
                elif kind == "exited":
                    self.exit_code = int(event.get("code", LOST))
                    self.stderr_tail = str(event.get("stderr_tail") or "")
                elif kind == "error":
                    self._start_error = self._boot.error_from_event(event)
                    self.exit_code = int(event.get("code") or LOST)
        except ProtocolError as exc:
            self._start_error = exc
        finally:
            if self.exit_code is None:
                self.exit_code = LOST
                if not self.ready.is_set() and self._start_error is None:
                    self._start_error = await self._boot.failure()
            self.exited.set()
            self.ready.set()  # wake waiters; they check exit_code

    async def _send_heartbeats(self) -> None:
        while not self.exited.is_set():
            await asyncio.sleep(self._heartbeat)
            self._boot.send({"op": "ping"})

    async def wait_ready(self) -> None:
        """Wait until all five sockets are bound; raise if the kernel died first."""
        await self.ready.wait()
        if self.exit_code is not None:
            raise self._start_error or KernelStartError(
                f"the kernel exited with code {self.exit_code} during start"
            )

    def poll(self) -> int | None:
        return self.exit_code

    async def wait(self) -> int:
        await self.exited.wait()
        assert self.exit_code is not None
        return self.exit_code

    def send_signal(self, signum: int) -> None:
        self._boot.send({"op": "signal", "signum": int(signum)})

    async def stop(self, timeout: float = 5.0) -> None:
        """Kill the kernel's process group, remove its run dir, end the supervisor."""
        started = time.monotonic()
        if not self.exited.is_set():
            self._boot.send({"op": "stop"})
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.exited.wait()), timeout)
        await self.close()
        log.debug("stopped remote kernel pid %s in %.3fs", self.pid, time.monotonic() - started)

    async def close(self) -> None:
        """Close the channel; the supervisor cleans up on EOF. Waits for it to end."""
        await self._boot.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

"""Channels of one SSH connection relayed onto another (the connection broker's work).

:class:`ExecRelay` relays a session channel (exec, subsystem or shell): stdin, stdout,
stderr, EOF, signals and breaks, then the exit status or exit signal; when the upstream
channel ends without either (its connection dropped), the client's channel is closed
without one too, which sshpyk reads as a dropped link. :func:`open_stream` relays a
``direct-streamlocal`` or ``direct-tcpip`` channel through a pair of :class:`Pipe`
forwarders; an upstream ``ChannelOpenError`` reaches the client with its code and
reason. Every relayed channel has an 8 MiB window on both hops.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import asyncssh
from asyncssh import SSHForwarder

from ..tasks import TaskOwner
from .hosts import CHANNEL_WINDOW

__all__ = ["CHANNEL_WINDOW", "ExecRelay", "Pipe", "open_stream"]


_OPEN_FAILED = asyncssh.OPEN_CONNECT_FAILED

#: Returns the live upstream connection, or raises ChannelOpenError.
UpstreamGetter = Callable[[], asyncssh.SSHClientConnection]


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class Pipe(SSHForwarder):
    """One end of a relayed stream. Data for an end whose channel is not open yet (the
    client's, while the upstream opens) is held, and the other end paused, until it is."""

    def __init__(self, peer: Pipe | None = None) -> None:
        super().__init__(peer)
        self._held: list[bytes] = []
        self._held_eof = False

    def write(self, data: bytes) -> None:
        if self._transport is None:
            self._held.append(data)
            if self._peer is not None:
                self._peer.pause_reading()
            return
        super().write(data)

    def write_eof(self) -> None:
        if self._transport is None:
            self._held_eof = True
            return
        super().write_eof()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        held, self._held = self._held, []
        for data in held:
            super().write(data)
        if self._held_eof:
            super().write_eof()
        if held and self._peer is not None:
            self._peer.resume_reading()


class _UpstreamSession(asyncssh.SSHClientSession[bytes]):
    """The upstream half of a relayed session: what the host sends goes to the client."""

    def __init__(self, relay: ExecRelay) -> None:
        self._relay = relay
        self._status: int | None = None
        self._signal: tuple[str, bool, str, str] | None = None

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._relay.to_client(lambda chan: chan.write(data, datatype))

    def eof_received(self) -> bool:
        self._relay.to_client(lambda chan: chan.write_eof())
        return True

    def exit_status_received(self, status: int) -> None:
        self._status = status

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self._signal = (signal, core_dumped, msg, lang)

    def pause_writing(self) -> None:
        self._relay.to_client(lambda chan: chan.pause_reading())

    def resume_writing(self) -> None:
        self._relay.to_client(lambda chan: chan.resume_reading())

    def connection_lost(self, exc: Exception | None) -> None:
        status, sig = self._status, self._signal
        if status is not None:
            self._relay.to_client(lambda chan: chan.exit(status))
        elif sig is not None:
            self._relay.to_client(lambda chan: chan.exit_with_signal(*sig))
        else:  # no status: the client reads it as a dropped link, as it was upstream
            self._relay.to_client(lambda chan: chan.close())


class ExecRelay(asyncssh.SSHServerSession[bytes]):
    """A client's session channel (exec, subsystem or shell) relayed onto an upstream one.

    The upstream session can only be opened once the command is known, after the
    client's request was accepted; asyncssh resumes reading right after
    ``session_started``, so stdin that comes before the upstream is open is held here
    (and the client's channel paused) until it is.
    """

    def __init__(self, upstream: UpstreamGetter, tasks: TaskOwner, alias: str) -> None:
        self._upstream = upstream
        self._tasks = tasks
        self._alias = alias
        self._chan: asyncssh.SSHServerChannel[bytes] | None = None
        self._up: asyncssh.SSHClientChannel[bytes] | None = None
        self._command: str | None = None
        self._subsystem: str | None = None
        self._held: list[bytes] = []
        self._held_eof = False
        self._closed = False

    def to_client(self, action: Callable[[asyncssh.SSHServerChannel[bytes]], object]) -> None:
        if self._chan is not None and not self._closed:
            with contextlib.suppress(OSError):  # the client's channel closed meanwhile
                action(self._chan)

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:  # type: ignore[override]
        self._chan = chan

    def shell_requested(self) -> bool:
        return True

    def exec_requested(self, command: str) -> bool:
        self._command = command
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        self._subsystem = subsystem
        return True

    def session_started(self) -> None:
        self._tasks.create_task(self._open(), name="exec-relay")

    async def _open(self) -> None:
        assert self._chan is not None
        kwargs: dict[str, Any] = {"encoding": None, "window": CHANNEL_WINDOW}
        if self._subsystem is not None:
            kwargs["subsystem"] = self._subsystem
        env = self._chan.get_environment()
        if env:
            kwargs["env"] = dict(env)
        try:
            conn = self._upstream()
            up, _ = await conn.create_session(
                lambda: _UpstreamSession(self),
                self._command if self._command is not None else (),
                **kwargs,
            )
        except (asyncssh.Error, OSError) as exc:
            reason = exc.reason if isinstance(exc, asyncssh.Error) else _one_line(exc)
            line = f"sshpyk connection broker: cannot open a session on {self._alias!r}"
            message = f"{line}: {reason}\n".encode()
            self.to_client(lambda chan: chan.write_stderr(message))
            self.to_client(lambda chan: chan.exit(255))
            return
        if self._closed:
            up.close()
            return
        self._up = up
        held, self._held = self._held, []
        for data in held:
            up.write(data)
        if self._held_eof:
            up.write_eof()
        self._chan.resume_reading()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if self._up is None:
            self._held.append(data)
            assert self._chan is not None
            self._chan.pause_reading()
        else:
            self._up.write(data)

    def eof_received(self) -> bool:
        if self._up is None:
            self._held_eof = True
        else:
            self._up.write_eof()
        return True

    def signal_received(self, signal: str) -> None:
        if self._up is not None:
            self._up.send_signal(signal)

    def break_received(self, msec: int) -> bool:
        if self._up is not None:
            self._up.send_break(msec)
        return True

    def pause_writing(self) -> None:
        if self._up is not None:
            self._up.pause_reading()

    def resume_writing(self) -> None:
        if self._up is not None:
            self._up.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._up is not None:
            self._up.close()


async def open_stream(
    upstream: UpstreamGetter,
    opener: Callable[[asyncssh.SSHClientConnection, Callable[[], Pipe]], Awaitable[Any]],
    client_left: Callable[[], bool],
) -> Pipe:
    """The client's end of a stream that ``opener`` opens upstream (given the upstream
    connection and the factory of its end). Returned to asyncssh from a
    ``*_connection_requested`` handler, as the session of the client's channel."""
    client_end = Pipe()
    try:
        await opener(upstream(), lambda: Pipe(client_end))
    except asyncssh.ChannelOpenError:
        raise  # its code and reason go back to the client as they came
    except (asyncssh.Error, OSError) as exc:
        raise asyncssh.ChannelOpenError(_OPEN_FAILED, _one_line(exc)) from exc
    if client_left():  # while the upstream opened: asyncssh drops the client's channel
        client_end.close()
        raise asyncssh.ChannelOpenError(_OPEN_FAILED, "the client left")
    return client_end

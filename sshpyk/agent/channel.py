"""SocketChannel: a stream to an agent's control socket, in the shape of an exec channel.

A process that joins an agent (or reattaches to its own after a drop) opens a
``direct-streamlocal`` channel to the agent's control socket: sshd connects as the user,
and the agent accepts only its own uid. No remote Python starts for it (the exec
``attach`` relay costs a process start: 0.28 s on loopback). :class:`RemoteAgent` reads
it like its exec channel; it ends without an exit status, as a dropped link does.
"""

from __future__ import annotations

import asyncssh

__all__ = ["AgentChannel", "SocketChannel"]


class _NoStderr:
    """A socket has no stderr: read() is at its end at once."""

    async def read(self, n: int = -1) -> bytes:
        return b""


class SocketChannel:
    """The parts of an ``SSHClientProcess`` that :class:`RemoteAgent` uses."""

    exit_status: int | None = None
    exit_signal: tuple[str, bool, str, str] | None = None

    def __init__(self, reader: asyncssh.SSHReader[bytes], writer: asyncssh.SSHWriter[bytes]):
        self.stdout = reader
        self.stdin = writer
        self.stderr = _NoStderr()

    def close(self) -> None:
        self.stdin.close()

    async def wait_closed(self) -> None:
        await self.stdin.channel.wait_closed()


#: what RemoteAgent talks to its agent by: an exec channel, or a stream to its socket
AgentChannel = asyncssh.SSHClientProcess[bytes] | SocketChannel

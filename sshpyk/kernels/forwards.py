"""Local listeners forwarded to a remote kernel's five sockets.

A :class:`ForwardSet` binds one listener per ZMQ channel and keeps it for the life of
the set, so a restarted kernel keeps its local endpoints. By default (``transport
"ipc"``) the listeners are unix sockets ``k-1`` .. ``k-5`` in a private 0700 directory
of ours: no other local user can connect to them (ZMQ's iopub is not authenticated,
so anyone who can connect could read the kernel's code and output). jupyter_client
speaks ``transport: ipc``. With ``transport "tcp"`` they listen on 127.0.0.1 (port 0
the first time, then the same ports), for tools that only speak TCP.

Each accepted connection waits (buffering what the client sends) until the current
remote kernel is reachable, then becomes one of two kinds:

* by default, a stream of the kernel's resumable relay (:class:`_RelayClient` on a
  :class:`~sshpyk.kernels.link.KernelLink`, link.py): one SSH channel to the agent
  carries every connection of the kernel, and a dropped SSH link loses nothing: the
  client's socket stays open while the link reconnects;
* the fallback, when ``outage_buffer`` is 0 or the agent has no relay: a direct pipe
  (:class:`_DirectEnd` pair) to its own SSH channel, ``direct-streamlocal`` to the
  kernel's unix socket (ipc transport) or ``direct-tcpip`` to its port (tcp transport)
  on the kernel's host (loopback for a kernel next to the agent, the execution host's
  address for a batch kernel: sshd on the login node connects there). A dropped SSH
  link closes these; ZMQ reconnects.

Either way bytes flow both ways with flow control. Because the target is looked up per
connection, restarting the kernel only changes the target, and a dropped SSH link only
delays new connections until the kernel is reachable again: listeners and ports stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import socket
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ..agent.remote.protocol import CHANNELS
from ..agent.remote.zmtp import ZMTP_AHEAD, AheadStrip
from ..config import LOCAL_TRANSPORTS
from ..errors import SSHPykError, UnsafePathError
from ..localfs import make_private_dir, socket_base_dir
from ..ssh.hosts import CHANNEL_WINDOW
from ..tasks import TaskOwner
from .link import KernelLink, drop_ahead, open_ahead

if TYPE_CHECKING:
    from ..agent.process import KernelProcess
    from ..ssh.session import Session

__all__ = ["CHANNELS", "LOCAL_TRANSPORTS", "ForwardSet"]

log = logging.getLogger("sshpyk")


class _Accepted(asyncio.Protocol):
    """A client's connection, accepted before we know what it becomes: keeps what the
    client sends (and its EOF) until :meth:`bind` hands the socket to a
    :class:`_RelayClient` or a direct pipe's :class:`_DirectEnd`."""

    def __init__(self, on_close: Callable[[Any], None]) -> None:
        self.transport: Any = None
        self.on_close = on_close
        self.pending = bytearray()
        self.eof = False
        self.closed = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.pending += data

    def eof_received(self) -> bool:
        self.eof = True
        return True  # the kind we become decides: a direct pipe passes the half-close on

    def connection_lost(self, exc: BaseException | None) -> None:
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.on_close(self)
            if self.transport is not None:
                self.transport.close()

    def bind(self, handler: _RelayClient | _DirectEnd) -> None:
        """The socket's protocol is ``handler`` from now on; what came meanwhile goes
        to it first."""
        transport = self.transport
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self.pending:
            data = bytes(self.pending)
            self.pending.clear()
            handler.data_received(data)
        if self.eof and not handler.eof_received():
            handler.close()


class _RelayClient(asyncio.Protocol):
    """A client's socket relayed as one stream of the kernel's link (link.py's
    ``Client``): what the client sends is pushed on the link, what the link delivers is
    written to the socket and ACKed once written out (bytes written while the socket's
    buffer is over its high-water mark are ACKed once it drained)."""

    def __init__(self, link: KernelLink, channel: str, on_close: Callable[[Any], None]) -> None:
        self.link = link
        self.channel = channel
        self.on_close = on_close
        #: ZMTP's first bytes go ahead (agent/remote/zmtp.py): the kernel's, as every
        #: ZMTP 3 peer sends them, to the client at once; the client's dropped
        self.strip = AheadStrip() if link.ahead else None
        self.transport: Any = None
        self.sid = 0
        self.writing_paused = False
        self.unacked = 0  # bytes written while paused: ACKed on the link once drained
        self.closed = False

    # asyncio.Protocol
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.sid = self.link.add(self.channel, self, ahead=self.strip is not None)
        if self.strip is not None:
            transport.write(ZMTP_AHEAD)

    def data_received(self, data: bytes) -> None:
        if self.strip is not None and not self.strip.done:
            try:
                data = self.strip.feed(data)
            except ValueError as exc:
                log.warning("%s: a %s client: %s", self.link.label, self.channel, exc)
                self.transport.abort()
                return
            if not data:
                return
        self.link.from_client(self.sid, data, self)

    def eof_received(self) -> bool:
        return False  # ZMQ never half-closes: the connection ends

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.unacked:
            count, self.unacked = self.unacked, 0
            self.link.client_drained(self.sid, count)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.close()

    # link.Client
    def deliver(self, data: bytes) -> int:
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            return len(data)  # nobody to write to: as good as written
        transport.write(data)
        if self.writing_paused:
            self.unacked += len(data)
            return 0
        return len(data)

    def pause_reading(self) -> None:
        with contextlib.suppress(Exception):
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        with contextlib.suppress(Exception):
            self.transport.resume_reading()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.link.client_closed(self.sid)
        self.on_close(self)
        if self.transport is not None:
            self.transport.close()  # asyncio writes what is buffered first


class _DirectEnd(asyncio.Protocol):
    """One end of a direct pipe (the client's socket, or the SSH channel to the
    kernel's socket: asyncio's protocol and asyncssh's session interface). What arrives
    is written to the other end; an EOF half-closes it (the other direction stays open
    until both are done); back-pressure on one end pauses reading on the other."""

    def __init__(self, on_close: Callable[[Any], None] | None = None) -> None:
        self.transport: Any = None
        self.on_close = on_close
        self.peer: _DirectEnd | None = None
        self.closed = False

    @classmethod
    def pair(cls, on_close: Callable[[Any], None]) -> tuple[_DirectEnd, _DirectEnd]:
        """The client's end (``on_close`` when the pipe closes) and the channel's."""
        local, remote = cls(on_close), cls()
        local.peer, remote.peer = remote, local
        return local, remote

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def session_started(self) -> None:
        pass

    def data_received(self, data: bytes, datatype: Any = None) -> None:
        # the channel opens, then the client's socket is bound, before asyncssh reads
        # the channel: both ends have their transport whenever data arrives
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)

    def eof_received(self) -> bool:
        if self.peer is not None and self.peer.transport is not None:
            with contextlib.suppress(OSError):
                self.peer.transport.write_eof()
        return True  # keep the other direction open until both sides are done

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.on_close is not None:
            self.on_close(self)
        if self.transport is not None:
            self.transport.close()
        if self.peer is not None:
            self.peer.close()


#: what a ForwardSet holds of each client connection, to close it with the set
_Connection = _Accepted | _RelayClient | _DirectEnd


def _listening(path: str) -> bool:
    """Whether something accepts connections on the unix socket ``path`` (non-blocking:
    a full backlog counts as listening)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            return probe.connect_ex(path) in (0, errno.EAGAIN, errno.EINPROGRESS)
        except OSError:
            return False


class ForwardSet:
    """Five local listeners that follow the session's current kernel."""

    def __init__(
        self,
        session: Session,
        *,
        connect_timeout: float = 60.0,
        transport: str = "ipc",
        outage_buffer: float = 64.0,
    ) -> None:
        if transport not in LOCAL_TRANSPORTS:
            raise SSHPykError(f"local transport {transport!r} is not one of ipc, tcp")
        self.session = session
        self.connect_timeout = connect_timeout
        self.transport = transport
        #: what a connection file calls ``ip``: 127.0.0.1, or the unix socket path prefix
        #: (the sockets are ``{ip}-{port}``, ports 1 to 5)
        self.ip = "127.0.0.1"
        self.ports: dict[str, int] = {}
        #: the private directory of the unix sockets (ipc)
        self.directory: Path | None = None
        self._servers: dict[str, asyncio.AbstractServer] = {}
        self._inodes: dict[str, int] = {}
        #: one connect task per accepted connection
        self._tasks = TaskOwner(f"[{session.alias}] forwards")
        self._connections: set[_Connection] = set()
        self._process: KernelProcess | None = None
        #: MiB per kernel kept across an outage; 0: direct channels (no relay)
        self.outage_buffer = outage_buffer
        #: the resumable relay of the current kernel process (link.py)
        self._link: KernelLink | None = None
        #: (kid, the relay channel being opened ahead of that kernel's launch)
        self._ahead: tuple[str, asyncio.Future[Any]] | None = None
        self._closing_links = TaskOwner(f"[{session.alias}] closing links")
        self._retargeted = asyncio.Event()
        self._closed = False
        #: ipc on a prefix the caller chose (no private directory of ours)
        self._exact = False

    async def open(
        self, ports: dict[str, int] | None = None, *, ip: str | None = None, exact: bool = False
    ) -> dict[str, int]:
        """Bind the listeners and return the ports.

        tcp: on ``ports`` if given, else port 0; on ``ip`` with ``exact``, else
        127.0.0.1. ipc: in the private directory of ``ip`` (a socket path prefix from
        an earlier set, reused if it is still ours), else in a fresh one; with
        ``exact``, on ``{ip}-{port}`` as given (a client's connection file: the
        directory is the client's, only our sockets are removed on close). All or
        nothing: if one listener cannot be bound, none stays open and the set can be
        opened again (e.g. on fresh ports)."""
        if self._servers or self._closed:
            raise SSHPykError("these forwards are already open (or closed)")
        if self.transport == "ipc":
            await self._open_ipc(ip, ports if exact else None)
            return dict(self.ports)
        host = ip if exact and ip else "127.0.0.1"
        loop = asyncio.get_running_loop()
        servers: dict[str, asyncio.AbstractServer] = {}
        bound: dict[str, int] = {}
        try:
            for channel in CHANNELS:
                server = await loop.create_server(
                    partial(self._accept, channel),
                    host,
                    (ports or {}).get(channel, 0),
                    reuse_address=True,  # a respawn on the same ports (a client restart)
                )
                servers[channel] = server
                bound[channel] = server.sockets[0].getsockname()[1]
        except OSError as exc:
            for opened in servers.values():
                opened.close()
                await opened.wait_closed()
            raise SSHPykError(f"cannot listen on {host} for the kernel's channels: {exc}") from exc
        self._servers, self.ports, self.ip = servers, bound, host
        return dict(bound)

    async def _open_ipc(self, ip: str | None, exact_ports: dict[str, int] | None) -> None:
        """Listen in our private directory, or exactly on ``{ip}-{port}`` for the
        ``exact_ports`` a client chose (its directory: not ours to remove)."""
        if ip and exact_ports:
            self.ip, self.ports, self._exact = ip, dict(exact_ports), True
        else:
            directory = None
            if ip and os.path.basename(ip) == "k":
                with contextlib.suppress(UnsafePathError):
                    directory = make_private_dir(os.path.dirname(ip))
                if directory is not None and any(_listening(f"{ip}-{n}") for n in range(1, 6)):
                    directory = None  # another live set listens there: like taken ports
            if directory is None:
                directory = make_private_dir(parent=socket_base_dir())
            self.directory, self.ip = directory, str(directory / "k")
            self.ports = {channel: n for n, channel in enumerate(CHANNELS, start=1)}
        try:
            await self.rebind()
        except BaseException:
            await self._close_servers()
            self._remove_directory()
            raise

    def path(self, channel: str) -> str:
        """The unix socket of ``channel`` (ipc)."""
        return f"{self.ip}-{self.ports[channel]}"

    async def rebind(self) -> None:
        """(Re)create every unix listener whose socket file is gone or replaced.

        jupyter_client removes a kernel's ipc files when it shuts the kernel down, also
        on a restart: the provisioner calls this before the next start. tcp: no-op."""
        if self.transport != "ipc" or self._closed:
            return
        loop = asyncio.get_running_loop()
        for channel in CHANNELS:
            path = self.path(channel)
            try:
                inode = os.lstat(path).st_ino
            except FileNotFoundError:
                inode = None
            if channel in self._servers and inode == self._inodes.get(channel):
                continue
            old = self._servers.pop(channel, None)
            if old is not None:
                old.close()
            try:
                server = await loop.create_unix_server(partial(self._accept, channel), path)
            except OSError as exc:
                raise SSHPykError(
                    f"cannot listen on {path} for the kernel's {channel} channel: {exc}"
                ) from exc
            self._servers[channel] = server
            self._inodes[channel] = os.lstat(path).st_ino

    def set_target(self, process: KernelProcess) -> None:
        """Point new connections at ``process``; they wait while it is not reachable."""
        if process is not self._process:
            self._drop_link()
        self._process = process
        self._link_for(process)  # opened while the kernel starts: no round trips later
        self._retargeted.set()
        self._retargeted = asyncio.Event()

    def clear_target(self) -> None:
        self._process = None
        self._drop_link()

    def _drop_link(self) -> None:
        """Close the relay of the previous kernel process: its clients reconnect (ZMQ
        does by itself) and reach the next one."""
        link, self._link = self._link, None
        if link is not None:
            self._closing_links.create_task(link.aclose(), name="close-link")

    def open_ahead(self, relay: str | None, kid: str) -> None:
        """Open the relay channel of kernel ``kid`` to the agent's relay socket
        (``relay``, None if it has none) while its launch is in flight; its link takes
        it (:meth:`set_target`). One round trip less for a kernel that is there at once."""
        self.drop_ahead()
        if self.outage_buffer and relay and not self._closed:
            task = self._tasks.create_task(open_ahead(self.session, relay), name="relay-ahead")
            self._ahead = (kid, task)

    def drop_ahead(self) -> None:
        """The launch failed (or the next one is prepared): the channel goes."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            drop_ahead(ahead[1])

    def _link_for(self, process: KernelProcess) -> KernelLink | None:
        """The resumable relay to ``process`` (started on first use), or None for the
        direct channels (turned off, or an agent without one)."""
        if not self.outage_buffer or not process.relay:
            self.drop_ahead()
            return None
        if self._link is None or self._link.process is not process:
            self._drop_link()
            ahead = None
            if self._ahead is not None and self._ahead[0] == process.kid:
                ahead, self._ahead = self._ahead[1], None
            self.drop_ahead()
            budget = int(self.outage_buffer * (1 << 20))
            self._link = KernelLink(self.session, process, budget, ahead)
            self._link.start()
        return self._link

    def _accept(self, channel: str) -> _Accepted:
        accepted = _Accepted(on_close=self._connections.discard)
        self._connections.add(accepted)
        self._tasks.create_task(self._connect(channel, accepted), name=f"forward-{channel}")
        return accepted

    async def _target(self) -> KernelProcess | None:
        """The current kernel once reachable; None if it ended. Bounded by connect_timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        while True:
            process, retargeted = self._process, self._retargeted
            waiters = [asyncio.ensure_future(retargeted.wait())]
            if process is not None:
                waiters.append(asyncio.ensure_future(process.reachable.wait()))
            try:
                await asyncio.wait(
                    waiters,
                    timeout=max(0.0, deadline - loop.time()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                for waiter in waiters:
                    waiter.cancel()
            if process is not None and process is self._process and process.reachable.is_set():
                return None if process.exit_code is not None else process
            if loop.time() >= deadline:
                raise asyncio.TimeoutError

    async def _connect(self, channel: str, accepted: _Accepted) -> None:
        """Bind ``accepted`` to the current kernel once reachable: a relay stream, or a
        direct pipe to its own SSH channel."""
        try:
            process = await self._target()
            if process is None or accepted.closed:
                accepted.close()
                return
            link = self._link_for(process)
            if link is not None:
                self._bind(accepted, _RelayClient(link, channel, self._connections.discard))
                return
            conn = await self.session.connection()
            target = process.endpoints[channel]
            local, remote = _DirectEnd.pair(self._connections.discard)
            factory = cast(Any, lambda: remote)  # _DirectEnd speaks asyncssh's session API
            if process.transport == "ipc":
                await conn.create_unix_connection(factory, target, window=CHANNEL_WINDOW)
            else:
                await conn.create_connection(factory, process.host, target, window=CHANNEL_WINDOW)
            if accepted.closed:
                remote.close()
                return
            self._bind(accepted, local)
        except asyncio.CancelledError:
            accepted.close()
            raise
        except Exception as exc:
            log.debug("[%s] %s forward not connected: %r", self.session.alias, channel, exc)
            accepted.close()

    def _bind(self, accepted: _Accepted, handler: _RelayClient | _DirectEnd) -> None:
        self._connections.discard(accepted)
        self._connections.add(handler)
        accepted.bind(handler)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.drop_ahead()
        for server in self._servers.values():
            server.close()
        for task in self._tasks.tasks:
            task.cancel()
        for connection in list(self._connections):
            connection.close()
        self._connections.clear()
        self._drop_link()
        self._remove_directory()

    def _remove_directory(self) -> None:
        """Remove our unix sockets and their private directory (ipc)."""
        directory, self.directory = self.directory, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
        elif self._exact:
            for channel, inode in list(self._inodes.items()):
                with contextlib.suppress(OSError):
                    if os.lstat(self.path(channel)).st_ino == inode:
                        os.unlink(self.path(channel))

    async def _close_servers(self) -> None:
        servers, self._servers = list(self._servers.values()), {}
        for server in servers:
            server.close()
            await server.wait_closed()

    async def wait_closed(self) -> None:
        for server in self._servers.values():
            await server.wait_closed()
        await self._tasks.aclose()
        await self._closing_links.aclose()

    async def aclose(self) -> None:
        self.close()
        await asyncio.shield(self.wait_closed())

"""The local end of a kernel's resumable relay (the protocol: agent/remote/resume.py).

A :class:`KernelLink` carries every client connection of one remote kernel process
(the forwards' accepted sockets, each a stream) over one SSH ``direct-streamlocal``
channel to the kernel's ``r`` socket, where the agent holds the kernel-side
connections. When the SSH link drops, the client sockets stay open and what they send
waits in the link's queues; once the agent is reattached (the process is ``reachable``
again) a new channel resumes every stream where it stopped, both ways.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any, Protocol, cast

import asyncssh

from ..agent.remote.resume import Endpoint, FrameReader
from ..errors import SSHPykError
from ..ssh.hosts import CHANNEL_WINDOW
from ..tasks import TaskOwner

if TYPE_CHECKING:
    from ..agent.process import KernelProcess
    from ..ssh.session import Session

__all__ = ["KernelLink"]

log = logging.getLogger("sshpyk")

#: seconds a new link has for the agent's WELCOME
WELCOME_TIMEOUT = 10.0
#: seconds between DROPPED warnings in the log (the counts add up meanwhile)
_DROP_LOG_EVERY = 5.0


class Client(Protocol):
    """What a link needs of a client connection (forwards._RelayClient)."""

    def deliver(self, data: bytes) -> int:
        """Write ``data`` of the stream to the client's socket; returns how many bytes
        the link may ACK now (the rest: :meth:`KernelLink.client_drained` once the
        socket's paused buffer drained)."""
        ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None:
        """Close the socket once written; tells the link (:meth:`KernelLink.client_closed`)."""
        ...


class _Channel:
    """The SSH channel's session object: hands what arrives to the link (None while a
    channel opened ahead has no link yet: nothing arrives before its HELLO)."""

    def __init__(self, link: KernelLink | None) -> None:
        self.link = link
        self.ahead = link is None  # opened ahead, to the agent's relay socket
        self.chan: Any = None
        self.closed = asyncio.Event()
        self.paused = False

    def connection_made(self, chan: Any) -> None:
        self.chan = chan

    def session_started(self) -> None:
        pass

    def data_received(self, data: bytes, datatype: Any = None) -> None:
        if self.link is not None:
            self.link._on_link_data(self, data)

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.link is not None:
            self.link.flush()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed.set()
        if self.link is not None:
            self.link._on_link_lost(self)


async def _open_channel(session: Session, path: str, link: KernelLink | None) -> _Channel:
    """An SSH channel to the relay socket ``path`` (a kernel's ``r``, or the agent's)."""
    conn = await session.connection()
    channel = _Channel(link)
    await conn.create_unix_connection(cast(Any, lambda: channel), path, window=CHANNEL_WINDOW)
    return channel


async def open_ahead(session: Session, path: str) -> _Channel:
    """A channel to the agent's relay socket (``path``, its LinkDispatch), opened while
    a launch is in flight: the kernel's first link goes on it (its HELLO names the
    kernel), so a kernel that is there at once needs no channel open after ``started``."""
    return await asyncio.wait_for(_open_channel(session, path, None), WELCOME_TIMEOUT)


class KernelLink:
    """Every client connection to one kernel process, over resumable links."""

    def __init__(
        self,
        session: Session,
        process: KernelProcess,
        budget: int,
        ahead: asyncio.Future[_Channel] | None = None,
    ) -> None:
        self.session = session
        self.process = process
        #: the first link's channel, being opened to the agent's relay socket
        self._ahead = ahead
        #: the first link went on the channel opened ahead (and was welcomed on it)
        self.took_ahead = False
        self.core = Endpoint(budget)
        self.token = secrets.token_hex(16)
        self.clients: dict[int, Client] = {}
        self._channel: _Channel | None = None
        self._reader = FrameReader()
        self._welcomed = asyncio.Event()  # the current link's WELCOME came
        self._paused_clients: set[int] = set()
        self._tasks = TaskOwner(f"[{session.alias}] kernel link")
        self._closed = False
        self._down_since: float | None = None
        self._dropped = [0, 0]
        self._drop_logged = 0.0
        self.resumes = 0

    @property
    def label(self) -> str:
        return f"[{self.session.alias}] kernel {self.process.kid}"

    def start(self) -> None:
        self._tasks.create_task(self._run(), name="kernel-link")

    # -- clients ---------------------------------------------------------------------
    @property
    def ahead(self) -> bool:
        """The kernel's relay gives ZMTP's first bytes ahead (agent/remote/zmtp.py)."""
        return self.process.relay_ahead

    def add(self, channel: str, client: Client, ahead: bool = False) -> int:
        """A client of ``channel``; ``ahead``: it was given ZMTP_AHEAD and its own are
        dropped (so the agent does the same with the kernel)."""
        sid = self.core.new_stream(channel, ahead=ahead)
        self.clients[sid] = client
        return sid

    def from_client(self, sid: int, data: bytes, client: Client) -> None:
        self.core.push(sid, data)
        if self.core.full():
            client.pause_reading()
            self._paused_clients.add(sid)
        self.flush()

    def client_closed(self, sid: int) -> None:
        self.clients.pop(sid, None)
        self._paused_clients.discard(sid)
        self.core.push_close(sid)
        self.flush()

    def client_drained(self, sid: int, count: int) -> None:
        """``count`` bytes written to a client whose transport was paused went out."""
        self.core.written(sid, count)
        self.flush()

    # -- the link --------------------------------------------------------------------
    def flush(self) -> None:
        channel = self._channel
        if channel is None or channel.paused or not self.core.up or channel.chan is None:
            return
        data = self.core.outgoing()
        if data:
            channel.chan.write(data)
        if self._paused_clients and not self.core.full():
            for sid in list(self._paused_clients):
                client = self.clients.get(sid)
                if client is not None:
                    client.resume_reading()
            self._paused_clients.clear()

    def _on_link_data(self, channel: _Channel, data: bytes) -> None:
        if channel is not self._channel:
            return
        try:
            for kind, sid, payload in self._reader.feed(data):
                welcoming = self.core.awaiting_welcome
                for action in self.core.on_frame(kind, sid, payload):
                    self._act(action)
                if welcoming:
                    self._on_welcome()
        except ValueError as exc:
            log.warning("%s: relay link broken (%s); reconnecting it", self.label, exc)
            if channel.chan is not None:
                channel.chan.close()
            return
        self.flush()

    def _on_welcome(self) -> None:
        """The core took the link's WELCOME (and resumed the streams of a later link)."""
        self._welcomed.set()
        self.resumes += 1
        if self._down_since is not None:
            down = time.monotonic() - self._down_since
            log.info(
                "%s: link restored after %.2fs: %d byte(s) replayed to the kernel, "
                "%d byte(s) from it",
                self.label,
                down,
                self.core.queued,
                self.core.peer_pending,
            )
            self._down_since = None

    def _act(self, action: tuple[Any, ...]) -> None:
        kind = action[0]
        if kind == "data":
            sid, payload = action[1], action[2]
            client = self.clients.get(sid)
            written = len(payload) if client is None else client.deliver(payload)
            if written:
                self.core.written(sid, written)
        elif kind == "close":
            sid = action[1]
            client = self.clients.pop(sid, None)
            if client is not None:
                client.close()  # asyncio writes what is buffered first
            self.core.push_close(sid)
        elif kind == "dropped":
            info = action[1]
            self._dropped[0] += int(info.get("bytes") or 0)
            self._dropped[1] += int(info.get("messages") or 0)
            now = time.monotonic()
            if now - self._drop_logged >= _DROP_LOG_EVERY:
                self._drop_logged = now
                log.warning(
                    "%s: the outage buffer overflowed: dropped the %d oldest iopub "
                    "message(s), %.1f MiB of output (raise outage_buffer to keep more)",
                    self.label,
                    self._dropped[1],
                    self._dropped[0] / (1 << 20),
                )
                self._dropped = [0, 0]

    def _on_link_lost(self, channel: _Channel) -> None:
        if channel is not self._channel:
            return
        self._channel = None
        self.core.link_lost()
        if not self._closed and self._down_since is None:
            self._down_since = time.monotonic()
            log.info("%s: relay link down; the channels wait for a reconnect", self.label)

    async def _connect(self) -> _Channel:
        self._reader = FrameReader()
        self._welcomed = asyncio.Event()
        channel = await self._channel_ahead()
        if channel is None:
            if not self.process.relay:
                raise ConnectionError("the kernel has no relay socket")
            channel = await _open_channel(self.session, self.process.relay, self)
        self._channel = channel
        channel.chan.write(self.core.start_link(self.token, kid=self.process.kid))
        self.flush()  # the first link: what the clients sent follows the HELLO at once
        return channel

    async def _channel_ahead(self) -> _Channel | None:
        """The channel opened ahead, once (None if there is none or it failed: the
        kernel's own relay socket then)."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        try:
            channel = await ahead
        except (OSError, asyncio.TimeoutError, asyncssh.Error, SSHPykError) as exc:
            log.debug("%s: the relay channel opened ahead failed (%r)", self.label, exc)
            return None
        if channel.closed.is_set() or channel.chan is None:
            return None
        channel.link = self
        return channel

    async def _run(self) -> None:
        """Keep a link up while the kernel runs. A new link is tried as soon as the SSH
        connection is back (in parallel with the agent's reattach: the relay socket
        does not need it), and again with backoff from 0.05 s to 0.25 s."""
        process = self.process
        attempt = 0
        while not self._closed:  # ends when the kernel ends or the link is closed
            if process.exit_code is not None:
                break
            if not (process.reachable.is_set() or self.session.connected):
                # the agent's recovery reconnects: go as soon as it has (bounded wait)
                connected = self.session.wait_connected()
                waits = (process.reachable.wait(), process.exited.wait(), connected)
                await _first(*waits, asyncio.sleep(1.0))
                continue
            try:
                channel = await asyncio.wait_for(self._connect(), WELCOME_TIMEOUT)
                await asyncio.wait_for(self._until_welcomed(channel), WELCOME_TIMEOUT)
            except (OSError, asyncio.TimeoutError, asyncssh.Error, SSHPykError, ValueError) as exc:
                attempt += 1
                delay = min(0.25, 0.05 * 2 ** (attempt - 1))
                log.debug("%s: relay link not opened (%r); again in %.2fs", self.label, exc, delay)
                if self._channel is not None and self._channel.chan is not None:
                    self._channel.chan.close()
                await asyncio.sleep(delay)
                continue
            attempt = 0
            self.took_ahead = self.took_ahead or channel.ahead
            await channel.closed.wait()
        self._close_clients()

    async def _until_welcomed(self, channel: _Channel) -> None:
        await _first(self._welcomed.wait(), channel.closed.wait())
        if not self._welcomed.is_set() or channel.closed.is_set():
            raise ConnectionError("the relay link closed before WELCOME")

    def _close_clients(self) -> None:
        clients, self.clients = list(self.clients.values()), {}
        for client in clients:
            client.close()

    def close(self) -> None:
        self._closed = True
        drop_ahead(self._ahead)
        self._ahead = None
        channel, self._channel = self._channel, None
        if channel is not None and channel.chan is not None:
            channel.chan.close()
        self._close_clients()
        for task in self._tasks.tasks:
            task.cancel()

    async def aclose(self) -> None:
        self.close()
        await asyncio.shield(self._tasks.aclose())


async def _first(*aws: Any) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def drop_ahead(ahead: asyncio.Future[_Channel] | None) -> None:
    """A channel opened ahead that no link took: cancelled, or closed if it opened."""
    if ahead is None:
        return
    if not ahead.done():
        ahead.cancel()
    elif not ahead.cancelled() and ahead.exception() is None:
        chan = ahead.result().chan
        if chan is not None:
            chan.close()

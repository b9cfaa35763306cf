"""The relay's I/O, on one event loop: every relayed connection of every kernel in
this process costs no thread.

One :class:`IOLoop` per process (the agent, a batch kernel's node side) runs an asyncio loop
in one thread; :class:`Relay` drives one protocol core (resume.Endpoint: frames,
windows, acks, resumption; no I/O) over one link at a time and the sockets of its
streams, all as asyncio protocols on that loop. Three users:

- links.py, the agent's end of a kernel's resumable relay (the serving role: the
  local side OPENs streams, the relay connects to the kernel's sockets), one Relay
  per local side, resumed on every new link;
- node.py, a batch kernel's node side (the serving role, one link, no resumption: the
  authenticated TCP connection from the login node);
- relay.py's login side of a batch kernel (the opening role: connections accepted on
  the kernel's five relay sockets become streams).

Half-close, the one rule: a socket whose read side ends (EOF, error) makes its stream
send CLOSE (``push_close``) and reads no more; a CLOSE from the peer shuts the socket
down for writing once everything the peer sent before it is written (``write_eof``:
ZMQ then closes its end); the socket is closed once both halves are done. Bytes from
the peer for a socket that is gone count as written, so the peer's window never sticks.

Flow control: what a socket reads goes into the core's queues; past its budget the
relay stops reading every socket of that core until the link takes the queues below it
again. What arrives for a socket is ACKed as the socket's kernel buffer takes it (a
transport with a write buffer limit of 0: ``resume_writing`` means all written), so a
slow reader stalls only its own stream (the peer's window), never the link.

Everything here runs on the loop; other threads use :meth:`IOLoop.call` and
:meth:`IOLoop.run` (bounded).
"""

import asyncio
import json
import socket
import threading

from .paths import peer_credentials
from .resume import F_HELLO, FrameReader
from .zmtp import ZMTP_AHEAD, AheadStrip

#: seconds to connect to a kernel's socket
CONNECT_TIMEOUT = 10.0
#: the link's write buffer past which the relay stops taking frames out of the core
#: (what the core keeps is what it can resend, drop as a whole or count against budget)
LINK_HIGH_WATER = 1 << 20


class IOLoop:
    """The process's one event loop, in a thread of its own (``io``)."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="io", daemon=True)
        self.thread.start()

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def on_loop(self):
        return threading.current_thread() is self.thread

    def call(self, function, *args):
        """Run ``function(*args)`` on the loop, soon (thread safe; no waiting)."""
        self.loop.call_soon_threadsafe(function, *args)

    def call_later(self, delay, function, *args):
        """Run ``function(*args)`` on the loop in ``delay`` seconds (thread safe)."""
        self.loop.call_soon_threadsafe(self.loop.call_later, delay, function, *args)

    def run(self, coroutine, timeout):
        """Run ``coroutine`` on the loop and wait for its result, at most ``timeout``
        seconds (then it is cancelled and TimeoutError raised). Not from the loop."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise


_shared = []  # type: list
_shared_lock = threading.Lock()


def io_loop():
    """This process's IOLoop, started on first use."""
    with _shared_lock:
        if not _shared:
            _shared.append(IOLoop())
        return _shared[0]


class Tasks:
    """The tasks a relay or server started on the loop: kept (so none is collected
    while it runs) and cancelled together."""

    def __init__(self):
        self.tasks = set()

    def start(self, coroutine):
        task = asyncio.get_event_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def cancel(self):
        for task in list(self.tasks):
            task.cancel()


class Link(asyncio.Protocol):
    """A connection that carries frames (the relay link, the node connection): frames
    go to ``on_frames(link, frames)``, the end to ``on_lost(link)``; a broken stream of
    frames aborts it. ``relay``, once set, is flushed when the link drains."""

    def __init__(self, on_frames, on_lost):
        self.on_frames = on_frames
        self.on_lost = on_lost
        self.reader = FrameReader()
        self.transport = None
        self.relay = None
        self.paused = False
        self.lost = False
        self.timer = None  # the owner's timer while the link is being set up

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=LINK_HIGH_WATER)

    def data_received(self, data):
        try:
            frames = self.reader.feed(data)
            if frames:
                self.on_frames(self, frames)
        except (ValueError, TypeError, AttributeError, KeyError):
            self.abort()  # not a relay frame, or a peer that broke the protocol

    def eof_received(self):
        return False  # a link does not half-close: it ends

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        if self.relay is not None:
            self.relay.flush()

    def connection_lost(self, exc):
        self.lost = True
        self.on_lost(self)

    def write(self, data):
        if not self.lost and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def abort(self):
        if self.transport is not None:
            self.transport.abort()

    def peer_uid(self):
        """The connected peer's uid (SO_PEERCRED; None where it cannot be told)."""
        sock = self.transport.get_extra_info("socket") if self.transport else None
        creds = peer_credentials(sock) if sock is not None else None
        return creds[1] if creds is not None else None


def read_hello(frames):
    """The JSON of the HELLO that ``frames`` start with; ValueError if they do not."""
    kind, _, payload = frames[0]
    hello = json.loads(payload) if kind == F_HELLO else None
    if not isinstance(hello, dict) or not str(hello.get("session") or ""):
        raise ValueError("the first frame is not a HELLO")
    return hello


class StreamSocket(asyncio.Protocol):
    """The socket of one stream on this side (a connection to the kernel, or a client
    of the relay sockets), with the half-close rule of the module docstring."""

    def __init__(self, relay, sid, ahead=False):
        self.relay = relay
        self.sid = sid
        #: ZMTP's first bytes go ahead (zmtp.py): ours to the kernel at once, its own
        #: dropped; ``phantom``: ours still in the transport (not the peer's bytes)
        self.strip = AheadStrip() if ahead else None
        self.phantom = 0
        self.transport = None
        self.pending = []  # bytes from the peer before the socket was connected
        self.buffered = 0  # bytes handed to the transport, not yet known written
        self.read_done = False  # our socket's read side ended: CLOSE sent (or queued)
        self.write_done = False  # the peer's CLOSE arrived
        self.gone = False  # the socket is closed (or never connected)

    # -- asyncio ---------------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        if self.gone:  # the relay closed while this connected
            transport.abort()
            return
        transport.set_write_buffer_limits(high=0)  # resume_writing: all written
        if self.strip is not None:
            self.phantom = len(ZMTP_AHEAD)
            transport.write(ZMTP_AHEAD)
            self._account(len(ZMTP_AHEAD))
        if self.relay.reading_paused:
            transport.pause_reading()
        pending, self.pending = self.pending, []
        for data in pending:
            self.write(data)
        if self.write_done:
            self._write_eof()
        self.relay.flush()

    def data_received(self, data):
        if self.strip is not None and not self.strip.done:
            try:
                data = self.strip.feed(data)
            except ValueError:
                self.abort()  # not ZMTP 3: the greeting we gave it is wrong; it ends
                return
            if not data:
                return
        self.relay.from_socket(self.sid, data)

    def eof_received(self):
        self._read_ended()
        self._maybe_close()
        return True  # the other half stays open until the peer's CLOSE is written

    def resume_writing(self):
        if self.transport is not None:
            self._account(0)
        self.relay.flush()

    def pause_writing(self):
        pass  # ACKs wait for resume_writing

    def connection_lost(self, exc):
        self.gone = True
        self._read_ended()
        unwritten = self.buffered - self.phantom + sum(len(data) for data in self.pending)
        self.buffered, self.pending = 0, []
        if unwritten:  # never to be written: as it were
            self.relay.core.written(self.sid, unwritten)
        self.relay.socket_gone(self.sid)

    # -- from the relay ----------------------------------------------------------------
    def write(self, data):
        """Bytes from the peer, in order; ACKed (core.written) as the socket takes them."""
        if self.gone:
            self.relay.core.written(self.sid, len(data))
            return
        if self.transport is None:
            self.pending.append(data)
            return
        self.transport.write(data)
        self._account(len(data))

    def peer_closed(self):
        """The peer's CLOSE: no more bytes come; shut down writing once all is written."""
        self.write_done = True
        if self.gone:
            return
        if self.transport is not None:
            self._write_eof()

    def abort(self):
        self.gone = True
        if self.transport is not None:
            self.transport.abort()

    # -- the rule ------------------------------------------------------------------------
    def _account(self, added):
        """``added`` bytes went into the transport: ACK what left its buffer since."""
        left = self.transport.get_write_buffer_size()
        written = self.buffered + added - left
        self.buffered = left
        if self.phantom and written > 0:  # ours went first: not the peer's bytes
            ours = min(self.phantom, written)
            self.phantom -= ours
            written -= ours
        if written > 0:
            self.relay.core.written(self.sid, written)

    def _read_ended(self):
        if not self.read_done:
            self.read_done = True
            self.relay.socket_ended(self.sid)

    def _write_eof(self):
        try:
            if self.transport.can_write_eof():
                self.transport.write_eof()  # after the buffered bytes
            else:
                self.transport.close()
        except (OSError, RuntimeError):
            self.transport.abort()
        self._maybe_close()

    def _maybe_close(self):
        if self.read_done and self.write_done and self.transport is not None:
            self.transport.close()  # writes what is buffered first


class Relay:
    """One protocol core (resume.Endpoint) over its current link, with its streams'
    sockets. ``target(channel)``: for the serving role, where the kernel's ``channel``
    listens (a unix socket path, a port on 127.0.0.1, or a (host, port)); None for the
    opening role."""

    def __init__(self, core, target=None):
        self.core = core
        self.target = target
        self.link = None
        self.sockets = {}  # sid -> StreamSocket
        self.reading_paused = False
        self.closed = False
        self.tasks = Tasks()

    # -- the link ----------------------------------------------------------------------
    def attach(self, link):
        """``link`` is now the one this relay sends on (the caller did HELLO/WELCOME)."""
        self.link = link
        link.relay = self

    def welcome(self, link, hello, frames):
        """The serving role: ``link`` said HELLO (``hello``, its JSON, then
        ``frames``): answer WELCOME strictly first, then send what the peer lacks and
        take the frames that came with the HELLO. ValueError: a broken peer."""
        resend = hello.get("resend")
        if resend is not None and not isinstance(resend, dict):
            raise ValueError("a HELLO whose resend is not an object")
        actions = self.core.resume(hello.get("streams") or {}, resend=resend)
        link.write(self.core.welcome())
        self.attach(link)
        self.act(actions)
        self.feed(frames)

    def detach(self, link):
        """``link`` ended; True if it was the current one (the core then waits)."""
        if self.link is not link:
            return False
        self.link = None
        link.relay = None
        self.core.link_lost()
        return True

    def feed(self, frames):
        """Frames from the current link. ValueError: a broken peer (abort the link)."""
        for kind, sid, payload in frames:
            self.act(self.core.on_frame(kind, sid, payload))
        self.flush()

    def flush(self):
        """Send what is due on the link; resume reading once within budget again."""
        link = self.link
        if link is not None and not link.paused and not self.closed:
            data = self.core.outgoing()
            if data:
                link.write(data)
        if self.reading_paused and not self.core.full():
            self.reading_paused = False
            for sock in list(self.sockets.values()):
                if sock.transport is not None and not sock.gone:
                    sock.transport.resume_reading()

    def pending(self):
        """Bytes not yet delivered to the peer (queued, or sent and not acked)."""
        return any(s.queue or s.unacked for s in self.core.streams.values())

    # -- actions of the core -------------------------------------------------------------
    def act(self, actions):
        for action in actions:
            kind = action[0]
            if kind == "open":
                self._open(action[1], action[2], action[3])
            elif kind == "data":
                sock = self.sockets.get(action[1])
                if sock is not None:
                    sock.write(action[2])
                else:  # no socket (failed, or gone): written, as it were
                    self.core.written(action[1], len(action[2]))
            elif kind == "close":
                sock = self.sockets.get(action[1])
                if sock is not None:
                    sock.peer_closed()
                else:
                    self.core.push_close(action[1])
            # "dropped" (the serving side shed output): only the local side reports it

    def _open(self, sid, channel, ahead=False):
        """The serving role: connect ``sid`` to the kernel's ``channel``."""
        sock = self.sockets[sid] = StreamSocket(self, sid, ahead)
        self.tasks.start(self._connect(sock, channel))

    async def _connect(self, sock, channel):
        loop = asyncio.get_event_loop()
        try:
            target = self.target(channel)
            if isinstance(target, str):
                connecting = loop.create_unix_connection(lambda: sock, target)
            elif isinstance(target, tuple):  # (host, port): a web port (ports.py)
                connecting = loop.create_connection(lambda: sock, target[0], int(target[1]))
            else:
                connecting = loop.create_connection(lambda: sock, "127.0.0.1", int(target))
            await asyncio.wait_for(connecting, CONNECT_TIMEOUT)
        except (OSError, KeyError, ValueError, TypeError, asyncio.TimeoutError):
            sock.connection_lost(None)  # never connected: CLOSE, and what came is written
            self.flush()

    def add_socket(self, channel):
        """The opening role: a protocol for a connection accepted on ``channel``."""
        sid = self.core.new_stream(channel)
        sock = self.sockets[sid] = StreamSocket(self, sid)
        return sock

    # -- from the sockets ------------------------------------------------------------------
    def from_socket(self, sid, data):
        self.core.push(sid, data)
        if self.core.full() and not self.reading_paused:
            self.reading_paused = True
            for sock in list(self.sockets.values()):
                if sock.transport is not None and not sock.gone:
                    sock.transport.pause_reading()
        self.flush()

    def socket_ended(self, sid):
        self.core.push_close(sid)
        self.flush()

    def socket_gone(self, sid):
        self.sockets.pop(sid, None)
        self.flush()

    # -- the end -------------------------------------------------------------------------
    def close(self):
        """Close the link and every socket now (on the loop)."""
        self.closed = True
        self.tasks.cancel()
        link, self.link = self.link, None
        if link is not None:
            link.relay = None
            link.abort()
        for sock in list(self.sockets.values()):
            sock.abort()
        self.sockets.clear()


def set_nodelay(sock):
    if sock.family in (socket.AF_INET, getattr(socket, "AF_INET6", socket.AF_INET)):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

"""The resumable relay's protocol, without I/O: a kernel's channels between the local side
and the agent, kept whole across a dropped SSH link.

Every end uses it, and it is the one frame codec: the agent's end (links.py), the
local side (sshpyk/kernels/link.py), and both ends of a batch kernel's node connection
(relay.py, without resumption: one link); the I/O around it is relayio.py's (the
remote side) or asyncio's (the local side). Self-contained, stdlib only.

Why: without it each ZMQ connection is an SSH channel to the kernel's socket, and a dropped
link closes them; a ZMQ PUB drops what it sends to a peer that is gone, and a reply sent
while the link is down is lost. With it, the agent holds the kernel-side connections and
the local side the client-side ones; neither ZMQ peer sees a disconnect. Between them, one
link (an SSH ``direct-streamlocal`` channel to the kernel's ``r`` socket in its 0700 run
dir) carries frames, both ways::

    type (1 byte) | stream id (4 bytes, big endian) | length (4) | payload

    HELLO    local -> agent, first: JSON {"session": token, "streams": {sid: received},
             "resend": {sid: offset}} ("resend": only on a link that resends at once)
    WELCOME  agent -> local, the answer: JSON {"streams": {...}, "max_sid": n,
             "resend": true, ...} ("resend": this agent takes the resend at once)
    OPEN     local -> agent: a client connected to channel <payload> (shell, iopub...),
             "<channel> zmtp3": ZMTP's first bytes are given ahead (below)
    DATA     bytes of a stream, in order
    ACK      the receiver wrote <payload: 8 bytes, a total> bytes of the stream out
    CLOSE    the sender's socket ended: no DATA follows on the stream
    DROPPED  agent -> local: JSON {"bytes": n, "messages": m} of iopub dropped (overflow)

Every byte of a stream is kept by its sender until the peer ACKs it. A reconnect starts a
new link with HELLO/WELCOME, in which each side says how many bytes of each stream it has
received; each side then sends again what the other has not, and goes on: every byte
arrives in order, exactly once. The local side's first link has nothing to resume: its
frames follow the HELLO at once (one round trip less on every start), and the agent,
which answers HELLO with WELCOME strictly first, reads them as on any link. A later link
does the same once the agent said (``"resend": true`` in a WELCOME) that it takes it: the
local side sends again everything of each stream from the last byte the agent
confirmed (the HELLO's ``resend`` gives those offsets) without waiting for the WELCOME,
and the agent drops what it already has; the WELCOME then only confirms. A reconnect's
first request so needs one round trip less. A side
removes a stream once both CLOSEs are known and its bytes are acked; a stream the peer no
longer lists (and, for the agent, had opened) was removed by the peer, which happens only
once it had everything.

Flow control: at most WINDOW bytes of a stream are in flight (sent, not acked); ACKs go
out as the receiver writes to its socket. What a socket gives beyond that waits in the
stream's queue. Queues are bounded per session (``budget`` bytes): past it, the oldest
whole iopub messages that were never sent are dropped (the kernel's output during a long
outage; told with DROPPED), and if that is not enough the readers of the sockets wait
(ZMQ's own buffers then fill): shell, control, stdin and hb bytes are never dropped.
Whole messages are found by ZMTP 3 framing (:class:`ZmtpUnits`), so this works for any
ZMQ kernel, not only ipykernel.

ZMTP's first bytes go ahead (zmtp.py) on a stream whose OPEN has the ``zmtp3`` flag:
the local side sets it only for the kernel's ZMQ channels and only for an agent that
said it takes it (``relay_ahead`` in ``started``).
"""

import collections
import json
import struct

from .zmtp import AHEAD_FLAG, ZmtpUnits

F_HELLO, F_WELCOME, F_OPEN, F_DATA, F_ACK, F_CLOSE, F_DROPPED = range(1, 8)
HEAD = struct.Struct(">BII")
COUNT = struct.Struct(">Q")
#: largest frame accepted at all; anything bigger is corruption
MAX_FRAME = 1 << 22
#: largest DATA payload
CHUNK = 1 << 17
#: bytes of one stream in flight (sent, not acked): as the SSH channel's window, so a
#: long link is not capped by it (8 MiB at 100 ms RTT: up to ~80 MB/s)
WINDOW = 8 << 20
#: ACK once this much was written (or with any frame going out anyway)
ACK_EVERY = WINDOW // 4
#: the default outage buffer (the kernel config's ``outage_buffer``, MiB)
DEFAULT_BUDGET = 64 << 20
DROP_CHANNEL = "iopub"


def frame(kind, sid=0, payload=b""):
    return HEAD.pack(kind, sid, len(payload)) + payload


def json_frame(kind, value):
    return frame(kind, 0, json.dumps(value).encode())


class FrameReader:
    """Splits what a link delivers into frames; ValueError on a broken stream."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data):
        self.buf += data
        frames = []
        buf = self.buf
        pos = 0
        while len(buf) - pos >= HEAD.size:  # ends when the buffer holds no whole frame
            kind, sid, length = HEAD.unpack_from(buf, pos)
            if length > MAX_FRAME or not F_HELLO <= kind <= F_DROPPED:
                raise ValueError("not a relay frame (type %d, length %d)" % (kind, length))
            end = pos + HEAD.size + length
            if end > len(buf):
                break
            frames.append((kind, sid, bytes(buf[pos + HEAD.size : end])))
            pos = end
        del buf[:pos]
        return frames


class Stream:
    """One relayed connection, as one side sees it."""

    def __init__(self, sid, channel, units=None, ahead=False):
        self.sid = sid
        self.channel = channel
        self.ahead = ahead  # ZMTP_AHEAD is given ahead on this stream (the OPEN's flag)
        # outbound: our socket -> the peer
        self.base = 0  # bytes of ours the peer confirmed
        self.unacked = bytearray()  # sent on a link, not yet acked: [base, base + len)
        self.queue = collections.deque()  # [bytes, droppable], never sent
        self.queued = 0
        self.units = units  # ZmtpUnits of what our socket sends (iopub, at the agent)
        self.close_queued = False  # our socket ended: CLOSE once the queue is sent
        self.close_sent = False
        self.open_sent = False  # the local side: OPEN sent on the current link
        # inbound: the peer -> our socket
        self.received = 0  # bytes taken from links
        self.written = 0  # of those, written to our socket
        self.acked_out = 0  # the total we last ACKed
        self.close_received = False
        self.removed = False
        #: bytes ever sent (the highest offset): an ACK beyond it is corruption
        self.sent = 0
        #: the agent, on a link that resends at once: the offset of the next DATA (what
        #: is below ``received`` it already has); None: every DATA is new
        self.incoming = None

    def done(self):
        return (
            self.close_sent
            and self.close_received
            and not self.unacked
            and not self.queue
            and self.written == self.received
        )


class Endpoint:
    """One side of one session: its streams and the frames they need sent. Not thread
    safe: each side uses it from its event loop only.

    A link begins on the opening (local) side with :meth:`start_link` (its HELLO);
    the WELCOME that answers it is one more frame for :meth:`on_frame`, which resumes
    the streams. The agent answers a HELLO with :meth:`resume` and :meth:`welcome`.
    Either side calls :meth:`link_lost` when a link ends.

    Calls return actions, tuples for the I/O around it to carry out:
    ``("open", sid, channel, ahead)`` (the agent: connect to the kernel; ``ahead``:
    give it ZMTP_AHEAD first and drop the ones it sends), ``("data", sid, b)``
    (write to the socket), ``("close", sid)`` (close the socket once written),
    ``("dropped", info)`` (the local side: log it)."""

    def __init__(self, budget=DEFAULT_BUDGET, agent_side=False):
        self.budget = max(int(budget), 1 << 20)
        self.agent_side = agent_side
        self.streams = {}
        self.max_sid = 0  # the agent: the highest sid opened; the local side: allocated
        self.queued = 0  # bytes in every stream's queue
        self.up = False  # frames may go out on the current link
        self.links = 0  # the opening side: links started (start_link)
        self._welcome_due = False  # the opening side: this link's WELCOME has not come
        #: the bytes the agent had queued for us, from the last WELCOME ("pending")
        self.peer_pending = 0
        #: the opening side: the agent takes a resend that does not wait for WELCOME
        self.peer_resends = False
        self._early = False  # the opening side: this link resent before its WELCOME
        self._resend_from = {}  # the agent: sid -> the offset this link's DATA resumes at
        self.unreported = [0, 0]  # dropped since the last DROPPED frame
        self.acks_due = set()
        self.acks_urgent = False  # an ACK must go out even with nothing to carry it

    # -- from our sockets --------------------------------------------------------------------
    def new_stream(self, channel, ahead=False):
        """The local side: a client connected to ``channel``; returns its sid.
        ``ahead``: both ends give ZMTP_AHEAD to their peer (the OPEN says so)."""
        self.max_sid += 1
        sid = self.max_sid
        self.streams[sid] = Stream(sid, channel, ahead=ahead)
        return sid

    def push(self, sid, data):
        """Bytes our socket of ``sid`` gave."""
        stream = self.streams.get(sid)
        if stream is None or stream.close_queued or not data:
            return
        units = stream.units.feed(data) if stream.units is not None else [(bytes(data), False)]
        for chunk, droppable in units:
            stream.queue.append([chunk, droppable])
            stream.queued += len(chunk)
            self.queued += len(chunk)
        if self.queued > self.budget:
            self._shed()

    def push_close(self, sid):
        """Our socket of ``sid`` ended (EOF, error, or closed after the peer's CLOSE)."""
        stream = self.streams.get(sid)
        if stream is not None:
            if stream.units is not None and stream.units.held:
                held = bytes(stream.units.held)
                stream.units.held.clear()
                stream.queue.append([held, False])
                stream.queued += len(held)
                self.queued += len(held)
            stream.close_queued = True

    def full(self):
        """Readers of our sockets should wait (the queues are over budget)."""
        return self.queued > self.budget

    def _shed(self):
        """Drop the oldest whole iopub messages never sent until within budget."""
        for stream in self.streams.values():
            if stream.channel != DROP_CHANNEL or self.queued <= self.budget:
                continue
            kept = collections.deque()
            queue = stream.queue
            while queue and self.queued > self.budget:  # ends with the queue or the budget
                chunk, droppable = queue.popleft()
                if droppable:
                    stream.queued -= len(chunk)
                    self.queued -= len(chunk)
                    self.unreported[0] += len(chunk)
                    self.unreported[1] += 1
                else:
                    kept.append([chunk, droppable])
            kept.extend(queue)
            stream.queue = kept

    def written(self, sid, count):
        """``count`` bytes of ``sid`` from the peer were written to our socket. ACKs
        ride along with the next frames out; True if one should go now (a window's
        quarter is due, or the stream is closing)."""
        stream = self.streams.get(sid)
        if stream is None:
            return False
        stream.written += count
        self.acks_due.add(sid)
        urgent = stream.written - stream.acked_out >= ACK_EVERY or stream.close_received
        self.acks_urgent = self.acks_urgent or urgent
        return urgent

    # -- to the link -------------------------------------------------------------------------
    def outgoing(self):
        """The frames to send now (bytes, possibly empty); moves what they carry from the
        queues to the unacked buffers. Round robin, one chunk per stream per pass."""
        if not self.up:
            return b""
        out = []
        if self.unreported[0]:
            dropped, messages = self.unreported
            out.append(json_frame(F_DROPPED, {"bytes": dropped, "messages": messages}))
            self.unreported = [0, 0]
        busy = True
        while busy:  # ends when no stream can send more (window, empty queue)
            busy = False
            for stream in list(self.streams.values()):
                if not self.agent_side and not stream.open_sent:
                    stream.open_sent = True
                    name = stream.channel + (" " + AHEAD_FLAG if stream.ahead else "")
                    out.append(frame(F_OPEN, stream.sid, name.encode("ascii")))
                if stream.queue and len(stream.unacked) < WINDOW:
                    out.append(self._take(stream))
                    busy = True
                elif stream.close_queued and not stream.queue and not stream.close_sent:
                    stream.close_sent = True
                    out.append(frame(F_CLOSE, stream.sid))
        if out or self.acks_urgent:  # else ACKs wait for a frame to ride along with
            for sid in self.acks_due:
                stream = self.streams.get(sid)
                if stream is not None and stream.written > stream.acked_out:
                    stream.acked_out = stream.written
                    out.append(frame(F_ACK, sid, COUNT.pack(stream.written)))
            self.acks_due.clear()
            self.acks_urgent = False
        self._reap()
        return b"".join(out)

    def _take(self, stream):
        room = min(CHUNK, WINDOW - len(stream.unacked))
        entry = stream.queue[0]
        chunk = entry[0]
        if len(chunk) > room:
            piece, entry[0], entry[1] = chunk[:room], chunk[room:], False
        else:
            piece = chunk
            stream.queue.popleft()
        stream.queued -= len(piece)
        self.queued -= len(piece)
        stream.unacked += piece
        stream.sent = max(stream.sent, stream.base + len(stream.unacked))
        return frame(F_DATA, stream.sid, piece)

    def _confirm(self, stream, total):
        """The peer has ``total`` bytes of ``stream``: forget them (those sent again
        since a HELLO that resent at once may still be queued). An older total is
        stale news; one beyond what was ever sent is corruption."""
        if total > stream.sent:
            raise ValueError("ack of bytes never sent on stream %d" % stream.sid)
        confirm = total - stream.base
        if confirm <= 0:
            return
        stream.base = total
        take = min(confirm, len(stream.unacked))
        del stream.unacked[:take]
        confirm -= take
        while confirm:  # ends: confirm <= what the queue holds of the resent bytes
            entry = stream.queue[0]
            take = min(confirm, len(entry[0]))
            if take == len(entry[0]):
                stream.queue.popleft()
            else:
                entry[0] = entry[0][take:]
            stream.queued -= take
            self.queued -= take
            confirm -= take

    def _reap(self):
        for sid in [sid for sid, s in self.streams.items() if s.done()]:
            self.streams.pop(sid).removed = True

    # -- from the link -----------------------------------------------------------------------
    def on_frame(self, kind, sid, payload):
        """One frame of the current link; returns actions. ValueError: a broken peer."""
        if self._welcome_due:
            if kind != F_WELCOME:
                raise ValueError("the peer did not answer HELLO with WELCOME")
            return self._welcomed(payload)
        if kind == F_WELCOME:
            raise ValueError("a WELCOME that no HELLO asked for")
        stream = self.streams.get(sid)
        if kind == F_OPEN and self.agent_side:
            if sid <= self.max_sid:
                return []  # a repeat after a reconnect: we have it (or had it: removed)
            self.max_sid = sid
            channel, _, flag = payload.decode("ascii", "replace").partition(" ")
            ahead = flag == AHEAD_FLAG
            units = ZmtpUnits(ahead) if channel == DROP_CHANNEL else None
            stream = self.streams[sid] = Stream(sid, channel, units, ahead)
            stream.incoming = self._resend_from.get(sid)
            return [("open", sid, channel, ahead)]
        if kind == F_DROPPED:
            return [("dropped", json.loads(payload))]
        if stream is None:
            return []  # a stream removed on this side: late frames are dropped
        if kind == F_DATA:
            if stream.incoming is not None:  # sent again at once: drop what we have
                skip = stream.received - stream.incoming
                stream.incoming += len(payload)
                if skip < 0:
                    raise ValueError("a gap in the bytes sent again on stream %d" % sid)
                if skip >= len(payload):
                    return []
                payload = payload[skip:]
                stream.incoming = None  # caught up: the rest is new
            if stream.close_received:
                raise ValueError("data after close on stream %d" % sid)
            stream.received += len(payload)
            return [("data", sid, payload)]
        if kind == F_ACK:
            self._confirm(stream, COUNT.unpack(payload)[0])
            return []
        if kind == F_CLOSE:
            if stream.close_received:
                return []  # sent again after a reconnect
            stream.close_received = True
            return [("close", sid)]
        raise ValueError("unexpected frame type %d" % kind)

    # -- links -------------------------------------------------------------------------------
    def state(self):
        return {str(sid): s.received for sid, s in self.streams.items()}

    def start_link(self, token, kid=None):
        """The opening side (the local one) starts a new link: returns its HELLO, to send
        first. The first link has nothing to resume, so frames may follow the HELLO at
        once (``up``); a later one is up once its WELCOME has come (:meth:`on_frame`).
        ``kid``: the kernel, for a link to the agent's LinkDispatch (links.py)."""
        self.link_lost()
        self.links += 1
        self._welcome_due = True
        hello = {"session": token, "streams": self.state()}
        if kid:
            hello["kid"] = kid
        self._early = self.links > 1 and self.peer_resends
        if self._early:  # everything unconfirmed goes again, behind the HELLO
            hello["resend"] = {str(sid): self._rewind(s) for sid, s in self.streams.items()}
        self.up = self.links == 1 or self._early
        return json_frame(F_HELLO, hello)

    def _rewind(self, stream):
        """Queue again what ``stream`` sent and the peer did not confirm (and its
        CLOSE); returns the offset it starts at."""
        if stream.unacked:
            rest = bytes(stream.unacked)
            stream.unacked.clear()
            stream.queue.appendleft([rest, False])
            stream.queued += len(rest)
            self.queued += len(rest)
        stream.close_sent = False
        return stream.base

    @property
    def awaiting_welcome(self):
        """The current link's WELCOME has not come yet (after :meth:`start_link`)."""
        return self._welcome_due

    def _welcomed(self, payload):
        welcome = json.loads(payload)
        if not isinstance(welcome, dict):
            raise ValueError("a WELCOME that is not a JSON object")
        self._welcome_due = False
        self.peer_pending = int(welcome.get("pending") or 0)
        self.peer_resends = welcome.get("resend") is True
        if self.links == 1:
            # the first link sent right after its HELLO: the agent had nothing of this
            # session, and what went out since is in order behind the HELLO
            return []
        return self.resume(welcome.get("streams") or {}, welcome.get("max_sid"))

    def welcome(self):
        """The agent's answer to a HELLO (after :meth:`resume`), to send first."""
        return json_frame(
            F_WELCOME,
            {
                "streams": self.state(),
                "max_sid": self.max_sid,
                "pending": self.queued,
                "resend": True,
            },
        )

    def link_lost(self):
        self.up = False
        self._welcome_due = False
        self._resend_from = {}
        for stream in self.streams.values():
            stream.open_sent = False
            stream.incoming = None

    def resume(self, peer_streams, peer_max_sid=None, resend=None):
        """A new link is up: the peer holds ``peer_streams`` (sid -> bytes received). Send
        again what it lacks, forget what it removed. Returns actions (``close`` for the
        streams the peer removed). ``resend`` (the agent, from the HELLO): sid -> the
        offset at which the peer's DATA on this link starts (it did not wait for the
        WELCOME). On the opening side after such a link the WELCOME only confirms."""
        actions = []
        peer = {int(k): int(v) for k, v in peer_streams.items()}
        if resend is not None:
            self._resend_from = {int(k): int(v) for k, v in resend.items()}
            for sid, offset in self._resend_from.items():
                if sid in self.streams:
                    self.streams[sid].incoming = offset
        early, self._early = self._early, False
        for sid, stream in list(self.streams.items()):
            known = sid in peer
            if not known and (
                self.agent_side or (peer_max_sid is not None and sid <= peer_max_sid)
            ):
                # the peer removed it, having had everything: so do we
                self.streams.pop(sid).removed = True
                actions.append(("close", sid))
                continue
            got = peer[sid] if known else stream.base
            if early:  # it went again behind the HELLO: what the peer has is confirmed
                self._confirm(stream, got)
                continue
            # what the peer lacks goes again (all of it to an agent that never heard of
            # the stream: it gets an OPEN first), and so may the CLOSE
            confirm = got - stream.base
            if confirm < 0 or confirm > len(stream.unacked):
                raise ValueError("the peer claims bytes never sent on stream %d" % sid)
            del stream.unacked[:confirm]
            stream.base = got
            self._rewind(stream)
            stream.open_sent = known
        for stream in self.streams.values():
            if stream.received > stream.acked_out:
                self.acks_due.add(stream.sid)
                self.acks_urgent = True
        self.up = True
        return actions

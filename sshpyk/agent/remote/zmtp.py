"""ZMTP 3 as the relay sees it (resume.py): whole messages in what a kernel sends
(:class:`ZmtpUnits`, for dropping the oldest output in an outage) and the first bytes
of a greeting given ahead (:class:`AheadStrip`). Self-contained, stdlib only.

ZMTP's first bytes ahead: a ZMQ peer sends its signature, waits for the other's, sends
its major version, waits for the other's, and only then the rest of its greeting; over
the relay each wait is a round trip. Those 11 bytes are the same from every ZMTP 3 peer
(:data:`ZMTP_AHEAD`), so on a stream opened with the ``zmtp3`` flag each end of the
relay gives them to its own ZMQ peer at once and drops the ones its peer sends (checked
to be ZMTP 3's): the rest of both greetings crosses the link at once, one round trip
less for every ZMQ connection (a kernel's first reply, each reconnect of a client).
"""

#: a ZMQ message longer than this is passed on as it comes (no longer droppable)
MAX_HELD = 1 << 20
#: ZMTP 3's signature (0xff, 8 bytes of padding, 0x7f) and major version 3, as libzmq
#: sends them for a socket without a routing id: what every ZMTP 3 peer sends first
ZMTP_AHEAD = b"\xff" + bytes(7) + b"\x01\x7f\x03"
#: the OPEN payload's flag: ZMTP_AHEAD is given ahead on this stream
AHEAD_FLAG = "zmtp3"


class AheadStrip:
    """Drops the first len(ZMTP_AHEAD) bytes a ZMQ peer sends (the relay's other end
    gave its own to the far peer); ValueError if they are not ZMTP 3's."""

    def __init__(self):
        self.head = b""
        self.done = False

    def feed(self, data):
        """What of ``data`` follows the dropped bytes (b"" while they still come)."""
        if self.done:
            return data
        need = len(ZMTP_AHEAD) - len(self.head)
        self.head += bytes(data[:need])
        if len(self.head) < len(ZMTP_AHEAD):
            return b""
        self.done = True
        head = self.head
        if head[0] != 0xFF or not head[9] & 1 or head[10] < 3:
            raise ValueError("not a ZMTP 3 peer: its first bytes cannot be given ahead")
        return data[need:]


class ZmtpUnits:
    """Splits what a ZMQ peer sends (ZMTP 3) into units: (bytes, droppable). The
    greeting and commands are never droppable; a whole message is. Anything that is not
    ZMTP 3, and a message longer than MAX_HELD, passes on as it comes (not droppable)."""

    def __init__(self, ahead=False):
        self.held = bytearray()  # the current unit, not yet given out
        self.head = bytearray()  # the current frame's header, while incomplete
        self.body = 0  # bytes of the current frame's body still to come
        self.command = False  # the current frame is a command
        self.more = False  # the current frame is not the message's last
        self.greeted = False
        #: bytes of the greeting seen (``ahead``: its first bytes were dropped)
        self.greeting = len(ZMTP_AHEAD) if ahead else 0
        #: its first 11 bytes: the signature and the major version
        self.sniff = ZMTP_AHEAD if ahead else b""
        self.plain = False  # not ZMTP 3: no framing
        self.tainted = False  # the current message was passed on in part

    def feed(self, data):
        if self.plain:
            return [(bytes(data), False)] if data else []
        out = []
        view = memoryview(data)
        i = 0
        n = len(view)
        while i < n:  # ends once every byte of data is consumed
            if not self.greeted:
                # the greeting passes on as it comes: each peer sends its first bytes,
                # then waits for the other's (ZMTP 3 version negotiation)
                take = min(64 - self.greeting, n - i)
                piece = bytes(view[i : i + take])
                self.sniff += piece[: max(0, 11 - len(self.sniff))]
                self.greeting += take
                i += take
                out.append((piece, False))
                if len(self.sniff) >= 11 and (self.sniff[0] != 0xFF or self.sniff[10] < 3):
                    self.plain = True
                    if i < n:
                        out.append((bytes(view[i:]), False))
                    return out
                self.greeted = self.greeting == 64
                continue
            if self.body:
                take = min(self.body, n - i)
                self.held += view[i : i + take]
                i += take
                self.body -= take
                if self.body:
                    self._overlong(out)
                else:
                    self._frame_done(out)
                continue
            # a frame header: flags, then a size of 1 byte (short) or 8 (long)
            self.head.append(view[i])
            i += 1
            flags = self.head[0]
            size_len = 8 if flags & 0x02 else 1
            if len(self.head) < 1 + size_len:
                continue
            size = int.from_bytes(bytes(self.head[1:]), "big")
            self.held += self.head
            self.head.clear()
            self.command = bool(flags & 0x04)
            self.more = bool(flags & 0x01) and not self.command
            self.body = size
            if not size:
                self._frame_done(out)
        return out

    def _frame_done(self, out):
        if self.command:  # commands come between messages (ZMTP 3)
            out.append((bytes(self.held), False))
            self.held.clear()
        elif not self.more:
            out.append((bytes(self.held), not self.tainted))
            self.held.clear()
            self.tainted = False
        else:
            self._overlong(out)

    def _overlong(self, out):
        if len(self.held) > MAX_HELD:
            out.append((bytes(self.held), False))
            self.held.clear()
            self.tainted = True

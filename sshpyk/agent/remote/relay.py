"""The SLURM relay: the kernel's five channels between the login node and the compute
node, over one authenticated TCP connection per kernel, multiplexed.

Self-contained (stdlib only, no imports of the package); both ends use it: the node
side (node.py) accepts, the login side (slurm.py) connects.
"""

import collections
import hashlib
import hmac
import os
import socket
import struct
import threading
import time

# -- the relay: one authenticated TCP connection per kernel, multiplexed ----------------
#
# The kernel on the node binds only private sockets (ipc in the node's 0700 run dir, or
# tcp on 127.0.0.1), so nothing of it is reachable from the cluster network. Its five
# channels travel over one TCP connection from the login node's agent to the node side,
# which authenticates it before relaying a byte:
#
# - the login side draws a random secret per kernel and sends it in the ``node``
#   request over srun's stdin (never stored by SLURM, like the HMAC key);
# - the node side listens on its routable address, on an ephemeral port, and says
#   which in its ``node`` event (on srun's stdout);
# - on a connection it sends a challenge (RELAY_MAGIC + 32 random bytes); the peer
#   answers with 32 random bytes of its own and HMAC-SHA256(secret, "login" | both),
#   within RELAY_AUTH_TIMEOUT; the node answers HMAC(secret, "node" | both), which
#   the login side checks in turn (it talks to the node side, not to whoever bound
#   the port). A connection that fails is closed at once, nothing relayed; the first
#   that succeeds closes the listener, so the port is open only between the ``node``
#   event and the login side's connect (milliseconds), and the kernel's own sockets
#   never are. Both ends set TCP_NODELAY.
#
# Why not srun's stdin/stdout (measured, benchmarks/README.md): srun and slurmstepd
# forward a task's stdio over a TCP connection without TCP_NODELAY, so the second of two
# small writes in a row waits for the delayed ACK of the first (~40 ms on Linux), in
# either direction; a kernel's busy status, reply and idle status are three such writes.
# No srun option changes that (-u only ends slurmstepd's line buffering), and a burst
# cannot be coalesced into one write in general (the reply comes ~1 ms after the
# status). srun's stdio keeps the JSON control lines: the node request, its events,
# signal and stop requests, and its EOF still ends the node side.
#
# The traffic is plaintext on the cluster network, as SLURM's own I/O forwarding (and
# the HMAC-signed ZMQ messages of any remote kernel) is; what matters is that nobody
# without the secret can connect to a kernel socket. Frames, both ways:
#
#     type (1 byte) | stream id (4 bytes, big endian) | length (4) | payload
#
#     OPEN    login -> node: a connection was accepted on channel <payload> (shell...)
#     DATA    bytes of a stream
#     EOF     the sender will send no more DATA on the stream (a half-close)
#     CLOSE   the sender is done with the stream (both halves closed, or an error)
#     CREDIT  the receiver wrote <payload: 4 bytes> more bytes of the stream to its socket
#
# Flow control is per stream and credit based: a side may have at most RELAY_WINDOW
# bytes of a stream in flight (sent, not yet credited back). The reader of the mux
# connection therefore never blocks on a stream (it only appends to that stream's
# inbox, at most one window), so there is no head-of-line blocking between streams and
# no deadlock between the mux reader and a kernel socket: a stream whose peer stops
# reading (an iopub subscriber that fell behind) stalls only itself; its sender stops
# reading from the kernel's socket, which is what ZMQ sees on a slow tcp link too.
# Memory is bounded: per stream and direction one window, plus the socket buffers.

F_OPEN, F_DATA, F_EOF, F_CLOSE, F_CREDIT = range(1, 6)
_FRAME = struct.Struct(">BII")
_CREDIT = struct.Struct(">I")
#: bytes of one stream one side may have in flight before the other credits them back
RELAY_WINDOW = 1 << 20
#: largest DATA payload (one recv from a socket)
RELAY_CHUNK = 1 << 17
#: largest frame accepted at all; anything bigger is corruption
RELAY_MAX_FRAME = 1 << 22
#: credit back once this much was written (fewer, bigger CREDIT frames)
_CREDIT_BATCH = RELAY_WINDOW // 4
#: seconds a relay thread waits on its condition before looking at its flags again
_RELAY_TICK = 1.0
#: the node's challenge starts with this (a stray client sees what it reached)
RELAY_MAGIC = b"sshpyk-relay-1\n"
_NONCE = 32
#: seconds a connection has to authenticate (each one), and the login side to connect
RELAY_AUTH_TIMEOUT = 5.0
RELAY_CONNECT_TIMEOUT = 60.0


def _proof(secret, role, node_nonce, login_nonce):
    return hmac.new(secret, role + node_nonce + login_nonce, hashlib.sha256).digest()


def recv_exactly(sock, count):
    """``count`` bytes from ``sock`` (fewer only at EOF)."""
    chunks, got = [], 0
    while got < count:  # ends at count bytes or EOF (a timeout raises)
        chunk = sock.recv(count - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def relay_accept(listener, secret, deadline):
    """The node side: the first connection to ``listener`` that proves it knows
    ``secret`` (see "the relay"), with TCP_NODELAY; every other one is closed at once.
    Closes the listener either way; None if nobody authenticated before ``deadline``."""
    try:
        # ends at the deadline: every pass waits for, and times out, one connection
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            listener.settimeout(left)
            try:
                conn, _ = listener.accept()
            except OSError:  # the deadline, or run_node's shutdown of the listener
                return None
            try:
                conn.settimeout(RELAY_AUTH_TIMEOUT)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                node_nonce = os.urandom(_NONCE)
                conn.sendall(RELAY_MAGIC + node_nonce)
                answer = recv_exactly(conn, 2 * _NONCE)
                login_nonce = answer[:_NONCE]
                expected = _proof(secret, b"login", node_nonce, login_nonce)
                if len(answer) == 2 * _NONCE and hmac.compare_digest(answer[_NONCE:], expected):
                    conn.sendall(_proof(secret, b"node", node_nonce, login_nonce))
                    conn.settimeout(None)
                    return conn
            except OSError:
                pass
            conn.close()  # not the login side: nothing is relayed to it
    finally:
        listener.close()


def relay_connect(host, port, secret, timeout=RELAY_AUTH_TIMEOUT):
    """The login side: connect to the node side and authenticate both ways; raises
    OSError (ValueError for a peer that does not know the secret)."""
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        challenge = recv_exactly(sock, len(RELAY_MAGIC) + _NONCE)
        if len(challenge) != len(RELAY_MAGIC) + _NONCE or not challenge.startswith(RELAY_MAGIC):
            raise ValueError("not the node side of this kernel")
        node_nonce = challenge[len(RELAY_MAGIC) :]
        login_nonce = os.urandom(_NONCE)
        sock.sendall(login_nonce + _proof(secret, b"login", node_nonce, login_nonce))
        proof = recv_exactly(sock, 32)
        if not hmac.compare_digest(proof, _proof(secret, b"node", node_nonce, login_nonce)):
            raise ValueError("the node side did not prove it knows the relay secret")
        sock.settimeout(None)
        return sock
    except BaseException:
        sock.close()
        raise


class Mux:
    """One end of the multiplexed connection ``sock`` (authenticated, see "the relay").
    :meth:`send` writes one frame (thread safe, under ``lock``); :meth:`serve` reads
    frames until EOF. ``connect(channel)`` (the node side) opens a socket to the kernel
    for an OPEN; the login side opens streams itself (:meth:`open_stream`)."""

    def __init__(self, sock, connect=None):
        self.sock = sock
        self.connect = connect
        self.lock = threading.Lock()
        self.streams = {}
        self.streams_lock = threading.Lock()
        self.next_sid = 1
        self.closed = False

    def send(self, kind, sid, payload=b""):
        """Send one frame; False if the connection is closed (nothing is sent then)."""
        frame = _FRAME.pack(kind, sid, len(payload)) + payload
        with self.lock:
            if self.closed:
                return False
            try:
                self.sock.sendall(frame)
            except (OSError, ValueError):
                self.closed = True
                return False
        return True

    def open_stream(self, sock, channel):
        """The login side: a connection accepted on ``channel``'s socket."""
        with self.streams_lock:
            if self.closed:
                sock.close()
                return None
            sid = self.next_sid
            self.next_sid += 1
            stream = self.streams[sid] = Stream(self, sid, sock)
        if not self.send(F_OPEN, sid, channel.encode("ascii")):
            stream.abort(notify=False)
            return None
        stream.start()
        return stream

    def forget(self, sid):
        with self.streams_lock:
            self.streams.pop(sid, None)

    def serve(self):
        """Read frames until EOF or a broken frame, then :meth:`shutdown` and close the
        connection. Never blocks on a stream (see the credits above)."""
        try:
            read = self.sock.makefile("rb").read  # n bytes, fewer only at EOF
            while not self.closed:  # ends at EOF (shutdown makes one) or corruption
                head = read(_FRAME.size)
                if len(head) < _FRAME.size:
                    break
                kind, sid, length = _FRAME.unpack(head)
                if length > RELAY_MAX_FRAME:
                    break
                body = read(length)
                if len(body) != length:
                    break
                self.dispatch(kind, sid, body)
        except (OSError, ValueError):
            pass
        finally:
            self.shutdown()
            try:
                self.sock.close()
            except OSError:
                pass

    def dispatch(self, kind, sid, payload):
        with self.streams_lock:
            stream = self.streams.get(sid)
            if kind == F_OPEN and stream is None and self.connect is not None:
                stream = self.streams[sid] = Stream(self, sid)
                channel = payload.decode("ascii", "replace")
                stream.start(lambda: self.connect(channel))
                return
        if stream is None:
            return  # a stream one side closed already: its late frames are dropped
        if kind == F_DATA:
            stream.put(payload)
        elif kind == F_EOF:
            stream.put(None)
        elif kind == F_CREDIT and len(payload) == _CREDIT.size:
            stream.grant(_CREDIT.unpack(payload)[0])
        elif kind == F_CLOSE:
            stream.abort(notify=False)

    def shutdown(self):
        """The connection ended (or stop): close every stream, wake :meth:`serve`."""
        with self.lock:
            self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        with self.streams_lock:
            streams = list(self.streams.values())
            self.streams.clear()
        for stream in streams:
            stream.abort(notify=False)


class Stream:
    """One forwarded connection: a socket on this side, a stream id on the mux. Two
    threads: ``_outbound`` (socket -> DATA frames, within the credit the peer granted)
    and ``_inbound`` (the inbox of DATA frames -> socket, crediting back what it wrote).
    """

    def __init__(self, mux, sid, sock=None):
        self.mux = mux
        self.sid = sid
        self.sock = sock
        self.cond = threading.Condition()
        self.inbox = collections.deque()  # payloads; None for the peer's EOF
        self.queued = 0
        self.credit = RELAY_WINDOW
        self.closed = False
        self.connected = sock is not None
        self.halves = 0  # directions finished: at 2 the stream is done
        self.users = 2  # the threads still using the socket: the last one closes it

    def start(self, connect=None):
        for target, args in ((self._outbound, (connect,)), (self._inbound, ())):
            threading.Thread(target=target, args=args, daemon=True).start()

    # -- from the mux reader (must not block) --------------------------------------------
    def put(self, payload):
        with self.cond:
            if self.closed:
                return
            if payload is not None:
                self.queued += len(payload)
                if self.queued > RELAY_WINDOW:
                    overrun = True  # the peer ignored its credit
                else:
                    overrun = False
                    self.inbox.append(payload)
            else:
                overrun = False
                self.inbox.append(None)
            self.cond.notify_all()
        if overrun:
            self.abort()

    def grant(self, count):
        with self.cond:
            self.credit += count
            self.cond.notify_all()

    # -- the threads -------------------------------------------------------------------------
    def _outbound(self, connect):
        try:
            if connect is not None:
                try:
                    sock = connect()
                except (OSError, KeyError, ValueError):
                    self.abort()
                    return
                with self.cond:
                    self.sock, self.connected = sock, True
                    closed = self.closed
                    self.cond.notify_all()
                if closed:
                    return
            sock = self.sock
            while True:  # ends with the socket (EOF, error, or abort's shutdown)
                with self.cond:
                    while self.credit <= 0 and not self.closed:
                        self.cond.wait(_RELAY_TICK)
                    if self.closed:
                        return
                    size = min(self.credit, RELAY_CHUNK)
                try:
                    data = sock.recv(size)
                except OSError:
                    data = None
                if data is None:
                    self.abort()
                    return
                if not data:
                    break
                with self.cond:
                    self.credit -= len(data)
                if not self.mux.send(F_DATA, self.sid, data):
                    self.abort(notify=False)
                    return
            self.mux.send(F_EOF, self.sid)
            self._half_done()
        finally:
            self._release()

    def _inbound(self):
        unacked = 0
        try:
            with self.cond:
                while not self.connected and not self.closed:
                    self.cond.wait(_RELAY_TICK)
            while True:  # ends with the peer's EOF, or abort
                with self.cond:
                    while not self.inbox and not self.closed:
                        self.cond.wait(_RELAY_TICK)
                    if self.closed:
                        return
                    payload = self.inbox.popleft()
                if payload is None:
                    try:
                        self.sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    self._half_done()
                    return
                try:
                    self.sock.sendall(payload)
                except OSError:
                    self.abort()
                    return
                with self.cond:
                    self.queued -= len(payload)
                unacked += len(payload)
                if unacked >= _CREDIT_BATCH:
                    # in batches: the sender keeps at least RELAY_WINDOW - _CREDIT_BATCH
                    # of credit meanwhile
                    self.mux.send(F_CREDIT, self.sid, _CREDIT.pack(unacked))
                    unacked = 0
        finally:
            self._release()

    # -- the end -----------------------------------------------------------------------------
    def _half_done(self):
        with self.cond:
            self.halves += 1
            done = self.halves >= 2
        if done:
            # both directions finished; the peer finishes on its own (a CLOSE now could
            # make it drop the last bytes it has not written to its socket yet)
            self.abort(notify=False)

    def abort(self, notify=True):
        """Close the stream now (idempotent); ``notify``: send CLOSE to the peer."""
        with self.cond:
            if self.closed:
                return
            self.closed = True
            self.inbox.clear()
            sock = self.sock
            self.cond.notify_all()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in recv
            except OSError:
                pass
        self.mux.forget(self.sid)
        if notify:
            self.mux.send(F_CLOSE, self.sid)

    def _release(self):
        with self.cond:
            self.users -= 1
            last = self.users == 0
            sock = self.sock
        if last and sock is not None:
            try:
                sock.close()
            except OSError:
                pass


class RelaySockets:
    """The login node's end of a SLURM kernel's relay (a mixin of SlurmKernel): the
    authenticated connection to the node side, and the five unix sockets it serves
    (``endpoints``, in channel order) once the node is ready."""

    # -- the relay (threads) -------------------------------------------------------------
    def _connect_relay(self, host, port):
        """Connect and authenticate the node's relay connection (see "the relay"), then
        serve it until it ends: then every relayed connection is closed and the relay
        sockets stop accepting."""
        try:
            sock = relay_connect(host, port, self.relay_secret)
        except (OSError, ValueError) as exc:
            self.node_error = (
                "launch_failed",
                "cannot reach the node side of the kernel at %s:%s from the login node: %s"
                % (host, port, exc),
            )
            self.agent.events.put(("event", (self.kid, {"event": "relay_failed"})))
            return
        with self._cleanup_lock:
            if self.cleaned:
                sock.close()
                return
            self.mux = Mux(sock)
        self.agent.events.put(("event", (self.kid, {"event": "relay_up"})))
        try:
            self.mux.serve()
        finally:
            self.close_listeners()

    # -- the relay sockets here (threads) ----------------------------------------------------
    def listen(self):
        """Bind the five relay sockets (when the node is ready); False if impossible."""
        with self.listeners_lock:
            if self.listeners or self.mux is None or self.mux.closed:
                return bool(self.listeners)
            try:
                for path in self.endpoints.values():
                    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    self.listeners.append(listener)
                    listener.bind(path)
                    listener.listen(64)
                    listener.settimeout(_RELAY_TICK)
            except OSError as exc:
                self.node_error = ("launch_failed", "cannot listen on %s: %s" % (path, exc))
                for listener in self.listeners:
                    listener.close()
                self.listeners = []
                return False
            for channel, listener in zip(self.endpoints, self.listeners):
                threading.Thread(target=self._accept, args=(listener, channel), daemon=True).start()
        return True

    def _accept(self, listener, channel):
        mux = self.mux
        while not mux.closed:  # ends when the relay closes (checked every tick)
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return  # closed
            conn.settimeout(None)
            mux.open_stream(conn, channel)

    def close_listeners(self):
        with self.listeners_lock:
            listeners, self.listeners = self.listeners, []
        for listener in listeners:
            try:
                listener.close()
            except OSError:
                pass

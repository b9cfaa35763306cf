"""The agent's end of a kernel's resumable relay (the protocol: resume.py).

One :class:`LinkServer` per kernel listens on ``r`` in the kernel's 0700 run dir; the
local side reaches it through an SSH ``direct-streamlocal`` channel (sshd runs as this
user: SO_PEERCRED must say so). Each local side is a :class:`Session` (its HELLO names
it), which outlives its links: the kernel-side connections stay open and the kernel's
output waits in the session's queues until the next link resumes it. A session with no
link for ``link_grace`` seconds is closed.

Threads (none touches the agent's state): the accept loop; per link a reader (frames ->
the session) and a writer (the session's outgoing frames -> the link); per stream a
reader (the kernel's socket -> the session's queue) and a writer (what the local side
sent -> the kernel's socket). One condition per session guards its Endpoint.
"""

import collections
import json
import os
import socket
import threading
import time

from .paths import peer_credentials
from .resume import CHUNK, F_ACK, F_HELLO, WINDOW, Endpoint, FrameReader

#: seconds a new link has to send its HELLO
HELLO_TIMEOUT = 10.0
#: seconds to connect to a kernel's socket
CONNECT_TIMEOUT = 10.0
#: seconds a closing server waits for its links to deliver what is queued
FLUSH_WAIT = 1.0
_TICK = 1.0


def _shutdown(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class LinkServer:
    def __init__(self, path, connect, budget, link_grace):
        self.path = path
        self.connect = connect  # channel -> a connected socket to the kernel's channel
        self.budget = budget
        self.link_grace = link_grace
        self.sessions = {}
        self.lock = threading.Lock()
        self.closed = False
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
            listener.listen(8)
            listener.settimeout(_TICK)
        except OSError:
            listener.close()
            raise
        self.listener = listener
        threading.Thread(target=self._accept, name="links", daemon=True).start()

    def _accept(self):
        while not self.closed:  # ends when close() closes the listener
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                self._expire()
                continue
            except OSError:
                return
            creds = peer_credentials(conn)
            if creds is not None and creds[1] != os.getuid():
                conn.close()  # only this user's sshd may relay (the dir is 0700 too)
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _expire(self):
        now = time.monotonic()
        with self.lock:
            stale = [
                s for s in self.sessions.values() if s.lost_at and now - s.lost_at > self.link_grace
            ]
            for session in stale:
                self.sessions.pop(session.token, None)
        for session in stale:
            session.close()

    def _serve(self, conn):
        reader = FrameReader()
        frames = []
        conn.settimeout(HELLO_TIMEOUT)
        try:
            while not frames:  # ends at the first frame, EOF or the timeout
                data = conn.recv(CHUNK)
                if not data:
                    raise OSError("closed before HELLO")
                frames = reader.feed(data)
            kind, _, payload = frames.pop(0)
            hello = json.loads(payload) if kind == F_HELLO else None
            token = str(hello["session"]) if isinstance(hello, dict) else ""
            if not token:
                raise ValueError("the first frame is not a HELLO")
            conn.settimeout(None)
        except (OSError, ValueError, KeyError):
            conn.close()
            return
        with self.lock:
            if self.closed:
                conn.close()
                return
            session = self.sessions.get(token)
            if session is None:
                session = self.sessions[token] = Session(self, token)
        session.serve(conn, reader, frames, hello)

    def close(self, flush=FLUSH_WAIT):
        """Stop accepting; give the links up to ``flush`` seconds to deliver what is
        queued (the kernel's last output), then close every session."""
        self.closed = True
        try:
            self.listener.close()
        except OSError:
            pass
        try:
            os.unlink(self.path)
        except OSError:
            pass
        with self.lock:
            sessions = list(self.sessions.values())
            self.sessions.clear()
        deadline = time.monotonic() + flush
        for session in sessions:
            session.flush(deadline)
            session.close()


class Session:
    def __init__(self, server, token):
        self.server = server
        self.token = token
        self.core = Endpoint(server.budget, agent_side=True)
        self.cond = threading.Condition()
        self.link = None
        self.generation = 0
        self.lost_at = None
        self.closed = False
        self.socks = {}  # sid -> the kernel-side socket
        self.inboxes = {}  # sid -> deque of bytes from the local side (None: its CLOSE)
        self.busy = set()  # sids whose writer is writing an item it took
        self.waiting = 0  # threads waiting for the queues to drain (readers, flush)
        #: held while taking frames and sending them: whoever has something to send
        #: sends it (no hand-off to the link writer on the way of a reply)
        self.send_lock = threading.Lock()

    # -- links -------------------------------------------------------------------------
    def serve(self, conn, reader, frames, hello):
        """Serve a new link (its HELLO read) until it ends; replaces the current one."""
        # WELCOME goes out before any other frame of this link: under send_lock
        with self.send_lock:
            with self.cond:
                if self.closed:
                    conn.close()
                    return
                old = self.link
                self.core.link_lost()
                try:
                    actions = self.core.resume(hello.get("streams") or {})
                except ValueError:
                    conn.close()
                    return
                welcome = self.core.welcome()
                self.generation += 1
                generation = self.generation
                self.link, self.lost_at = conn, None
                self.cond.notify_all()
            try:
                conn.sendall(welcome)
            except OSError:
                pass
        if old is not None:
            _shutdown(old)
        self._act(actions)
        self._send_now(conn)  # what the peer lacks, at once
        threading.Thread(target=self._write_link, args=(conn, generation), daemon=True).start()
        try:
            self._act(self._frames(frames))
            while True:  # ends at EOF, an error, or a replacing link's shutdown
                data = conn.recv(CHUNK)
                if not data:
                    break
                self._act(self._frames(reader.feed(data)))
        except (OSError, ValueError):
            pass
        finally:
            with self.cond:
                if self.generation == generation:
                    self.core.link_lost()
                    self.link, self.lost_at = None, time.monotonic()
                self.cond.notify_all()
            _shutdown(conn)
            conn.close()

    def _frames(self, frames):
        actions = []
        opened = False
        with self.cond:
            for kind, sid, payload in frames:
                stream = self.core.streams.get(sid) if kind == F_ACK else None
                full = stream is not None and len(stream.unacked) >= WINDOW
                actions.extend(self.core.on_frame(kind, sid, payload))
                opened = opened or (full and len(stream.unacked) < WINDOW)
        if opened:
            self._send_now()  # an ACK reopened a full window: this thread sends
        return actions

    def _write_link(self, conn, generation):
        """The fallback sender, each tick or wake-up: whatever the threads that send
        themselves (readers, ACKs reopening a window, a resume) left due."""
        while True:  # ends when the link is replaced or lost, or the session closes
            with self.cond:
                if self.closed or self.generation != generation or self.link is not conn:
                    return
                self.cond.wait(_TICK)
            if not self._send_now(conn):
                return

    def _send_now(self, conn=None):
        """Take the frames due and send them on the link; False if the link failed."""
        conn = conn or self.link
        if conn is None:
            return False
        with self.send_lock:
            with self.cond:
                if self.link is not conn:
                    return False
                data = self.core.outgoing()
                if data and self.waiting:
                    self.cond.notify_all()  # readers waiting for room, flush()
            if data:
                try:
                    conn.sendall(data)
                except OSError:
                    _shutdown(conn)  # the reader notices and marks the link lost
                    return False
        return True

    # -- streams -----------------------------------------------------------------------
    def _act(self, actions):
        for action in actions:
            kind, sid = action[0], action[1]
            if kind == "open":
                with self.cond:
                    self.inboxes[sid] = collections.deque()  # filled while connecting
                threading.Thread(target=self._open, args=(sid, action[2]), daemon=True).start()
            elif kind == "data":
                self._inbox(sid, action[2])
            elif kind == "close":
                self._inbox(sid, None)

    def _inbox(self, sid, item):
        with self.cond:
            inbox = self.inboxes.get(sid)
            sock = self.socks.get(sid)
            direct = (
                item is not None
                and inbox is not None
                and not inbox
                and sock is not None
                and sid not in self.busy
            )
            if direct:
                self.busy.add(sid)  # the writer is idle: this thread writes (no hand-off)
            elif inbox is None:
                if item is not None:  # no socket (failed, or gone): written, as it were
                    self.core.written(sid, len(item))
            else:
                inbox.append(item)
                sock = None
                self.cond.notify_all()
        if direct:
            try:
                sent = sock.send(item, socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = len(item)  # the socket is gone: the reader ends the stream
            with self.cond:
                self.busy.discard(sid)
                if sent < len(item) and sid in self.inboxes:
                    self.inboxes[sid].appendleft(item[sent:])
                    self.cond.notify_all()
                now = self.core.written(sid, sent)
            if now:
                self._send_now()
            return
        if item is None and sock is not None:
            _shutdown(sock)

    def _open(self, sid, channel):
        try:
            sock = self.server.connect(channel)
        except (OSError, KeyError, ValueError):
            sock = None
        with self.cond:
            if sock is None or self.closed:
                for item in self.inboxes.pop(sid, ()):
                    if item is not None:  # no socket to write to: written, as it were
                        self.core.written(sid, len(item))
                self.core.push_close(sid)
                self.cond.notify_all()
                if sock is not None:
                    sock.close()
                return
            self.socks[sid] = sock
        users = [2]
        for target in (self._read_stream, self._write_stream):
            threading.Thread(target=target, args=(sid, sock, users), daemon=True).start()

    def _read_stream(self, sid, sock, users):
        try:
            while True:  # ends with the kernel's socket (EOF, error, shutdown)
                with self.cond:
                    while self.core.full() and not self.closed:
                        self.waiting += 1
                        try:
                            self.cond.wait(_TICK)
                        finally:
                            self.waiting -= 1
                    if self.closed:
                        return
                try:
                    data = sock.recv(CHUNK)
                except OSError:
                    data = b""
                with self.cond:
                    if data:
                        self.core.push(sid, data)
                    else:
                        self.core.push_close(sid)
                self._send_now()
                if not data:
                    return
        finally:
            self._release(sid, sock, users)

    def _write_stream(self, sid, sock, users):
        try:
            while True:  # ends with the local side's CLOSE, an error, or close()
                with self.cond:
                    inbox = self.inboxes[sid]
                    while not inbox and not self.closed:
                        self.cond.wait(_TICK)
                    if self.closed:
                        return
                    item = inbox.popleft()
                    self.busy.add(sid)
                if item is None:
                    _shutdown(sock)
                    return
                try:
                    sock.sendall(item)
                except OSError:
                    _shutdown(sock)
                    item_failed = True
                else:
                    item_failed = False
                with self.cond:
                    self.busy.discard(sid)
                    if item_failed:
                        # the kernel's socket is gone: what is left counts as written
                        rest = [x for x in inbox if x is not None]
                        inbox.clear()
                        for x in rest:
                            self.core.written(sid, len(x))
                    now = self.core.written(sid, len(item))
                if now:
                    self._send_now()
                if item_failed:
                    return
        finally:
            with self.cond:
                self.inboxes.pop(sid, None)
            self._release(sid, sock, users)

    def _release(self, sid, sock, users):
        with self.cond:
            users[0] -= 1
            last = users[0] == 0
            if last:
                self.socks.pop(sid, None)
        if last:
            sock.close()

    # -- the end -----------------------------------------------------------------------
    def flush(self, deadline):
        with self.cond:
            while (  # ends when delivered, unreachable, or at the deadline
                self.link is not None
                and not self.closed
                and any(s.queue or s.unacked for s in self.core.streams.values())
            ):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.waiting += 1
                try:
                    self.cond.wait(left)
                finally:
                    self.waiting -= 1

    def close(self):
        with self.cond:
            self.closed = True
            link, self.link = self.link, None
            socks = list(self.socks.values())
            self.cond.notify_all()
        if link is not None:
            _shutdown(link)
        for sock in socks:
            _shutdown(sock)

"""The agent's end of a kernel's resumable relay (the protocol: resume.py; the I/O:
relayio.py).

One :class:`LinkServer` per kernel listens on ``r`` in the kernel's 0700 run dir; the
local side reaches it through an SSH ``direct-streamlocal`` channel (sshd runs as this
user: SO_PEERCRED must say so). Each local side is a session (a relayio.Relay, named
by its HELLO's token), which outlives its links: the kernel-side connections stay open
and the kernel's output waits in the session's queues until the next link resumes it.
A session with no link for ``link_grace`` seconds is closed (a timer, no polling).

What passes is shown to the kernel's :class:`idle.Activity` (shell from the local side,
iopub from the kernel), which reads message headers only (``ps``'s idle time, the idle
timeout).

One :class:`LinkDispatch` per agent listens on ``r`` in the agent's 0700 dir: a link
that names its kernel in its HELLO (``kid``) is handed to that kernel's LinkServer as
if it had come to the kernel's own ``r``. The local side opens it while a launch is in
flight (the kernel's run dir is not known yet), so a kernel whose ``started`` comes at
once (a warm spare) needs no channel open after it: one round trip less.

All of it runs on the process's one event loop (relayio.io_loop): no thread per
kernel, link or stream. :meth:`LinkServer.close` may be called from any other thread.
"""

import asyncio
import os
import time

from .relayio import Link, Relay, Tasks, io_loop, read_hello
from .resume import Endpoint

#: seconds a new link has to send its HELLO
HELLO_TIMEOUT = 10.0
#: seconds a closing server waits for its links to deliver what is queued
FLUSH_WAIT = 1.0
_FLUSH_POLL = 0.01


class Session(Relay):
    """One local side: its streams, across links."""

    def __init__(self, server, token):
        Relay.__init__(self, Endpoint(server.budget, agent_side=True), server.target)
        self.server = server
        self.token = token
        self.expiry = None  # the link grace timer while no link is attached
        self.inbound = {}  # sid -> idle.Sniffer of what the local side sends (shell)
        self.outbound = {}  # sid -> idle.Sniffer of what the kernel sends (iopub)

    def act(self, actions):
        for action in actions:
            if action[0] == "data":
                sniffer = self.inbound.get(action[1])
                if sniffer is not None:
                    sniffer.feed(action[2])
            elif action[0] == "open" and self.server.activity is not None:
                sniffer = self.server.activity.sniffer(action[2], ahead=action[3])
                if sniffer is not None:
                    side = self.inbound if action[2] == "shell" else self.outbound
                    side[action[1]] = sniffer
        Relay.act(self, actions)

    def from_socket(self, sid, data):
        sniffer = self.outbound.get(sid)
        if sniffer is not None:
            sniffer.feed(data)
        Relay.from_socket(self, sid, data)

    def socket_gone(self, sid):
        self.inbound.pop(sid, None)
        self.outbound.pop(sid, None)
        Relay.socket_gone(self, sid)

    def resume_on(self, link, hello, frames):
        """A new link (its HELLO read) replaces the current one: WELCOME strictly
        first, then what the peer lacks, then the frames that came with the HELLO."""
        old = self.link
        if old is not None:
            self.detach(old)
            old.abort()
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        self.welcome(link, hello, frames)

    def lost(self, link):
        if self.detach(link) and not self.closed:
            loop = asyncio.get_event_loop()
            self.expiry = loop.call_later(self.server.link_grace, self.server.expire, self)

    def close(self):
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        Relay.close(self)


class _Listener:
    """A unix socket whose connections are links: each has HELLO_TIMEOUT for its
    HELLO (``_hello(link, frames)``), then belongs to a session's relay."""

    def __init__(self, path):
        self.path = path
        self.closed = False
        self.server = None
        self.io = io_loop()
        self.io.run(self._listen(), HELLO_TIMEOUT)  # OSError: the caller goes without

    async def _listen(self):
        self.server = await asyncio.get_event_loop().create_unix_server(self._link, self.path)

    # -- on the loop ---------------------------------------------------------------------
    def _link(self):
        link = Link(self._frames, self._lost)
        link.timer = asyncio.get_event_loop().call_later(HELLO_TIMEOUT, self._no_hello, link)
        return link

    def _frames(self, link, frames):
        if link.relay is not None:
            link.relay.feed(frames)
        else:
            self._hello(link, frames)

    def _lost(self, link):
        link.timer.cancel()
        if link.relay is not None:
            link.relay.lost(link)

    def _no_hello(self, link):
        if link.relay is None:
            link.abort()

    def _stop_listening(self):
        self.closed = True
        if self.server is not None:
            self.server.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


class LinkServer(_Listener):
    """The ``r`` socket of one kernel and its sessions. ``target(channel)``: where
    the kernel's ``channel`` listens (see relayio.Relay); ``activity``: the kernel's
    idle.Activity, or None."""

    def __init__(self, path, target, budget, link_grace, activity=None):
        self.activity = activity
        self.target = target
        self.budget = budget
        self.link_grace = link_grace
        self.sessions = {}
        self.tasks = Tasks()
        _Listener.__init__(self, path)

    def _hello(self, link, frames):
        link.timer.cancel()
        uid = link.peer_uid()
        if self.closed or (uid is not None and uid != os.getuid()):
            link.abort()  # only this user's sshd may relay (the dir is 0700 too)
            return
        hello = read_hello(frames)
        token = str(hello["session"])
        session = self.sessions.get(token)
        if session is None:
            session = self.sessions[token] = Session(self, token)
        session.resume_on(link, hello, frames[1:])

    def expire(self, session):
        """No link for the link grace: the local side is not coming back."""
        if self.sessions.get(session.token) is session:
            del self.sessions[session.token]
        session.close()

    async def _close(self, flush):
        self._stop_listening()
        sessions = list(self.sessions.values())
        self.sessions.clear()
        deadline = time.monotonic() + flush
        # ends when delivered, unreachable, or at the deadline
        while time.monotonic() < deadline and any(
            s.link is not None and s.pending() for s in sessions
        ):
            await asyncio.sleep(_FLUSH_POLL)
        for session in sessions:
            session.close()
        self.tasks.cancel()

    # -- from other threads --------------------------------------------------------------
    def close(self, flush=FLUSH_WAIT):
        """Stop accepting; give the links up to ``flush`` seconds to deliver what is
        queued (the kernel's last output), then close every session. Bounded."""
        if self.io.on_loop():
            self.io.loop.create_task(self._close(0))
            return
        try:
            self.io.run(self._close(flush), flush + 2.0)
        except Exception:
            pass  # bounded: whatever is left closes with the process


class LinkDispatch(_Listener):
    """The agent's ``r``: a link names its kernel (the HELLO's ``kid``) and goes to that
    kernel's LinkServer (:meth:`register`, from any thread); a kernel without one (no
    relay, or gone) aborts the link: the local side then opens the kernel's own."""

    def __init__(self, path):
        self.servers = {}  # kid -> LinkServer (set and read whole: safe across threads)
        _Listener.__init__(self, path)

    def register(self, kid, server):
        self.servers[kid] = server

    def unregister(self, kid, server):
        if self.servers.get(kid) is server:
            self.servers.pop(kid, None)

    def _hello(self, link, frames):
        server = self.servers.get(str(read_hello(frames).get("kid") or ""))
        if server is None or server.closed:
            link.timer.cancel()
            link.abort()
            return
        server._hello(link, frames)

    def close(self):
        """Stop accepting (from any thread; the links already handed over stay)."""
        if self.io.on_loop():
            self._stop_listening()
        else:
            self.io.call(self._stop_listening)


def open_dispatch(agent_dir):
    """The agent's LinkDispatch in ``agent_dir``, or None where it cannot listen."""
    try:
        return LinkDispatch(os.path.join(agent_dir, "r"))
    except Exception:
        return None  # each kernel's own ``r`` still serves

"""The node connection of a batch kernel: the kernel's five channels between the
login host and the execution host, over one authenticated TCP connection per kernel,
carried by the relay's frames (resume.py) on the process's one event loop
(relayio.py). Both ends use it: the node side (node.py) accepts and serves (it
connects to the kernel's private sockets), the login side (batch.py, through
:class:`RelaySockets`) connects and opens a stream per connection accepted on the
kernel's five relay sockets. One link, no resumption: when the connection ends, every
relayed connection ends (the node side then stops the kernel, as when the step's
stdin ends).
"""

import asyncio
import hashlib
import hmac
import os
import socket
import time

from .relayio import Link, Relay, io_loop, read_hello, set_nodelay
from .resume import DEFAULT_BUDGET, Endpoint

# -- one authenticated TCP connection per kernel -----------------------------------------
#
# The kernel on the node binds only private sockets (ipc in the node's 0700 run dir, or
# tcp on 127.0.0.1), so nothing of it is reachable from the cluster network. Its five
# channels travel over one TCP connection from the login node's agent to the node side,
# which authenticates it before relaying a byte:
#
# - the login side draws a random secret per kernel and sends it in the ``node``
#   request over the job step's stdin (never stored by the scheduler, like the key);
# - the node side listens on its routable address, on an ephemeral port, and says
#   which in its ``node`` event (on the step's stdout);
# - on a connection it sends a challenge (RELAY_MAGIC + 32 random bytes); the peer
#   answers with 32 random bytes of its own and HMAC-SHA256(secret, "login" | both),
#   within RELAY_AUTH_TIMEOUT; the node answers HMAC(secret, "node" | both), which
#   the login side checks in turn (it talks to the node side, not to whoever bound
#   the port). A connection that fails is closed at once, nothing relayed; the first
#   that succeeds closes the listener, so the port is open only between the ``node``
#   event and the login side's connect (milliseconds), and the kernel's own sockets
#   never are. Both ends set TCP_NODELAY.
#
# Why not the step's stdin/stdout (measured, benchmarks/README.md): a scheduler's step
# may forward a task's stdio over a TCP connection without TCP_NODELAY, so the second
# of two small writes in a row waits for the delayed ACK of the first (~40 ms on Linux),
# in either direction; a kernel's busy status, reply and idle status are three such
# writes, and a burst cannot be coalesced into one write in general (the reply comes
# ~1 ms after the status). The step's stdio keeps the JSON control lines: the node
# request, its events, signal and stop requests, and its EOF still ends the node side.
#
# The traffic is plaintext on the cluster network, as a scheduler's own I/O forwarding (and
# the HMAC-signed ZMQ messages of any remote kernel) is; what matters is that nobody
# without the secret can connect to a kernel socket. After the handshake the connection
# carries the relay's frames (resume.py: OPEN, DATA, ACK, CLOSE; per-stream windows),
# the login side's HELLO first, the node side's WELCOME; the half-close rule and flow
# control are relayio.py's.

#: the node's challenge starts with this (a stray client sees what it reached)
RELAY_MAGIC = b"sshpyk-relay-1\n"
_NONCE = 32
#: seconds a connection has to authenticate (each one), and the login side to connect
RELAY_AUTH_TIMEOUT = 5.0
RELAY_CONNECT_TIMEOUT = 60.0
#: the seconds bound on closing a relay from another thread
_CLOSE_WAIT = 2.0


def _proof(secret, role, node_nonce, login_nonce):
    return hmac.new(secret, role + node_nonce + login_nonce, hashlib.sha256).digest()


async def _recv_exactly(sock, count):
    """``count`` bytes from the non-blocking ``sock`` (fewer only at EOF)."""
    loop = asyncio.get_event_loop()
    chunks, got = [], 0
    while got < count:  # ends at count bytes or EOF (the caller bounds the time)
        chunk = await loop.sock_recv(sock, count - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


async def _prove_node(conn, secret):
    """The node's half of the handshake on ``conn``; True if the peer knows ``secret``."""
    loop = asyncio.get_event_loop()
    node_nonce = os.urandom(_NONCE)
    await loop.sock_sendall(conn, RELAY_MAGIC + node_nonce)
    answer = await _recv_exactly(conn, 2 * _NONCE)
    login_nonce = answer[:_NONCE]
    expected = _proof(secret, b"login", node_nonce, login_nonce)
    if len(answer) != 2 * _NONCE or not hmac.compare_digest(answer[_NONCE:], expected):
        return False
    await loop.sock_sendall(conn, _proof(secret, b"node", node_nonce, login_nonce))
    return True


async def relay_accept(listener, secret, deadline):
    """The node side: the first connection to ``listener`` that proves it knows
    ``secret`` (see "the relay"), with TCP_NODELAY; every other one is closed at once.
    Closes the listener either way; None if nobody authenticated before ``deadline``."""
    loop = asyncio.get_event_loop()
    listener.setblocking(False)
    try:
        # ends at the deadline: every pass waits for, and times out, one connection
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                conn, _ = await asyncio.wait_for(loop.sock_accept(listener), left)
            except (OSError, asyncio.TimeoutError):
                return None
            try:
                conn.setblocking(False)
                set_nodelay(conn)
                if await asyncio.wait_for(_prove_node(conn, secret), RELAY_AUTH_TIMEOUT):
                    return conn
            except (OSError, asyncio.TimeoutError):
                pass
            conn.close()  # not the login side: nothing is relayed to it
    finally:
        listener.close()


async def _prove_login(sock, secret):
    loop = asyncio.get_event_loop()
    challenge = await _recv_exactly(sock, len(RELAY_MAGIC) + _NONCE)
    if len(challenge) != len(RELAY_MAGIC) + _NONCE or not challenge.startswith(RELAY_MAGIC):
        raise ValueError("not the node side of this kernel")
    node_nonce = challenge[len(RELAY_MAGIC) :]
    login_nonce = os.urandom(_NONCE)
    await loop.sock_sendall(sock, login_nonce + _proof(secret, b"login", node_nonce, login_nonce))
    proof = await _recv_exactly(sock, 32)
    if not hmac.compare_digest(proof, _proof(secret, b"node", node_nonce, login_nonce)):
        raise ValueError("the node side did not prove it knows the relay secret")


async def relay_connect(host, port, secret, timeout=RELAY_AUTH_TIMEOUT):
    """The login side: connect to the node side and authenticate both ways; raises
    OSError or asyncio.TimeoutError (ValueError for a peer that does not know the
    secret). Returns the connected non-blocking socket."""
    loop = asyncio.get_event_loop()
    infos = await loop.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(sock, address), timeout)
        set_nodelay(sock)
        await asyncio.wait_for(_prove_login(sock, secret), timeout)
        return sock
    except BaseException:
        sock.close()
        raise


async def serve_node(listener, secret, target, on_up, on_end):
    """The node side's relay: accept the login side's connection (see "the relay"),
    answer its HELLO and serve the kernel's channels (``target(channel)``: where each
    listens) until it ends. ``on_up(relay)`` once the connection is authenticated (None
    if nobody came in time), ``on_end()`` when it ends. On the loop."""
    conn = await relay_accept(listener, secret, time.monotonic() + RELAY_CONNECT_TIMEOUT)
    if conn is None:
        on_up(None)
        return
    relay = Relay(Endpoint(DEFAULT_BUDGET, agent_side=True), target)

    def on_frames(link, frames):
        if link.relay is None:
            relay.welcome(link, read_hello(frames), frames[1:])
        else:
            relay.feed(frames)

    def on_lost(link):
        relay.detach(link)
        relay.close()
        on_end()

    link = Link(on_frames, on_lost)
    try:
        await asyncio.get_event_loop().connect_accepted_socket(lambda: link, conn)
    except OSError:
        conn.close()
        on_end()
        return
    on_up(relay)


class RelaySockets:
    """The login host's end of a batch kernel's node connection (a mixin of
    batch.BatchKernel): the authenticated connection to the node side (a relayio.Relay in the
    opening role) and the five unix sockets it serves (``endpoints``, in channel
    order) once the node is ready. Everything on the process's event loop; the
    methods below are called from the agent's loop or its workers."""

    def start_relay(self, host, port):
        """Connect and authenticate the node connection; then ``relay_up`` (or
        ``relay_failed``, with ``node_error``) is posted to the agent's loop."""
        self.io = io_loop()
        self.relay_future = asyncio.run_coroutine_threadsafe(
            self._connect_relay(host, port), self.io.loop
        )

    async def _connect_relay(self, host, port):
        try:
            sock = await relay_connect(host, port, self.relay_secret)
        except (OSError, ValueError, asyncio.TimeoutError) as exc:
            self.node_error = (
                "launch_failed",
                "cannot reach the node side of the kernel at %s:%s from the login node: %s"
                % (host, port, exc or type(exc).__name__),
            )
            self.agent.events.put(("event", (self.kid, {"event": "relay_failed"})))
            return
        budget = int(float(self.request.get("outage_buffer") or 64) * (1 << 20))
        relay = Relay(Endpoint(budget))
        link = Link(lambda _, frames: relay.feed(frames), lambda lost: self._relay_lost(relay))
        try:
            await asyncio.get_event_loop().create_connection(lambda: link, sock=sock)
        except OSError:
            sock.close()
            self.agent.events.put(("event", (self.kid, {"event": "relay_failed"})))
            return
        if self.cleaned:
            link.abort()
            return
        relay.attach(link)
        link.write(relay.core.start_link(self.kid))  # the first and only link: eager
        self.mux = relay
        self.agent.events.put(("event", (self.kid, {"event": "relay_up"})))

    def _relay_lost(self, relay):
        """The node connection ended: every relayed connection and listener goes."""
        relay.close()
        self._close_servers()

    def _close_servers(self):
        servers, self.listeners = self.listeners, []
        servers += list(self.port_servers.values())
        self.port_servers.clear()
        for server in servers:
            server.close()

    # -- the relay sockets here ------------------------------------------------------------
    def listen(self):
        """Bind the five relay sockets (when the node is ready); False if impossible."""
        relay = self.mux
        if relay is None or relay.closed:
            return False
        try:
            return self.io.run(self._listen(relay), RELAY_AUTH_TIMEOUT)
        except Exception:
            return False

    async def _listen(self, relay):
        if self.listeners:
            return True
        loop = asyncio.get_event_loop()
        servers = []
        try:
            for channel, path in self.endpoints.items():
                servers.append(
                    await loop.create_unix_server(
                        lambda channel=channel: relay.add_socket(channel), path, backlog=64
                    )
                )
        except OSError as exc:
            self.node_error = ("launch_failed", "cannot listen on %s: %s" % (path, exc))
            for server in servers:
                server.close()
            return False
        self.listeners = servers
        return not relay.closed

    def serve_ports(self, ports):
        """The kernel's web ports on the node (``ports`` events of ports.py): a relay
        socket ``p-<port>`` here for each, a stream ``tcp:<port>`` of the node
        connection; those of ports gone are closed. Returns the entries with the
        ``path`` the local side connects to. From the agent's loop."""
        relay = self.mux
        if relay is None or relay.closed:
            return []
        try:
            return self.io.run(self._serve_ports(relay, ports), RELAY_AUTH_TIMEOUT)
        except Exception:
            return []

    async def _serve_ports(self, relay, ports):
        loop = asyncio.get_event_loop()
        servers = self.port_servers
        wanted = {}
        for entry in ports or []:
            try:
                wanted[int(entry["port"])] = str(entry.get("host") or "127.0.0.1")
            except (KeyError, TypeError, ValueError):
                continue
        for port in [p for p in servers if p not in wanted]:
            servers.pop(port).close()
            try:
                os.unlink(os.path.join(self.socket_dir, "p-%d" % port))
            except OSError:
                pass
        served = []
        for port, host in sorted(wanted.items()):
            path = os.path.join(self.socket_dir, "p-%d" % port)
            if port not in servers:
                channel = "tcp:%d" % port
                try:
                    servers[port] = await loop.create_unix_server(
                        lambda channel=channel: relay.add_socket(channel), path
                    )
                except OSError:
                    continue
            served.append({"port": port, "host": host, "path": path})
        return served

    def close_relay(self):
        """Close the node connection, every relayed connection and the relay sockets
        (bounded; from any thread but the loop's)."""
        future, self.relay_future = getattr(self, "relay_future", None), None
        if future is not None:
            future.cancel()
        io = getattr(self, "io", None)
        if io is None:
            return

        async def close():
            if self.mux is not None:
                self.mux.close()
            self._close_servers()

        try:
            io.run(close(), _CLOSE_WAIT)
        except Exception:
            pass  # bounded: whatever is left closes with the process

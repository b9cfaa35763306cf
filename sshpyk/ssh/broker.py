"""The connection broker: one process per user that owns the SSH connections to hosts
and lets every local sshpyk process use them (``python -m sshpyk.ssh.broker --dir DIR``).

Started on demand, detached, by :func:`sshpyk.ssh.brokered.connect` (the client side,
which also describes the files in the broker's private directory). The broker is an
asyncssh SSH server on a unix socket:

* It accepts a connection only from a process of its own uid: the peer's SO_PEERCRED
  is checked right after ``accept()``, before asyncssh sends or reads a byte; another
  user's connection is closed unanswered. The host key is generated in memory per
  broker; clients pin its public half from the 0600 ``hostkey.json``.
* Authentication is "none": the SSH username is a :class:`~sshpyk.ssh.brokered.Request`
  that names the upstream (alias, ssh config, persist time, connect timeout).
  :meth:`Broker.upstream` keeps ONE connection per (alias, ssh config), made with
  sshpyk's own pool (:mod:`sshpyk.ssh.pool`, so host keys, ProxyJump, keepalive and
  cipher preference are those of an in-process connection) when the first client
  asks. If that fails, the client is disconnected with the sshpyk error encoded in the
  reason, which the client raises again. The broker never asks a person: a login that
  needs a password, code or passphrase fails (the relay of such prompts is to come).
* Every channel a client opens is relayed onto the upstream connection
  (:mod:`sshpyk.ssh.relay`): sessions with their exit status or signal (or none, when
  the upstream channel dropped), ``direct-streamlocal`` and ``direct-tcpip`` streams,
  with 8 MiB windows on both hops; an upstream ``ChannelOpenError`` reaches the client
  with its code and reason. (asyncssh's own "return the upstream connection"
  forwarding is not used: it drops the exit status and uses 2 MiB windows.)
* Lifetime: an upstream counts its clients; when the last one leaves, it stays up for
  the longest persist time any client asked for, then closes. If it drops, its clients
  are disconnected (they reconnect, through a broker, as after any drop). The broker
  exits :data:`LINGER` seconds after it holds no client and no upstream.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable
from typing import Any

import asyncssh

from ..errors import (
    BatchModeError,
    LoginPromptError,
    ProtocolError,
    SharedLoginNeedsPersonError,
    SSHPykError,
    UnsafePathError,
)
from ..localfs import check_private_dir, open_private_file, peer_credentials, write_private_json
from ..tasks import TaskOwner
from . import pool
from .brokered import (
    CREDENTIAL_ENV,
    ERROR_PREFIX,
    LOCAL_CIPHERS,
    PERSIST_ENV,
    BrokerPaths,
    Request,
    encode_error,
)
from .control import SUBSYSTEM, ControlSession, Slots, Wills
from .loginrelay import LoginRelay
from .prompt import RELAYED_ASKER
from .relay import CHANNEL_WINDOW, ExecRelay, open_stream

__all__ = ["LINGER", "Broker", "Upstream", "main"]

log = logging.getLogger("sshpyk")

#: Seconds the broker stays after it holds nothing (no client, no upstream).
LINGER = 5.0

#: Upper bound on one upstream connect, whatever a client asks for.
MAX_CONNECT_TIMEOUT = 300.0

#: Bound on closing the upstreams when the broker stops.
CLOSE_TIMEOUT = 10.0

_OPEN_FAILED = asyncssh.OPEN_CONNECT_FAILED


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# -- clients and upstreams ---------------------------------------------------------------


class _ClientSession(ExecRelay):
    """A client's session channel: relayed upstream, but for the broker's own control
    subsystem (:mod:`sshpyk.ssh.control`), which the broker answers itself."""

    def __init__(self, client: _Downstream) -> None:
        super().__init__(client.upstream_conn, client.broker.tasks, client.alias)
        self._client = client
        self._control: ControlSession | None = None

    def subsystem_requested(self, subsystem: str) -> bool:
        client, upstream = self._client, self._client.upstream
        if subsystem != SUBSYSTEM or upstream is None:
            return super().subsystem_requested(subsystem)
        key = (upstream.alias, upstream.ssh_config)
        broker = client.broker

        def conn() -> asyncssh.SSHClientConnection | None:
            current = broker.upstreams.get(key)
            return current.conn if current is not None else None

        self._control = ControlSession(upstream.slots, broker.wills, client.pid, key, conn)
        self._control.connection_made(self._chan)  # type: ignore[arg-type]
        return True

    def session_started(self) -> None:
        if self._control is None:
            super().session_started()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if self._control is not None:
            self._control.data_received(data, datatype)
        else:
            super().data_received(data, datatype)

    def eof_received(self) -> bool:
        if self._control is not None:
            return self._control.eof_received()
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._control is not None:
            self._control.connection_lost(exc)
        super().connection_lost(exc)


class _Downstream(asyncssh.SSHServer):
    """One client connection (a local process) on the broker."""

    def __init__(self, broker: Broker, pid: int) -> None:
        self.broker = broker
        #: the client process (SO_PEERCRED at accept): its last wills are for this pid
        self.pid = pid
        self.conn: asyncssh.SSHServerConnection | None = None
        self.upstream: Upstream | None = None
        #: the login this client waits for (begin_auth), when the host was not connected
        self._login: asyncio.Future[None] | None = None
        self.closed = False

    @property
    def alias(self) -> str:
        return self.upstream.alias if self.upstream is not None else "?"

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        self.broker.client_came(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.upstream is not None:
            self.upstream.relay.leave(self)
            self.upstream.leave(self)
        self.broker.client_left(self)

    async def begin_auth(self, username: str) -> bool:  # type: ignore[override]
        try:
            request = Request.decode(username)
        except ValueError as exc:
            error: SSHPykError = ProtocolError(
                f"the connection broker cannot read this request ({exc}): is this process's "
                "sshpyk the same version as the broker's?"
            )
            raise asyncssh.DisconnectError(
                asyncssh.DISC_BY_APPLICATION, encode_error(error)
            ) from exc
        upstream = self.upstream = self.broker.upstream(request)
        if upstream.conn is not None:  # up: this uid was let in at accept(), nothing to ask
            await self._join(request)
            return False
        # a login to make (or one in progress): its questions for a person, if any, come
        # to the waiting clients as keyboard-interactive rounds (loginrelay.py)
        upstream.relay.join(self)
        self._login = asyncio.ensure_future(self._join(request))
        self._login.add_done_callback(lambda _: upstream.relay.leave(self))
        return True

    async def _join(self, request: Request) -> None:
        assert self.upstream is not None
        try:
            await self.upstream.join(self, request)
        except SSHPykError as exc:
            error = _needs_person(exc, request.alias)
            log.warning("[%s] a client's connect failed: %s", request.alias, error)
            raise asyncssh.DisconnectError(
                asyncssh.DISC_BY_APPLICATION, encode_error(error)
            ) from exc

    def kbdint_auth_supported(self) -> bool:
        return True

    async def get_kbdint_challenge(  # type: ignore[override]
        self, username: str, lang: str, submethods: str
    ) -> Any:
        return await self._next_round()

    async def validate_kbdint_response(  # type: ignore[override]
        self, username: str, responses: list[str]
    ) -> Any:
        if self.upstream is not None:
            self.upstream.relay.answer(self, responses[0] if responses else None)
        return await self._next_round()

    async def _next_round(self) -> Any:
        """The next question for this client's person, or the login's end: True, or
        the sshpyk error it failed with (a disconnect that carries it)."""
        login, upstream = self._login, self.upstream
        if login is None or upstream is None:
            return False
        question = await upstream.relay.next_for(self, login)
        if question is not None:
            return ("", "", "", [(question.prompt, question.echo)])
        error = login.exception()
        if error is None:
            return True
        if isinstance(error, asyncssh.DisconnectError) and self.conn is not None:
            self.conn.disconnect(error.code, error.reason)
        return False

    def upstream_conn(self) -> asyncssh.SSHClientConnection:
        conn = self.upstream.conn if self.upstream is not None else None
        if conn is None:
            raise asyncssh.ChannelOpenError(
                _OPEN_FAILED, f"the broker's SSH connection to {self.alias!r} is down"
            )
        return conn

    def session_requested(self) -> Any:
        assert self.conn is not None
        chan = self.conn.create_server_channel(encoding=None, window=CHANNEL_WINDOW)
        return chan, _ClientSession(self)

    def unix_connection_requested(self, dest_path: str) -> Any:
        assert self.conn is not None
        chan = self.conn.create_unix_channel(window=CHANNEL_WINDOW)

        def opener(conn: asyncssh.SSHClientConnection, factory: Any) -> Awaitable[Any]:
            return conn.create_unix_connection(factory, dest_path, window=CHANNEL_WINDOW)

        return chan, open_stream(self.upstream_conn, opener, lambda: self.closed)

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> Any:
        assert self.conn is not None
        chan = self.conn.create_tcp_channel(window=CHANNEL_WINDOW)

        def opener(conn: asyncssh.SSHClientConnection, factory: Any) -> Awaitable[Any]:
            return conn.create_connection(
                factory, dest_host, dest_port, orig_host, orig_port, window=CHANNEL_WINDOW
            )

        return chan, open_stream(self.upstream_conn, opener, lambda: self.closed)


def _needs_person(exc: SSHPykError, alias: str) -> SSHPykError:
    """A login the broker could only finish by asking a person says so, once."""
    if isinstance(exc, LoginPromptError) and not isinstance(exc, BatchModeError):
        return SharedLoginNeedsPersonError(
            f"cannot share the connection to {alias!r}: its login needs a person (a password, "
            "one-time code or key passphrase), which the connection broker cannot ask for "
            f"yet; set {PERSIST_ENV}=0 to log in from this process"
        )
    return exc


class Upstream:
    """The broker's one connection to (alias, ssh config), counted by its clients."""

    def __init__(self, broker: Broker, alias: str, ssh_config: str | None) -> None:
        self.broker = broker
        self.alias = alias
        self.ssh_config = ssh_config
        self.shared = pool.acquire(alias, ssh_config, persist=0)
        #: what the clients share through the control channel (e.g. their agents)
        self.slots = Slots()
        #: the questions of a login that needs a person, for the clients that wait
        self.relay = LoginRelay()
        self.clients: set[_Downstream] = set()
        self.persist = 0.0
        self._expiry: asyncio.TimerHandle | None = None
        self._watched: asyncssh.SSHClientConnection | None = None
        self._joining = 0  # clients waiting for the connection
        self.released = False

    @property
    def conn(self) -> asyncssh.SSHClientConnection | None:
        return self.shared.conn if self.shared.connected else None

    async def join(self, client: _Downstream, request: Request) -> None:
        """Count ``client`` in and connect if needed (within its timeout)."""
        self.clients.add(client)
        self.persist = max(self.persist, request.persist)
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        timeout = min(max(request.timeout, 1.0), MAX_CONNECT_TIMEOUT)
        self._joining += 1
        # a question of this login (of the host's or a bastion's) goes to a waiting client;
        # its ssh-agent and Kerberos cache are the ones a login made now uses
        for name in CREDENTIAL_ENV:
            if name in request.env:
                os.environ[name] = request.env[name]
        asking = RELAYED_ASKER.set(self.relay.asker(asyncio.get_running_loop()))
        try:
            conn = await self.shared.ensure_connected(timeout)
        except BaseException:
            self.clients.discard(client)
            raise
        finally:
            RELAYED_ASKER.reset(asking)
            self._joining -= 1
            self._settle()
        if conn is not self._watched:
            self._watched = conn
            self.broker.tasks.create_task(self._watch(conn), name=f"watch-{self.alias}")
            self.broker.wills.connected((self.alias, self.ssh_config), conn)
        self.broker.write_status()

    def leave(self, client: _Downstream) -> None:
        if client in self.clients:
            self.clients.discard(client)
            self._settle()

    def _settle(self) -> None:
        """With no client left (and none connecting), start the persist time; at once
        if the connection is down."""
        if self.clients or self._joining or self.released or self._expiry is not None:
            return
        if self.conn is None:
            self._expire()
        else:
            log.info("[%s] last client left: closing in %gs", self.alias, self.persist)
            loop = asyncio.get_running_loop()
            self._expiry = loop.call_later(self.persist, self._expire)

    def _expire(self) -> None:
        self._expiry = None
        if not (self.clients or self._joining or self.released):
            self.broker.release(self)

    async def _watch(self, conn: asyncssh.SSHClientConnection) -> None:
        await conn.wait_closed()
        if self.released or conn is not self._watched:
            return
        log.warning(
            "[%s] the SSH connection was lost: disconnecting its %d client(s)",
            self.alias,
            len(self.clients),
        )
        for client in list(self.clients):
            if client.conn is not None:
                client.conn.disconnect(
                    asyncssh.DISC_CONNECTION_LOST,
                    f"the broker's SSH connection to {self.alias!r} was lost",
                )
        self._settle()


class Broker:
    """The broker process's state: the listener, its clients and its upstreams."""

    def __init__(self, paths: BrokerPaths, linger: float = LINGER) -> None:
        self.paths = paths
        self.linger = linger
        self.tasks = TaskOwner("[broker]", log)
        self.started = time.time()
        self.wills = Wills(self.tasks)
        self.upstreams: dict[tuple[str, str | None], Upstream] = {}
        self.clients: set[_Downstream] = set()
        self._releasing = 0
        self._idle: asyncio.TimerHandle | None = None
        self._stop: asyncio.Event | None = None
        self._options: asyncssh.SSHServerConnectionOptions | None = None

    # -- bookkeeping
    def upstream(self, request: Request) -> Upstream:
        key = (request.alias, request.ssh_config)
        found = self.upstreams.get(key)
        if found is None:
            found = self.upstreams[key] = Upstream(self, *key)
        self._check_idle()
        return found

    def release(self, upstream: Upstream) -> None:
        """Close ``upstream`` (its persist time is over, or it dropped with no client)."""
        upstream.released = True
        if self.upstreams.get((upstream.alias, upstream.ssh_config)) is upstream:
            del self.upstreams[(upstream.alias, upstream.ssh_config)]
        self._releasing += 1
        self.tasks.create_task(self._release(upstream), name=f"release-{upstream.alias}")

    async def _release(self, upstream: Upstream) -> None:
        try:
            log.info("[%s] closing the SSH connection", upstream.alias)
            await pool.release(upstream.shared, CLOSE_TIMEOUT)
        finally:
            self._releasing -= 1
            self._check_idle()

    def client_came(self, client: _Downstream) -> None:
        self.clients.add(client)
        self._check_idle()

    def client_left(self, client: _Downstream) -> None:
        self.clients.discard(client)
        self._check_idle()

    def write_status(self) -> None:
        """status.json: what ``sshpyk ps`` shows of this broker (0600, rewritten)."""
        upstreams = [
            {
                "alias": u.alias,
                "ssh_config": u.ssh_config,
                "connected": u.conn is not None,
                "processes": len({c.pid for c in u.clients}),
                "persist": u.persist,
            }
            for u in self.upstreams.values()
        ]
        status = {"pid": os.getpid(), "started": self.started, "connections": upstreams}
        with contextlib.suppress(OSError, SSHPykError):
            write_private_json(self.paths.status, status, replace=True)

    def _check_idle(self) -> None:
        self.write_status()
        if self.clients or self.upstreams or self._releasing:
            if self._idle is not None:
                self._idle.cancel()
                self._idle = None
        elif self._idle is None and self._stop is not None:
            self._idle = asyncio.get_running_loop().call_later(self.linger, self._idle_over)

    def _idle_over(self) -> None:
        self._idle = None
        if not (self.clients or self.upstreams or self._releasing) and self._stop is not None:
            log.info("held nothing for %gs: exiting", self.linger)
            self._stop.set()

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    # -- the server
    async def run(self) -> int:
        """Serve until idle or stopped; 0, also when another broker already runs."""
        lock_fd = open_private_file(self.paths.lock)
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("another broker holds %s: exiting", self.paths.lock)
                return 0
            return await self._serve_until_stopped()
        finally:
            os.close(lock_fd)  # the lock goes last: a new broker may start after this

    async def _serve_until_stopped(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        key = asyncssh.generate_private_key("ssh-ed25519")
        self._options = asyncssh.SSHServerConnectionOptions(
            server_host_keys=[key],
            encryption_algs=list(LOCAL_CIPHERS),
            keepalive_interval=0,
            login_timeout=MAX_CONNECT_TIMEOUT + 30,
            agent_forwarding=False,
            x11_forwarding=False,
            allow_scp=False,
        )
        public = key.export_public_key().decode("ascii").strip()
        write_private_json(self.paths.hostkey, {"key": public, "pid": os.getpid()}, replace=True)
        listener = self._listen()
        inode = os.stat(self.paths.socket).st_ino
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        self.tasks.create_task(self._accept(listener), name="accept")
        log.info("listening on %s", self.paths.socket)
        self._check_idle()
        try:
            await self._stop.wait()
        finally:
            listener.close()
            with contextlib.suppress(OSError):
                if os.lstat(self.paths.socket).st_ino == inode:
                    os.unlink(self.paths.socket)
            for client in list(self.clients):
                if client.conn is not None:
                    client.conn.close()
            self.wills.close()
            await self.tasks.aclose()
            await pool.close_all(CLOSE_TIMEOUT)
        log.info("stopped")
        return 0

    def _listen(self) -> socket.socket:
        # this broker holds the lock: whatever is at the socket's path is a stale socket
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.paths.socket)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.paths.socket))
            os.chmod(self.paths.socket, 0o600)
            listener.listen(128)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        return listener

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        uid = os.getuid()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as exc:  # out of file descriptors, say: try again shortly
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            creds = peer_credentials(sock)
            if creds is None or creds[1] != uid:
                # not one byte of SSH for another user
                log.warning(
                    "refused a connection from uid %s (pid %s)",
                    creds[1] if creds else "?",
                    creds[0] if creds else "?",
                )
                sock.close()
                continue
            pid = int(creds[0] or 0)
            self.tasks.create_task(self._serve(sock, pid), name=f"client-{pid}")

    async def _serve(self, sock: socket.socket, pid: int) -> None:
        try:
            await asyncssh.run_server(
                sock, options=self._options, server_factory=lambda: _Downstream(self, pid)
            )
        except (asyncssh.Error, OSError) as exc:
            if not str(getattr(exc, "reason", "")).startswith(ERROR_PREFIX):  # logged already
                log.info("a client's handshake ended: %s", _one_line(exc))


def _detach_from_person() -> None:
    """No terminal and no askpass: a prompt in the broker fails at once, never hangs."""
    with contextlib.suppress(OSError):
        os.setsid()
    os.environ.pop(PERSIST_ENV, None)  # the broker itself connects in-process
    os.environ.pop("SSH_ASKPASS", None)
    os.environ["SSH_ASKPASS_REQUIRE"] = "never"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sshpyk.ssh.broker")
    parser.add_argument("--dir", required=True, help="the broker's private directory")
    parser.add_argument("--linger", type=float, default=LINGER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.umask(0o077)
    _detach_from_person()
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.WARNING,
        format="%(asctime)s broker[%(process)d] %(levelname)s %(message)s",
    )
    log.setLevel(logging.INFO)
    try:
        paths = BrokerPaths(check_private_dir(args.dir))
        return asyncio.run(Broker(paths, args.linger).run())
    except (UnsafePathError, SSHPykError, OSError) as exc:
        log.error("FATAL: %s", _one_line(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""Shared SSH connections: one per (host alias, ssh config) and event loop.

Every user of a host in a process shares one asyncssh connection: the remote agents,
the forwards of every kernel and the keepalives all ride on it as channels. A
:class:`SharedConnection` is reference counted (:func:`acquire`/:func:`release`) and
closes when its last user releases it. A host behind a ProxyJump holds a reference on
its bastion's shared connection (:mod:`sshpyk.ssh.jump`), released when it closes.

The pool knows nothing about what upper layers run over a connection: they keep their
state in :attr:`SharedConnection.services` and register a close hook
(:meth:`SharedConnection.on_close`) that is awaited, time-bounded, before the
connection goes.

Connection sharing across processes: with a persist time > 0 (``acquire(...,
persist=)``, else ``$SSHPYK_SHARE_PERSIST``), the connection is made to the user's
connection broker (:mod:`sshpyk.ssh.brokered`), which owns the one connection to the
host and relays every channel onto it; everything above the pool is unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import asyncssh

from ..errors import (
    ConnectTimeoutError,
    ForwardingRefusedError,
    SharedLoginNeedsPersonError,
    translating,
)
from . import brokered, jump
from .control import BrokerControl
from .hostkeys import KeyRecorder, RecorderFactory
from .hosts import host_options

__all__ = [
    "DEFAULT_CLOSE_TIMEOUT",
    "CloseHook",
    "SharedConnection",
    "acquire",
    "close_all",
    "release",
]

log = logging.getLogger("sshpyk")

#: Bound on closing a connection: its close hooks (the agents), then the SSH close.
#: A host that stopped answering is cut off (abort) when it is used up.
DEFAULT_CLOSE_TIMEOUT = 30.0

#: Awaited with the seconds left when the connection closes.
CloseHook = Callable[[float], Awaitable[None]]


class SharedConnection:
    """The real connection behind every session handle for one (alias, config)."""

    def __init__(self, alias: str, ssh_config: str | None, persist: float = 0.0) -> None:
        self.alias = alias
        self.ssh_config = ssh_config
        #: > 0: connect through the connection broker, which keeps the connection up
        #: this many seconds after its last user (in any process) leaves
        self.persist = persist
        self.conn: asyncssh.SSHClientConnection | None = None
        self.refs = 0
        self.connect_seconds = 0.0
        #: state of upper layers, keyed by whatever they choose (e.g. their class)
        self.services: dict[object, Any] = {}
        #: ProxyJump: a reference on the bastion's shared connection
        self.bastion: SharedConnection | None = None
        self._close_hooks: list[CloseHook] = []
        self._lock = asyncio.Lock()
        #: set when a connection is made (see :meth:`wait_connected`)
        self._made = asyncio.Event()
        self._forwarding_checked: set[str] = set()
        #: the connection is the broker's (not a diagnosis made in-process)
        self.via_broker = False
        self._control: BrokerControl | None = None
        self._control_lock = asyncio.Lock()

    @property
    def connected(self) -> bool:
        return self.conn is not None and not self.conn.is_closed()

    async def wait_connected(self) -> None:
        """Return once the connection is up (now, or when a reconnect makes it)."""
        while not self.connected:  # ends with a connection; callers bound it in time
            self._made.clear()
            await self._made.wait()

    def on_close(self, hook: CloseHook) -> None:
        """Await ``hook(seconds_left)`` when the connection closes, before the SSH close."""
        self._close_hooks.append(hook)

    async def ensure_connected(
        self, timeout: float, client_factory: RecorderFactory | None = None
    ) -> asyncssh.SSHClientConnection:
        """The live connection, (re)connected within ``timeout`` seconds if needed.

        ``client_factory`` makes the asyncssh client if a connection is made now.
        """
        async with self._lock:
            if self.conn is not None and not self.conn.is_closed():
                return self.conn
            start = time.monotonic()
            reconnect = self.conn is not None
            if reconnect:
                log.info(
                    "[%s] SSH connection was lost: reconnecting (a login that needs a "
                    "person asks again)",
                    self.alias,
                )
            try:
                self.conn = await asyncio.wait_for(
                    self._connect(timeout, client_factory or KeyRecorder, reconnect), timeout
                )
            except asyncio.TimeoutError as exc:
                raise ConnectTimeoutError(
                    f"timed out after {timeout:g}s connecting to {self.alias!r}"
                ) from exc
            self.connect_seconds = time.monotonic() - start
            self._made.set()
            self._forwarding_checked.clear()
            log.info("[%s] SSH connection up in %.3fs", self.alias, self.connect_seconds)
            return self.conn

    @property
    def brokered(self) -> bool:
        """Whether connections are made through the connection broker."""
        return self.persist > 0

    async def _connect(
        self, timeout: float, client_factory: RecorderFactory, reconnect: bool = False
    ) -> asyncssh.SSHClientConnection:
        with translating(self.alias, config=self.ssh_config):
            # a diagnosis (its own client_factory) times the real handshake: in-process
            self.via_broker = self.brokered and client_factory is KeyRecorder
            if self.via_broker:
                try:
                    return await brokered.connect(
                        self.alias, self.ssh_config, persist=self.persist, timeout=timeout
                    )
                except SharedLoginNeedsPersonError:
                    # the broker cannot ask a person (yet): this process logs in itself,
                    # asking here as without sharing; this connection is not shared
                    log.info(
                        "[%s] the login needs a person: this process logs in itself "
                        "(the connection is not shared)",
                        self.alias,
                    )
                    self.via_broker = False
            host = await host_options(self.alias, self.ssh_config)
            hop = await jump.bastion_alias(host)
            tunnel = await self._bastion_connection(hop, timeout)
            return await jump.connect_via(
                host, tunnel, tunnel_alias=hop, client_factory=client_factory, reconnect=reconnect
            )

    async def _bastion_connection(
        self, hop: str | None, timeout: float
    ) -> asyncssh.SSHClientConnection | None:
        """The connection to the bastion ``hop`` (held across reconnects), or None."""
        if self.bastion is not None and self.bastion.alias != hop:
            old, self.bastion = self.bastion, None
            await release(old)
        if hop is None:
            return None
        with jump.through_bastion(self.alias, hop, self.ssh_config):
            if self.bastion is None:
                self.bastion = acquire(hop, self.ssh_config)
            return await self.bastion.ensure_connected(timeout)

    async def control(self, timeout: float) -> BrokerControl | None:
        """The connection broker's control channel (:mod:`sshpyk.ssh.control`) on this
        connection, opened once per connection; None when not connected through a
        broker."""
        conn = await self.ensure_connected(timeout)
        if not self.via_broker:
            return None
        async with self._control_lock:
            control = self._control
            if control is None or control.closed or control.conn is not conn:
                if control is not None:
                    await control.aclose()
                self._control = control = await BrokerControl.open(self.alias, conn)
            return control

    def current_control(self) -> BrokerControl | None:
        """The control channel already open on the live connection, else None."""
        control = self._control
        if control is None or control.closed or control.conn is not self.conn:
            return None
        return control

    async def check_forwarding(self, transport: str, endpoint: str | int) -> None:
        """Fail clearly if sshd refuses the forwarding a transport needs.

        Opens (and closes) a channel to ``endpoint``, a socket the kernel has bound.
        OpenSSH answers "open failed" both for a refused and for a missing unix
        socket, so only a real, listening target tells the two apart. Done once
        per connection and transport.
        """
        if transport in self._forwarding_checked or self.conn is None:
            return
        with translating(self.alias, config=self.ssh_config):
            try:
                if transport == "ipc":
                    _, writer = await self.conn.open_unix_connection(str(endpoint))
                else:
                    _, writer = await self.conn.open_connection("127.0.0.1", int(endpoint))
            except asyncssh.ChannelOpenError as exc:
                kind = "unix socket" if transport == "ipc" else "TCP"
                option = (
                    "AllowStreamLocalForwarding" if transport == "ipc" else "AllowTcpForwarding"
                )
                other = "tcp" if transport == "ipc" else "ipc"
                raise ForwardingRefusedError(
                    f"sshd on {self.alias!r} refuses {kind} forwarding ({exc.reason}): set "
                    f"{option} yes in its sshd_config, or use --transport {other}"
                ) from exc
            writer.close()
        self._forwarding_checked.add(transport)

    async def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> None:
        """Run the close hooks, close the connection, release the bastion: all within
        ``timeout`` seconds (what is still open then is aborted)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        hooks, self._close_hooks = self._close_hooks, []
        if hooks:
            try:
                results = await asyncio.wait_for(
                    asyncio.gather(*(hook(timeout) for hook in hooks), return_exceptions=True),
                    timeout,
                )
            except asyncio.TimeoutError:
                log.warning("[%s] close hooks unfinished after %gs", self.alias, timeout)
                results = []
            for result in results:
                if isinstance(result, BaseException):
                    log.warning("[%s] a close hook failed: %r", self.alias, result)
        control, self._control = self._control, None
        if control is not None:
            await control.aclose()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()
            try:
                remaining = max(0.1, deadline - loop.time())
                await asyncio.wait_for(asyncio.shield(conn.wait_closed()), remaining)
            except asyncio.TimeoutError:
                log.info("[%s] no clean SSH close within %gs: aborted", self.alias, timeout)
                conn.abort()
        bastion, self.bastion = self.bastion, None
        if bastion is not None:
            await release(bastion, max(0.1, deadline - loop.time()))

    def __repr__(self) -> str:
        state = "connected" if self.connected else "not connected"
        return f"<SharedConnection {self.alias!r} {state}, {self.refs} refs>"


# One registry per event loop: asyncssh connections belong to the loop that made them.
_registries: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple[str, str | None], SharedConnection]
] = weakref.WeakKeyDictionary()


def _registry() -> dict[tuple[str, str | None], SharedConnection]:
    loop = asyncio.get_running_loop()
    return _registries.setdefault(loop, {})


def acquire(
    alias: str, ssh_config: str | None, *, persist: float | None = None
) -> SharedConnection:
    """A new reference on the shared connection for (alias, config), made if needed.

    ``ssh_config`` is absolute or None (see :func:`sshpyk.ssh.hosts.config_path`). The
    connection is not opened here: call :meth:`SharedConnection.ensure_connected`.
    ``persist`` (seconds; None: ``$SSHPYK_SHARE_PERSIST``, unset: 0) > 0 shares the
    connection with other processes through the connection broker; the largest value
    any holder asked for applies from the next (re)connect.
    """
    seconds = brokered.share_persist(persist)
    registry = _registry()
    shared = registry.get((alias, ssh_config))
    if shared is None:
        shared = registry[(alias, ssh_config)] = SharedConnection(alias, ssh_config, seconds)
    shared.persist = max(shared.persist, seconds)
    shared.refs += 1
    return shared


async def release(shared: SharedConnection, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> None:
    """Drop one reference; the last one closes the connection within ``timeout``.
    Shielded: a cancelled caller does not leave the connection half closed."""
    shared.refs -= 1
    if shared.refs > 0:
        return
    registry = _registry()
    if registry.get((shared.alias, shared.ssh_config)) is shared:
        del registry[(shared.alias, shared.ssh_config)]
    await asyncio.shield(shared.close(timeout))


async def close_all(timeout: float = DEFAULT_CLOSE_TIMEOUT) -> None:
    """Close every shared connection of the running loop, whoever holds it."""
    registry = _registry()
    shared = list(registry.values())
    registry.clear()
    await asyncio.gather(*(s.close(timeout) for s in shared), return_exceptions=True)

"""Session: a handle on the shared SSH connection to one host.

Sessions are reference-counted handles onto a :class:`~sshpyk.ssh.pool.SharedConnection`;
the connection closes when the last handle does. Host settings (HostName, User, Port,
IdentityFile, ProxyJump, ...) come from the user's ssh config
(:func:`sshpyk.ssh.hosts.host_options`); host keys are always verified against the
known_hosts files that config names (``~/.ssh/known_hosts`` by default).

The public :class:`sshpyk.SSHSession` adds agents and kernels on top of this class.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
from dataclasses import dataclass
from typing import TypeVar

import asyncssh

from ..errors import SessionClosedError, translating
from .hostkeys import RecorderFactory
from .hosts import config_path
from .pool import DEFAULT_CLOSE_TIMEOUT, SharedConnection, acquire, release

__all__ = ["DEFAULT_CONNECT_TIMEOUT", "RunResult", "Session", "SessionState"]

log = logging.getLogger("sshpyk")

DEFAULT_CONNECT_TIMEOUT = 30.0

_S = TypeVar("_S", bound="Session")


class SessionState(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True)
class RunResult:
    exit_status: int | None
    stdout: str
    stderr: str


class Session:
    """A handle on the shared SSH connection to one host.

    Use ``async with await Session.connect("alias") as session: ...``.
    """

    def __init__(self, shared: SharedConnection, connect_timeout: float) -> None:
        """Wrap one reference on ``shared`` (from :func:`~sshpyk.ssh.pool.acquire`)."""
        self._shared = shared
        self._state = SessionState.OPEN
        self._connect_timeout = connect_timeout
        self._closed = asyncio.Event()
        self._close_task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(
        cls: type[_S],
        alias: str,
        *,
        ssh_config: str | os.PathLike[str] | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        client_factory: RecorderFactory | None = None,
        persist: float | None = None,
    ) -> _S:
        """Open (or join) the SSH connection to ``alias`` from the ssh config.

        ``client_factory`` makes the asyncssh client if a new connection is opened
        (``sshpyk check`` times the handshake with it). ``persist`` > 0 shares the
        connection with this user's other sshpyk processes through the connection
        broker, which keeps it up that many seconds after its last user leaves; None
        or 0 (the default): this process's own connection, unless
        ``$SSHPYK_SHARE_PERSIST`` says otherwise.
        """
        shared = acquire(alias, config_path(ssh_config), persist=persist)
        session = cls(shared, connect_timeout)
        try:
            await shared.ensure_connected(connect_timeout, client_factory)
        except BaseException:
            await session._release()
            raise
        return session

    # -- state -------------------------------------------------------------------
    @property
    def alias(self) -> str:
        return self._shared.alias

    @property
    def ssh_config(self) -> str | None:
        return self._shared.ssh_config

    @property
    def shared(self) -> SharedConnection:
        """The shared connection (its ``services`` slot holds upper layers' state)."""
        return self._shared

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def connected(self) -> bool:
        return self._state is SessionState.OPEN and self._shared.connected

    async def wait_connected(self) -> None:
        """Return once the connection is up (a reconnect made elsewhere, by this
        process's agent recovery: nothing is attempted here). Bound it in time."""
        await self._shared.wait_connected()

    @property
    def connect_seconds(self) -> float:
        return self._shared.connect_seconds

    def _ensure_open(self) -> None:
        if self._state is not SessionState.OPEN:
            raise SessionClosedError(f"the SSH session to {self.alias!r} is closed")

    async def connection(self) -> asyncssh.SSHClientConnection:
        """The live asyncssh connection; reconnects if it dropped."""
        self._ensure_open()
        return await self._shared.ensure_connected(self._connect_timeout)

    async def reconnect(self, timeout: float) -> asyncssh.SSHClientConnection:
        """Reconnect if the connection dropped (one attempt bounded by ``timeout``)."""
        self._ensure_open()
        return await self._shared.ensure_connected(timeout)

    async def check_forwarding(self, transport: str, endpoint: str | int) -> None:
        """Fail with ForwardingRefusedError if sshd refuses ``transport``'s forwarding."""
        await self.connection()
        await self._shared.check_forwarding(transport, endpoint)

    async def run(self, command: str, *, input: str | None = None) -> RunResult:
        """Run a shell command on the host and collect its output."""
        conn = await self.connection()
        with translating(self.alias, config=self.ssh_config):
            result = await conn.run(command, input=input, check=False)
        return RunResult(
            exit_status=result.exit_status,
            stdout=str(result.stdout or ""),
            stderr=str(result.stderr or ""),
        )

    # -- lifecycle ---------------------------------------------------------------
    async def _release(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> None:
        if self._state is SessionState.CLOSED:
            return
        self._state = SessionState.CLOSED
        try:
            await release(self._shared, timeout)
        finally:
            self._closed.set()

    def close(self) -> None:
        """Release this handle; the connection closes with the last handle.

        The release runs in a task this handle owns: :meth:`wait_closed` awaits it.
        """
        if self._state is SessionState.OPEN and self._close_task is None:
            self._close_task = asyncio.ensure_future(self._release())
            self._close_task.add_done_callback(self._reap_close)

    def _reap_close(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.warning("[%s] closing the session failed: %r", self.alias, task.exception())

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def aclose(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> None:
        """Release this handle; the last one closes the connection, bounded by
        ``timeout`` (a host that stopped answering is then cut off). Shielded: a
        cancelled caller does not leave the connection half closed."""
        await asyncio.shield(self._release(timeout))

    async def __aenter__(self: _S) -> _S:
        self._ensure_open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.alias!r} {self._state.value}>"

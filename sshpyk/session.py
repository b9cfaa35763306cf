"""SSHSession: one shared asyncssh connection per (host alias, ssh config).

Every kernel started in a process on the same host shares one SSH connection:
the remote supervisors, the five forwards per kernel and keepalives all ride on
it as channels. Sessions are handles onto that shared connection and are
reference counted; the connection closes when the last handle does.

Host settings (HostName, User, Port, IdentityFile, ProxyJump, ...) come from the
user's ssh config, read by asyncssh; host keys are always verified against the
known_hosts files that config names (``~/.ssh/known_hosts`` by default).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import time
import weakref
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import asyncssh

from .errors import (
    ConnectTimeoutError,
    ForwardingRefusedError,
    SessionClosedError,
    SSHPykError,
    translate_error,
)
from .jump import JumpTarget, connect_via, open_bastion
from .remote import RemoteAgent

if TYPE_CHECKING:
    from .kernel import KernelOptions, RemoteKernel

__all__ = ["RunResult", "SSHSession", "SessionState"]

log = logging.getLogger("sshpyk")

#: Used when the ssh config sets no ServerAliveInterval: keepalive is always on.
DEFAULT_KEEPALIVE_INTERVAL = 15.0
DEFAULT_KEEPALIVE_COUNT_MAX = 3
DEFAULT_CONNECT_TIMEOUT = 30.0
#: Bound on closing a connection: telling its agents to shut down, then the SSH close.
#: A host that stopped answering is cut off (abort) when it is used up.
DEFAULT_CLOSE_TIMEOUT = 30.0


class SessionState(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True)
class RunResult:
    exit_status: int | None
    stdout: str
    stderr: str


def default_ssh_config() -> str | None:
    path = os.path.expanduser("~/.ssh/config")
    return path if os.path.exists(path) else None


#: asyncssh's first choice, chacha20-poly1305, is computed in Python around
#: cryptography's primitives; AES-GCM runs in OpenSSL with AES-NI. With AES-GCM first a
#: kernel_info round trip costs +0.07 ms over a local kernel instead of +0.86 ms, and a
#: forward moves ~1.5x the bytes per CPU second (benchmarks/RESULTS.md).
PREFERRED_CIPHERS = (b"aes128-gcm@openssh.com", b"aes256-gcm@openssh.com")


def preferred_ciphers(algs: list[bytes]) -> list[bytes] | None:
    """asyncssh's default cipher list with AES-GCM first, or None when the ssh config
    chose its own ``Ciphers`` (then its order stands)."""
    from asyncssh.encryption import get_default_encryption_algs

    if algs != list(get_default_encryption_algs()):
        return None
    first = [a for a in PREFERRED_CIPHERS if a in algs]
    return first + [a for a in algs if a not in first]


class _SharedConnection:
    """The real connection behind every SSHSession for one (alias, config)."""

    def __init__(self, alias: str, ssh_config: str | None) -> None:
        self.alias = alias
        self.ssh_config = ssh_config
        self.conn: asyncssh.SSHClientConnection | None = None
        self.refs = 0
        self.connect_seconds = 0.0
        self._lock = asyncio.Lock()
        self._forwarding_checked: set[str] = set()
        self.agents: dict[Any, RemoteAgent] = {}
        self._agent_locks: dict[Any, asyncio.Lock] = {}
        self.bastion: SSHSession | None = None  # ProxyJump: a handle on the bastion's session

    @property
    def connected(self) -> bool:
        return self.conn is not None and not self.conn.is_closed()

    async def ensure_connected(self, timeout: float) -> asyncssh.SSHClientConnection:
        async with self._lock:
            if self.conn is not None and not self.conn.is_closed():
                return self.conn
            start = time.monotonic()
            try:
                self.conn = await asyncio.wait_for(self._connect(), timeout)
            except asyncio.TimeoutError as exc:
                raise ConnectTimeoutError(
                    f"timed out after {timeout:g}s connecting to {self.alias!r}"
                ) from exc
            except Exception as exc:
                raise translate_error(exc, self.alias, config=self.ssh_config) from exc
            self.connect_seconds = time.monotonic() - start
            self._forwarding_checked.clear()
            log.info("[%s] SSH connection up in %.3fs", self.alias, self.connect_seconds)
            return self.conn

    async def _connect(self) -> asyncssh.SSHClientConnection:
        config: Any = [self.ssh_config] if self.ssh_config else ()
        loop = asyncio.get_running_loop()
        # Options read key files: build them off the loop. Reading them first also tells
        # whether the config sets ServerAliveInterval; keepalive is on either way.
        target = JumpTarget.parse(self.alias)  # an alias, or a ProxyJump hop/chain
        options = await loop.run_in_executor(
            None, partial(asyncssh.SSHClientConnectionOptions, config=config, **target.options)
        )
        extra: dict[str, Any] = {}
        if not options.keepalive_interval:
            extra = {
                "keepalive_interval": DEFAULT_KEEPALIVE_INTERVAL,
                "keepalive_count_max": DEFAULT_KEEPALIVE_COUNT_MAX,
            }
        preferred = preferred_ciphers(list(options.encryption_algs))
        if preferred is not None:
            extra["encryption_algs"] = [alg.decode("ascii") for alg in preferred]
        # ProxyJump: each bastion is a shared SSHSession of its own (sshpyk/jump.py)
        self.bastion = await open_bastion(target, options, self.ssh_config, self.bastion)
        return await connect_via(target, options, self.bastion, ssh_config=self.ssh_config, **extra)

    async def check_forwarding(self, transport: str, endpoint: str | int) -> None:
        """Fail clearly if sshd refuses the forwarding a transport needs.

        Opens (and closes) a channel to ``endpoint``, a socket the kernel has bound.
        OpenSSH answers "open failed" both for a refused and for a missing unix
        socket, so only a real, listening target tells the two apart. Done once
        per connection and transport.
        """
        if transport in self._forwarding_checked or self.conn is None:
            return
        try:
            if transport == "ipc":
                _, writer = await self.conn.open_unix_connection(str(endpoint))
            else:
                _, writer = await self.conn.open_connection("127.0.0.1", int(endpoint))
            writer.close()
        except asyncssh.ChannelOpenError as exc:
            kind = "unix socket" if transport == "ipc" else "TCP"
            option = "AllowStreamLocalForwarding" if transport == "ipc" else "AllowTcpForwarding"
            other = "tcp" if transport == "ipc" else "ipc"
            raise ForwardingRefusedError(
                f"sshd on {self.alias!r} refuses {kind} forwarding ({exc.reason}): set "
                f"{option} yes in its sshd_config, or use --transport {other}"
            ) from exc
        except Exception as exc:
            raise translate_error(exc, self.alias, config=self.ssh_config) from exc
        self._forwarding_checked.add(transport)

    async def agent(
        self,
        session: SSHSession,
        python: str,
        pre_command: str | None,
        grace: float,
        run_root: str | None,
    ) -> RemoteAgent:
        """The running agent for these settings, started on first use."""
        key = (python, pre_command, grace, run_root)
        lock = self._agent_locks.setdefault(key, asyncio.Lock())
        async with lock:
            agent = self.agents.get(key)
            if agent is None or not agent.alive:
                agent = RemoteAgent(session, python, pre_command, grace=grace, run_root=run_root)
                await agent.start()
                self.agents[key] = agent
            return agent

    async def attach_agent(
        self,
        session: SSHSession,
        socket_path: str,
        python: str,
        pre_command: str | None,
        grace: float,
    ) -> RemoteAgent:
        """A channel to an agent that already runs (found through its control socket)."""
        key = ("attached", socket_path)
        lock = self._agent_locks.setdefault(key, asyncio.Lock())
        async with lock:
            agent = self.agents.get(key)
            if agent is None or not agent.alive:
                agent = await RemoteAgent.attach(
                    session, socket_path, python, pre_command, grace=grace
                )
                self.agents[key] = agent
            return agent

    async def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> None:
        """Shut the agents down and close the connection, within ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        agents, self.agents = list(self.agents.values()), {}
        if agents:
            # persistent kernels outlive the connection: only an explicit shutdown stops
            # them. An agent's close waits at most three times its timeout.
            await asyncio.gather(
                *(a.close(timeout / 3, keep_persistent=True) for a in agents),
                return_exceptions=True,
            )
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
            await bastion.aclose(timeout=max(0.1, deadline - loop.time()))


# One registry per event loop: asyncssh connections belong to the loop that made them.
_registries: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Any, _SharedConnection]]
_registries = weakref.WeakKeyDictionary()


def _registry() -> dict[Any, _SharedConnection]:
    loop = asyncio.get_running_loop()
    return _registries.setdefault(loop, {})


async def close_all() -> None:
    """Close every shared connection of the running loop (persistent kernels stay)."""
    registry = _registry()
    shared = list(registry.values())
    registry.clear()
    await asyncio.gather(*(s.close() for s in shared), return_exceptions=True)


class SSHSession:
    """A handle on the shared SSH connection to one host.

    Use ``async with await SSHSession.connect("alias") as session: ...``.
    """

    def __init__(self, shared: _SharedConnection, connect_timeout: float) -> None:
        self._shared = shared
        self._state = SessionState.OPEN
        self._connect_timeout = connect_timeout
        self._closed = asyncio.Event()
        shared.refs += 1

    @classmethod
    async def connect(
        cls,
        alias: str,
        *,
        ssh_config: str | os.PathLike[str] | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> SSHSession:
        """Open (or join) the SSH connection to ``alias`` from the ssh config."""
        config = os.path.abspath(os.path.expanduser(os.fspath(ssh_config))) if ssh_config else None
        if config and not os.path.isfile(config):
            raise SSHPykError(f"ssh config file {config} does not exist")
        config = config or default_ssh_config()
        registry = _registry()
        shared = registry.get((alias, config))
        if shared is None:
            shared = registry[(alias, config)] = _SharedConnection(alias, config)
        session = cls(shared, connect_timeout)
        try:
            await shared.ensure_connected(connect_timeout)
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
    def state(self) -> SessionState:
        return self._state

    @property
    def connected(self) -> bool:
        return self._state is SessionState.OPEN and self._shared.connected

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
        await self.connection()
        await self._shared.check_forwarding(transport, endpoint)

    async def agent(
        self,
        python: str = "python3",
        pre_command: str | None = None,
        *,
        grace: float = 60.0,
        run_root: str | None = None,
    ) -> RemoteAgent:
        """The remote agent for ``python`` (started on first use, then shared)."""
        await self.connection()
        return await self._shared.agent(self, python, pre_command, grace, run_root)

    async def attach_agent(
        self,
        socket_path: str,
        python: str = "python3",
        pre_command: str | None = None,
        *,
        grace: float = 60.0,
    ) -> RemoteAgent:
        """Join an agent that already runs on the host (see :meth:`RemoteKernel.attach`)."""
        await self.connection()
        return await self._shared.attach_agent(self, socket_path, python, pre_command, grace)

    async def inspect(
        self, python: str = "python3", kernel_name: str = "python3", pre_command: str | None = None
    ) -> dict[str, Any]:
        """Facts about the remote Python and one of its kernelspecs."""
        agent = await self.agent(python, pre_command)
        spec = await agent.inspect(kernel_name)
        info = {k: agent.info.get(k) for k in ("python", "python_version", "jupyter_client")}
        return {**info, "kernelspec": spec}

    # -- helpers -----------------------------------------------------------------
    async def run(self, command: str, *, input: str | None = None) -> RunResult:
        """Run a shell command on the host and collect its output."""
        conn = await self.connection()
        try:
            result = await conn.run(command, input=input, check=False)
        except Exception as exc:
            raise translate_error(exc, self.alias, config=self.ssh_config) from exc
        return RunResult(
            exit_status=result.exit_status,
            stdout=str(result.stdout or ""),
            stderr=str(result.stderr or ""),
        )

    async def start_kernel(
        self, kernel_name: str = "python3", options: KernelOptions | None = None, **kw: Any
    ) -> RemoteKernel:
        """Start a remote kernel with its forwards; see :class:`sshpyk.RemoteKernel`."""
        from .kernel import KernelOptions, RemoteKernel

        options = options or KernelOptions(kernel_name=kernel_name, **kw)
        kernel = RemoteKernel(self, options)
        try:
            await kernel.start()
        except BaseException:
            await asyncio.shield(kernel.close())
            raise
        return kernel

    # -- lifecycle ---------------------------------------------------------------
    async def _release(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> None:
        if self._state is SessionState.CLOSED:
            return
        self._state = SessionState.CLOSED
        shared = self._shared
        shared.refs -= 1
        try:
            if shared.refs <= 0:
                registry = _registry()
                if registry.get((shared.alias, shared.ssh_config)) is shared:
                    del registry[(shared.alias, shared.ssh_config)]
                await shared.close(timeout)
        finally:
            self._closed.set()

    def close(self) -> None:
        """Release this handle; the connection closes with the last handle."""
        if self._state is SessionState.OPEN:
            self._close_task = asyncio.ensure_future(self._release())

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def aclose(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> None:
        """Release this handle; the last one closes the connection, bounded by
        ``timeout`` (a host that stopped answering is then cut off). Shielded: a
        cancelled caller does not leave the connection half closed."""
        await asyncio.shield(self._release(timeout))

    async def __aenter__(self) -> SSHSession:
        self._ensure_open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<SSHSession {self.alias!r} {self._state.value}>"

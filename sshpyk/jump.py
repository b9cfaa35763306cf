"""ProxyJump chains opened by sshpyk: each bastion is a shared SSHSession.

asyncssh can follow ``ProxyJump`` by itself, but then every connection opens
its own private chain of bastion connections, and the hops do not even see the
ssh config file that sshpyk was given (asyncssh passes only its ``config=``
argument on to the hops). Instead, :func:`open_bastion` connects the bastion
as an ordinary :class:`~sshpyk.SSHSession` (same registry, same reference
counting, same host key checks as any direct host) and :func:`connect_via`
hands that connection to ``asyncssh.connect(..., tunnel=conn)``. So every host
behind a bastion, and every kernel on those hosts, rides on one connection to
that bastion, and the bastion connection closes with its last user.

Chains follow OpenSSH's ``-J`` semantics. For ``ProxyJump a,b`` the target is
reached through ``b``, and ``b`` through ``a``; that hop is the session alias
``"a,b"`` ("``b`` as reached through ``a``", where ``b``'s own ProxyJump does not
apply), which is shortened to plain ``"b"`` when ``b``'s own ProxyJump is ``a``
anyway, so that both spellings share one connection. A hop may be
``[user@]host[:port]``; ``user`` and ``port`` override the config, as with ``-J``.

The ~40 ms stall, and why one command fixes it
---------------------------------------------
OpenSSH's sshd enables ``TCP_NODELAY`` on a client's socket in exactly one
place: ``ssh_packet_set_interactive()`` (packet.c), which it calls once per
connection, when the first session channel starts a command or shell
(``do_exec_pty``/``do_exec_no_pty`` in session.c), pty or not. A connection
that only carries ``direct-tcpip`` channels, which is all a jump connection
does, never gets there, so the bastion's socket back to us keeps Nagle's
algorithm on. A kernel answers with a burst of small messages (``busy``, the
reply, ``idle``), which reach the bastion as separate SSH packets; it writes the
first at once, and Nagle holds the next until our side ACKs the first. Our side
has nothing to send until the burst is complete (a frontend waits for ``idle``
to finish a cell), so that ACK is a delayed ACK: 40 ms on Linux. (The other
sockets on the way are fine: ``connect_next()`` in channels.c sets
``TCP_NODELAY`` on every socket sshd opens for a forward, the inner host's sshd
marks its socket when our agent's session starts, and asyncssh sets it on ours.)

:func:`nudge_bastion` therefore runs one trivial command (``exit 0``) on each
bastion connection as soon as it carries traffic for us; sshd marks the socket
before it answers the exec request, and the option stays for the life of the
connection, so the channel is closed at once. No pty is requested: no login
record, and ``PermitTTY no``/``no-pty`` bastions work; a ``ForceCommand`` or a
``nologin`` shell does not matter either, as sshd marks the socket before the
command runs. A jump-only bastion (``MaxSessions 0``) refuses the session:
sshpyk logs a warning and works on, with the stall. sshd applies its
non-interactive ``IPQoS`` class to the socket at the same moment (``IP_TOS``
0x08 with Debian's defaults). ``benchmarks/bastion.py`` measures the effect;
``strace -e setsockopt`` on the bastion's sshd shows the ``TCP_NODELAY`` call.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import weakref
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import asyncssh

from .errors import HostKeyError, SSHConfigError, SSHPykError
from .hostkeys import KeyRecorder, host_key_error

if TYPE_CHECKING:
    from .session import SSHSession

__all__ = ["NUDGE_BASTIONS", "JumpTarget", "connect_via", "nudge_bastion", "open_bastion"]

log = logging.getLogger("sshpyk")

#: Run one command on every bastion connection so that its sshd sets TCP_NODELAY
#: (see the module docstring). Only benchmarks turn this off, to show the difference.
NUDGE_BASTIONS = True

#: The command run by :func:`nudge_bastion`; any login shell understands it.
NUDGE_COMMAND = "exit 0"
NUDGE_TIMEOUT = 10.0

#: Longest chain of bastions followed before it is taken for a loop.
MAX_HOPS = 8

# Aliases whose connections are being opened in this task, outermost first: a
# ProxyJump that leads back to one of them is a loop (the inner connect would wait
# forever for the outer one's lock).
_opening: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "sshpyk_jump_opening", default=()
)

# Bastion connections whose sshd has been nudged (weak: they go when they close).
_nudged: weakref.WeakSet[asyncssh.SSHClientConnection] = weakref.WeakSet()


@dataclass(frozen=True)
class JumpTarget:
    """What an SSHSession alias names: a Host alias, a ProxyJump hop, or a chain.

    ``gpubox`` is a Host alias; ``user@host:2222`` a hop; ``a,b,c`` is ``c``
    reached through ``b`` reached through ``a`` (``via`` is ``"a,b"``).
    """

    alias: str
    host: str
    username: str | None = None
    port: int | None = None
    via: str | None = None

    @classmethod
    def parse(cls, alias: str) -> JumpTarget:
        via, _, hop = alias.rpartition(",")
        if "," in alias and not all(part.strip() for part in alias.split(",")):
            raise SSHConfigError(f"bad ProxyJump {alias!r}: an empty hop")
        hop = hop.strip()
        username: str | None = None
        if "@" in hop:
            username, hop = hop.rsplit("@", 1)
        host, port = hop, None
        if hop.startswith("[") and "]" in hop:  # [v6addr] or [v6addr]:port
            host, _, rest = hop[1:].partition("]")
            port = _port(alias, rest[1:]) if rest.startswith(":") else None
        elif hop.count(":") == 1:  # host:port (a bare IPv6 address has several colons)
            host, port_text = hop.split(":")
            port = _port(alias, port_text)
        if not host or username == "":
            raise SSHConfigError(f"bad ProxyJump hop {alias!r}: expected [user@]host[:port]")
        return cls(alias, host, username, port, via.strip() or None)

    @property
    def name(self) -> str:
        """The last hop as written (``c`` of ``a,b,c``), for messages."""
        return self.alias.rpartition(",")[2].strip()

    @property
    def options(self) -> dict[str, Any]:
        """Keyword arguments for asyncssh's connection options."""
        args: dict[str, Any] = {"host": self.host}
        if self.username is not None:
            args["username"] = self.username
        if self.port is not None:
            args["port"] = self.port
        return args


def _port(alias: str, text: str) -> int:
    if text.isdigit() and 0 < int(text) < 65536:
        return int(text)
    raise SSHConfigError(f"bad ProxyJump hop {alias!r}: port {text!r} is not a TCP port")


def _proxy_jump(options: asyncssh.SSHClientConnectionOptions) -> str | None:
    """The ProxyJump the config sets for these options (``none`` reads as None)."""
    tunnel = getattr(options, "tunnel", None)
    return tunnel.strip() if isinstance(tunnel, str) and tunnel.strip() else None


async def _hop_alias(hop: str, ssh_config: str | None) -> str:
    """The registry alias of a hop: ``a,b`` becomes ``b`` if b's ProxyJump is ``a``."""
    target = JumpTarget.parse(hop)
    if target.via is None:
        return hop
    config: Any = [ssh_config] if ssh_config else ()
    loop = asyncio.get_running_loop()
    options = await loop.run_in_executor(
        None, partial(asyncssh.SSHClientConnectionOptions, config=config, **target.options)
    )
    own = _proxy_jump(options)
    if own is not None and own.replace(" ", "") == target.via.replace(" ", ""):
        return hop.rpartition(",")[2].strip()
    return hop


async def open_bastion(
    target: JumpTarget,
    options: asyncssh.SSHClientConnectionOptions,
    ssh_config: str | None,
    current: SSHSession | None,
) -> SSHSession | None:
    """The session of the bastion in front of ``target``, or None if it has none.

    ``current`` is the bastion session held so far (on a reconnect): it is kept if
    it is still the right one, else released. The returned session is a handle of
    its own on the shared bastion connection; the caller releases it with
    ``aclose()`` when its own connection closes.
    """
    from .session import SessionState, SSHSession

    hop = target.via if target.via is not None else _proxy_jump(options)
    if hop is not None:
        hop = await _hop_alias(hop, ssh_config)
    if current is not None:
        if hop == current.alias and current.state is SessionState.OPEN:
            return current
        await current.aclose()
    if hop is None:
        return None
    opening = (*_opening.get(), target.alias)
    if hop in opening or len(opening) > MAX_HOPS:
        where = f" in ssh config {ssh_config}" if ssh_config else ""
        raise SSHConfigError(
            f"ProxyJump loop{where}: {' -> '.join((*opening, hop))} (check the ProxyJump "
            "lines of these hosts)"
        )
    token = _opening.set(opening)
    try:
        return await SSHSession.connect(hop, ssh_config=ssh_config)
    except SSHPykError as exc:
        wrapped = type(exc)(f"cannot reach {target.alias!r} through bastion {hop!r}: {exc}")
        wrapped.__dict__.update(exc.__dict__)  # a HostKeyError's fingerprint, file, fix
        raise wrapped from exc
    finally:
        _opening.reset(token)


async def nudge_bastion(conn: asyncssh.SSHClientConnection, alias: str) -> None:
    """Run one command on a bastion connection so that its sshd sets TCP_NODELAY.

    Once per connection; see the module docstring for why this removes the stall.
    """
    if not NUDGE_BASTIONS or conn in _nudged:
        return
    _nudged.add(conn)
    try:
        chan, _session = await asyncio.wait_for(
            conn.create_session(asyncssh.SSHClientSession, NUDGE_COMMAND), NUDGE_TIMEOUT
        )
    except (asyncssh.Error, OSError, asyncio.TimeoutError) as exc:
        log.warning(
            "[%s] the bastion refused a session (%s): requests through it may stall ~40 ms "
            "(its sshd only sets TCP_NODELAY once a session runs a command)",
            alias,
            " ".join(str(exc).split()) or type(exc).__name__,
        )
        return
    except BaseException:  # cancelled: the next connect through this bastion tries again
        _nudged.discard(conn)
        raise
    # sshd marked the socket before it accepted the command, so the command's own life
    # does not matter: close now rather than wait for the bastion's login shell.
    chan.close()


async def connect_via(
    target: JumpTarget,
    options: asyncssh.SSHClientConnectionOptions,
    bastion: SSHSession | None,
    *,
    ssh_config: str | None = None,
    **kwargs: Any,
) -> asyncssh.SSHClientConnection:
    """Open the SSH connection to ``target``, through ``bastion``'s connection if given.

    Host keys are checked against the known_hosts files of ``options`` at every hop
    (each bastion checked its own when it connected); a key that is not trusted is
    reported as unknown or changed, with its fingerprint, the host and the file
    (:mod:`sshpyk.hostkeys`).
    """
    tunnel: Any = ()
    if bastion is not None:
        tunnel = await bastion.connection()
        # before the first byte for us crosses it: see "The ~40 ms stall" above
        await nudge_bastion(tunnel, bastion.alias)
    offered: list[tuple[asyncssh.SSHKey, str]] = []
    try:
        return await asyncssh.connect(
            target.host,
            options=options,
            tunnel=tunnel,
            client_factory=lambda: KeyRecorder(offered),
            **kwargs,
        )
    except asyncssh.HostKeyNotVerifiable as exc:
        raise await _host_key_error(exc, target, options, offered, tunnel, ssh_config) from exc


async def _host_key_error(
    exc: asyncssh.HostKeyNotVerifiable,
    target: JumpTarget,
    options: asyncssh.SSHClientConnectionOptions,
    offered: list[tuple[asyncssh.SSHKey, str]],
    tunnel: Any,
    ssh_config: str | None,
) -> HostKeyError:
    """Unknown or changed, with the fingerprint, the host (or hop) and the file."""
    if target.username is None and target.port is None:
        dest, port = target.host, None  # an alias of the config: ssh reads the rest
    else:
        dest = f"{target.username}@{target.host}" if target.username else target.host
        port = target.port
    return await host_key_error(
        exc,
        label=repr(target.name),
        options=options,
        offered=offered,
        tunnel=tunnel,
        dest=dest,
        dest_port=port,
        jump=target.via,
        ssh_config=ssh_config,
    )

"""ProxyJump chains opened by sshpyk: each bastion is a shared pool connection.

asyncssh can follow ``ProxyJump`` by itself, but then every connection opens
its own private chain of bastion connections, and the hops do not even see the
ssh config file that sshpyk was given (asyncssh passes only its ``config=``
argument on to the hops). Instead, the pool (:mod:`sshpyk.ssh.pool`) connects the
bastion named by :func:`bastion_alias` as an ordinary shared connection (same
registry, same reference counting, same host key checks as any direct host), inside
:func:`through_bastion` (loops, error messages), and :func:`connect_via` hands that
connection to ``asyncssh.connect(..., tunnel=conn)``. So every host
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
import contextlib
import contextvars
import logging
import weakref
from collections.abc import Iterator

import asyncssh

from ..errors import HostKeyError, SSHConfigError, SSHPykError
from .hostkeys import KeyRecorder, RecorderFactory, host_key_error
from .hosts import HostOptions, JumpTarget, host_options
from .kerberos import login_error
from .prompt import LoginPrompter, PromptSettings, prompt_settings

__all__ = [
    "MAX_HOPS",
    "NUDGE_BASTIONS",
    "bastion_alias",
    "connect_via",
    "nudge_bastion",
    "through_bastion",
]

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


async def bastion_alias(host: HostOptions) -> str | None:
    """The pool alias of the bastion in front of ``host``, or None if it has none.

    A hop ``a,b`` ("``b`` as reached through ``a``") becomes plain ``b`` when ``b``'s
    own ProxyJump is ``a`` anyway, so that both spellings share one connection.
    """
    hop = host.proxy_jump
    if hop is None:
        return None
    via = JumpTarget.parse(hop).via
    if via is None:
        return hop
    last = hop.rpartition(",")[2].strip()
    own = (await host_options(last, host.ssh_config)).proxy_jump
    if own is not None and own.replace(" ", "") == via.replace(" ", ""):
        return last
    return hop


@contextlib.contextmanager
def through_bastion(alias: str, hop: str, ssh_config: str | None) -> Iterator[None]:
    """Open (or use) the connection to bastion ``hop`` on the way to ``alias``.

    Refuses a ProxyJump loop (a hop that is already being opened on the way here);
    an error of the bastion says that ``alias`` was not reached through it.
    """
    opening = (*_opening.get(), alias)
    if hop in opening or len(opening) > MAX_HOPS:
        where = f" in ssh config {ssh_config}" if ssh_config else ""
        raise SSHConfigError(
            f"ProxyJump loop{where}: {' -> '.join((*opening, hop))} (check the ProxyJump "
            "lines of these hosts)"
        )
    token = _opening.set(opening)
    try:
        yield
    except SSHPykError as exc:
        if str(exc).startswith(f"cannot reach {alias!r} through bastion"):
            raise
        wrapped = type(exc)(f"cannot reach {alias!r} through bastion {hop!r}: {exc}")
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
    host: HostOptions,
    tunnel: asyncssh.SSHClientConnection | None = None,
    *,
    tunnel_alias: str | None = None,
    client_factory: RecorderFactory = KeyRecorder,
    reconnect: bool = False,
) -> asyncssh.SSHClientConnection:
    """Open the SSH connection to ``host``, through ``tunnel`` (a bastion's) if given.

    The bastion is nudged first (see "The ~40 ms stall" above). Host keys are checked
    against the known_hosts files of the options at every hop (each bastion checked
    its own when it connected); a key that is not trusted is reported as unknown or
    changed, with its fingerprint, the host and the file (:mod:`sshpyk.ssh.hostkeys`).
    ``client_factory`` makes the asyncssh client from the list it records offered keys
    in (``sshpyk check`` passes one that also times the stages). Logins that need a
    person are asked for by a :class:`~sshpyk.ssh.prompt.LoginPrompter` of this
    connection (a bastion's prompt names it as one; ``reconnect`` says it is reopened).
    """
    if tunnel is not None:
        # before the first byte for us crosses it
        await nudge_bastion(tunnel, tunnel_alias or "bastion")
    offered: list[tuple[asyncssh.SSHKey, str]] = []
    prompter = _prompter(host, reconnect)
    clients: list[KeyRecorder] = []

    def make_client() -> KeyRecorder:
        client = client_factory(offered)
        client.prompter = prompter
        clients.append(client)
        return client

    try:
        return await asyncssh.connect(
            host.target.host,
            options=host.options,
            tunnel=tunnel if tunnel is not None else (),
            client_factory=make_client,
            passphrase=prompter.passphrase,
            **host.overrides,
        )
    except asyncssh.HostKeyNotVerifiable as exc:
        raise await _host_key_error(exc, host, offered, tunnel) from exc
    except (asyncssh.PermissionDenied, asyncssh.KeyImportError) as exc:
        if isinstance(exc, asyncssh.PermissionDenied) and not prompter.tries:
            # nobody was asked for anything (else that answer's failure is the news):
            # why Kerberos did not get in, where it could have
            kerberos = await login_error(
                host.gss,
                label=prompter.label,
                alias=host.target.name,
                user=str(host.options.username),
                offered=clients[-1].auth_offered if clients else [],
            )
            if kerberos is not None:
                raise kerberos from exc
        if prompter.failure is None:
            raise
        raise prompter.error(prompter.failure) from exc


def _prompter(host: HostOptions, reconnect: bool) -> LoginPrompter:
    """The prompter of one connection attempt; a bastion is named as one."""
    name = host.target.name
    opening = _opening.get()
    label = f"bastion {name!r} (on the way to {opening[-1]!r})" if opening else repr(name)
    cache: list[PromptSettings] = []

    def settings() -> PromptSettings:
        if not cache:  # only when a prompt is due: ``ssh -G`` costs a process
            cache.append(prompt_settings(host.target.host, host.ssh_config))
        return cache[0]

    return LoginPrompter(label, name, settings=settings, reconnect=reconnect)


async def _host_key_error(
    exc: asyncssh.HostKeyNotVerifiable,
    host: HostOptions,
    offered: list[tuple[asyncssh.SSHKey, str]],
    tunnel: asyncssh.SSHClientConnection | None,
) -> HostKeyError:
    """Unknown or changed, with the fingerprint, the host (or hop) and the file."""
    target = host.target
    if target.username is None and target.port is None:
        dest, port = target.host, None  # an alias of the config: ssh reads the rest
    else:
        dest = f"{target.username}@{target.host}" if target.username else target.host
        port = target.port
    return await host_key_error(
        exc,
        label=repr(target.name),
        options=host.options,
        offered=offered,
        tunnel=tunnel if tunnel is not None else (),
        dest=dest,
        dest_port=port,
        jump=target.via,
        ssh_config=host.ssh_config,
    )

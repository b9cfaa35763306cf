"""The sshpyk exception tree, and the one place where asyncssh/OS errors are mapped.

::

    SSHPykError
    ├── SSHConfigError            the ssh config cannot be used (parse error, bad option)
    ├── ConnectError              could not reach or log in to the host
    │   ├── HostNotFoundError     unknown alias / unresolvable host name
    │   ├── HostRefusedError  nothing listens on the port
    │   ├── ConnectTimeoutError   no answer in time
    │   ├── AuthenticationError   no key was accepted
    │   │   ├── LoginPromptError      a password/code/passphrase was wrong or nobody could be asked
    │   │   └── KerberosError         a GSSAPI (Kerberos) login failed: wrong principal/realm, ...
    │   │       ├── KerberosTicketError       no ticket, or an expired one: `kinit`
    │   │       └── KerberosUnavailableError  no gssapi package: the kerberos extra
    │   └── HostKeyError          host key not verified against known_hosts
    │       ├── UnknownHostKeyError   no known_hosts entry for the host
    │       └── ChangedHostKeyError   an entry with another key (maybe an attack)
    ├── ConnectionLostError       the SSH connection died
    ├── SessionClosedError        the SSHSession was used after close()
    ├── ForwardingRefusedError    sshd refuses port/socket forwarding
    ├── RemoteError               the remote side could not do what was asked
    │   ├── RemotePythonNotFoundError
    │   ├── RemoteJupyterClientMissingError
    │   ├── RemoteKernelSpecNotFoundError
    │   ├── KernelStartError      the kernel exited while starting
    │   │   └── LaunchFailedError     the agent could not start the kernel's process
    │   ├── UnsafePathError       a shared path another user could tamper with was refused
    │   ├── NotPermittedError     the remote user may not do that (all users: root only)
    │   ├── AgentGoneError        the agent is gone (cannot be reattached): kernels lost
    │   ├── AgentInternalError    the agent failed unexpectedly (a bug: its traceback)
    │   ├── SchedulerError        a batch scheduler's command failed (queue, cancel, submit)
    │   │   ├── SchedulerMissingError no client commands of the scheduler on the host
    │   │   └── SchedulerArgsError    the scheduler refused the kernel's job arguments
    │   ├── RequestTimeoutError   the agent did not answer a request in time
    │   └── ProtocolError         the agent answered something unexpected
    └── KernelStartTimeoutError   the kernel did not come up within start_timeout
        └── QueueTimeoutError     its batch job waited longer than the queue timeout

Each error *kind* the remote agent reports (``sshpyk.agent.remote.protocol.Kind``, and
each launcher's own, ``Launcher.error_kinds``) maps to one of these classes in one
table, ``sshpyk.agent.kinds.ERROR_CLASSES``; an unknown kind is a plain RemoteError.
The batch errors are the same classes for every scheduler: ``sshpyk check`` asks the
kernel's launcher for the fix (``Launcher.fix``).

Every message is one line that says what failed and where, and usually what to do.

asyncssh and OS errors are mapped in one place: code that talks to a host runs inside
``with translating(alias, config=...)``, which re-raises them as the errors above
(``from`` the original). Nobody else writes ``except ...: raise translate_error(...)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import asyncssh

__all__ = [
    "AgentGoneError",
    "AgentInternalError",
    "AuthenticationError",
    "BatchModeError",
    "ChangedHostKeyError",
    "ConnectError",
    "ConnectTimeoutError",
    "ConnectionLostError",
    "ForwardingRefusedError",
    "HostKeyError",
    "HostNotFoundError",
    "HostRefusedError",
    "KerberosError",
    "KerberosTicketError",
    "KerberosUnavailableError",
    "KernelStartError",
    "KernelStartTimeoutError",
    "LaunchFailedError",
    "LoginPromptError",
    "NotPermittedError",
    "ProtocolError",
    "QueueTimeoutError",
    "RemoteError",
    "RemoteJupyterClientMissingError",
    "RemoteKernelSpecNotFoundError",
    "RemotePythonNotFoundError",
    "RequestTimeoutError",
    "SSHConfigError",
    "SSHPykError",
    "SchedulerArgsError",
    "SchedulerError",
    "SchedulerMissingError",
    "SessionClosedError",
    "SharedLoginNeedsPersonError",
    "UnknownHostKeyError",
    "UnsafePathError",
    "translate_error",
    "translating",
]


class SSHPykError(Exception):
    """Base of every error sshpyk raises."""


class SSHConfigError(SSHPykError):
    pass


class ConnectError(SSHPykError):
    pass


class HostNotFoundError(ConnectError):
    pass


class HostRefusedError(ConnectError):
    pass


class ConnectTimeoutError(ConnectError):
    pass


class AuthenticationError(ConnectError):
    pass


class LoginPromptError(AuthenticationError):
    """A login that needs a person failed: a wrong answer, tries used up, BatchMode,
    or no terminal and no SSH_ASKPASS to ask on."""


class BatchModeError(LoginPromptError):
    """The login needs a person and the ssh config says never to ask (BatchMode yes)."""


class SharedLoginNeedsPersonError(LoginPromptError):
    """The connection broker cannot finish a login that needs a person (a password,
    one-time code or key passphrase): the process that asked logs in itself."""


class KerberosError(AuthenticationError):
    """A Kerberos (GSSAPI) login failed: the realm has no principal for the host, the
    server refused the user's principal, no KDC answered, or the server offers no
    GSSAPI although the ssh config asks for it."""


class KerberosTicketError(KerberosError):
    """There is no Kerberos ticket, or it has expired: run ``kinit``."""


class KerberosUnavailableError(KerberosError):
    """The server takes Kerberos but the ``gssapi`` package (the ``kerberos`` extra)
    is not installed."""


class HostKeyError(ConnectError):
    """The host key was not verified against known_hosts.

    ``problem`` and ``fix`` are the two halves of the message (what is wrong, what to
    do), ``fingerprint`` the SHA256 fingerprint of the key the server offered and
    ``known_hosts`` the file to fix, each None when not known.
    """

    def __init__(
        self,
        message: str,
        *,
        problem: str | None = None,
        fix: str | None = None,
        fingerprint: str | None = None,
        known_hosts: str | None = None,
    ) -> None:
        super().__init__(message)
        self.problem = problem
        self.fix = fix
        self.fingerprint = fingerprint
        self.known_hosts = known_hosts


class UnknownHostKeyError(HostKeyError):
    """known_hosts has no entry for the host: accept its key after verifying it."""


class ChangedHostKeyError(HostKeyError):
    """known_hosts has another key for the host (or marks this one revoked): this may
    be a man-in-the-middle attack."""


class ConnectionLostError(SSHPykError):
    pass


class SessionClosedError(SSHPykError):
    pass


class ForwardingRefusedError(SSHPykError):
    pass


class RemoteError(SSHPykError):
    pass


class RemotePythonNotFoundError(RemoteError):
    pass


class RemoteJupyterClientMissingError(RemoteError):
    pass


class RemoteKernelSpecNotFoundError(RemoteError):
    pass


class KernelStartError(RemoteError):
    pass


class LaunchFailedError(KernelStartError):
    """The agent could not start the kernel's process (e.g. its argv does not run)."""


class ProtocolError(RemoteError):
    pass


class NotPermittedError(RemoteError):
    """The remote user may not do this (``all_users`` needs root)."""


class AgentGoneError(RemoteError):
    """The agent cannot be reached or reattached any more: its kernels are lost."""


class AgentInternalError(RemoteError):
    """The agent failed unexpectedly (a bug); the message carries its last words."""


class SchedulerError(RemoteError):
    """A batch scheduler's command (queue state, cancel, submit) failed on the host."""


class SchedulerMissingError(SchedulerError):
    """The host has no client commands of the kernel's scheduler: not a login node?"""


class SchedulerArgsError(SchedulerError):
    """The scheduler refused the kernel's job arguments (tested without running a job)."""


class UnsafePathError(RemoteError):
    """A path (run root, run dir, a kernel id used as a file name) that another user
    could plant or swap; refused rather than used."""


class RequestTimeoutError(RemoteError):
    """The remote agent did not answer a request within its timeout."""


class KernelStartTimeoutError(SSHPykError):
    """The kernel did not come up within its start timeout."""


class QueueTimeoutError(KernelStartTimeoutError):
    """The kernel's batch job did not leave the queue within its launcher's queue
    timeout (the agent cancelled it)."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def translate_error(exc: BaseException, alias: str, *, config: str | None = None) -> SSHPykError:
    """Map an asyncssh/OS error raised while talking to ``alias`` onto the tree.

    The mapping behind :func:`translating`; an SSHPykError is returned unchanged.
    """
    if isinstance(exc, SSHPykError):
        return exc
    where = f"{alias!r}" + (f" (ssh config {config})" if config else "")
    if isinstance(exc, asyncssh.ConfigParseError):
        return SSHConfigError(f"cannot use the ssh config for {where}: {_one_line(exc)}")
    if isinstance(exc, socket.gaierror):
        return HostNotFoundError(
            f"unknown host {where}: not a Host alias in the ssh config and not a resolvable "
            f"name ({_one_line(exc.strerror or exc)})"
        )
    if isinstance(exc, ConnectionRefusedError):
        return HostRefusedError(
            f"connection refused by {where}: is sshd running and is the Port right?"
        )
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return ConnectTimeoutError(f"timed out connecting to {where}")
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        # connections made by sshpyk.jump tell unknown from changed keys; this is the
        # fallback for any other path
        return HostKeyError(
            f"host key of {where} not verified against known_hosts ({_one_line(exc.reason)}): "
            "it is unknown or it changed, and a changed key may mean an attack "
            "(man-in-the-middle); `sshpyk check` shows its fingerprint and what to do"
        )
    if isinstance(exc, asyncssh.PermissionDenied):
        return AuthenticationError(
            f"authentication failed for {where}: check User and IdentityFile in the ssh "
            "config and that the public key is in the remote ~/.ssh/authorized_keys"
        )
    if isinstance(exc, asyncssh.ChannelOpenError):
        if exc.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED:
            return ForwardingRefusedError(
                f"sshd on {where} refuses forwarding ({_one_line(exc.reason)}): set "
                "AllowTcpForwarding yes and AllowStreamLocalForwarding yes in its sshd_config"
            )
        return ConnectionLostError(f"cannot open a channel on {where}: {_one_line(exc.reason)}")
    if isinstance(exc, (asyncssh.ConnectionLost, asyncssh.DisconnectError, BrokenPipeError)):
        return ConnectionLostError(f"SSH connection to {where} lost: {_one_line(exc)}")
    if isinstance(exc, ConnectionResetError):
        return ConnectionLostError(f"SSH connection to {where} reset by peer")
    if isinstance(exc, OSError):
        return ConnectError(f"cannot connect to {where}: {_one_line(exc.strerror or exc)}")
    if isinstance(exc, (ValueError, KeyError)):
        # asyncssh raises ValueError for bad option values read from the config
        return SSHConfigError(f"cannot use the ssh config for {where}: {_one_line(exc)}")
    return SSHPykError(f"{type(exc).__name__} talking to {where}: {_one_line(exc)}")


@contextlib.contextmanager
def translating(alias: str, *, config: str | None = None) -> Iterator[None]:
    """Run a block that talks to ``alias``: asyncssh/OS errors leave it as SSHPykErrors.

    ``config`` is the ssh config file in use (named in the messages). SSHPykErrors and
    BaseExceptions that are not errors (cancellation, KeyboardInterrupt) pass unchanged.
    """
    try:
        yield
    except SSHPykError:
        raise
    except Exception as exc:
        raise translate_error(exc, alias, config=config) from exc

"""Host key failures told apart: an unknown key, or a changed one (maybe an attack).

asyncssh raises the same ``HostKeyNotVerifiable`` whether known_hosts has no entry for
the host or an entry with another key. Only on that error path, :func:`host_key_error`
looks the host up in the known_hosts files the connection used (as asyncssh resolved
them from ``UserKnownHostsFile``/``GlobalKnownHostsFile``, else ``~/.ssh/known_hosts``),
under the name asyncssh checks (``HostKeyAlias``, else ``HostName``; ``[name]:port``
off port 22), and names the server's key by its SHA256 fingerprint. The key is the one
the failed connection was offered (recorded by :class:`KeyRecorder`); when it was not
seen (a revoked key, a host certificate) it is fetched once more through the same path
with ``asyncssh.get_server_host_key``, bounded by a short timeout.
"""

from __future__ import annotations

import asyncio
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncssh

from ..errors import ChangedHostKeyError, HostKeyError, UnknownHostKeyError
from .prompt import PromptingClient

__all__ = [
    "DEFAULT_KNOWN_HOSTS",
    "FETCH_TIMEOUT",
    "KeyRecorder",
    "RecorderFactory",
    "host_key_error",
    "known_hosts_files",
]

DEFAULT_KNOWN_HOSTS = os.path.join("~", ".ssh", "known_hosts")

#: Bound on fetching the server's key again when the failed connection did not show it.
FETCH_TIMEOUT = 5.0


class KeyRecorder(PromptingClient):
    """Records the host key a server offered that known_hosts did not trust.

    asyncssh calls ``validate_host_public_key`` only for a key that no known_hosts
    entry trusts; answering False keeps asyncssh's verdict (the connection fails).
    As a :class:`~sshpyk.ssh.prompt.PromptingClient` it also answers logins that need
    a person, through the prompter :func:`~sshpyk.ssh.jump.connect_via` gives it.
    """

    def __init__(self, offered: list[tuple[asyncssh.SSHKey, str]] | None = None) -> None:
        super().__init__()
        self.offered: list[tuple[asyncssh.SSHKey, str]] = [] if offered is None else offered

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        self.offered.append((key, addr))
        return False


#: Makes the asyncssh client of a connection from the list it records offered keys in.
RecorderFactory = Callable[[list[tuple[asyncssh.SSHKey, str]]], KeyRecorder]


def known_hosts_files(options: asyncssh.SSHClientConnectionOptions) -> list[str]:
    """The known_hosts files asyncssh checks for these options (expanded)."""
    files: Any = getattr(options, "known_hosts", ())
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    if not isinstance(files, (list, tuple)) or not files:
        return [os.path.expanduser(DEFAULT_KNOWN_HOSTS)]
    found = [os.path.expanduser(os.fspath(f)) for f in files if isinstance(f, (str, os.PathLike))]
    return found or [os.path.expanduser(DEFAULT_KNOWN_HOSTS)]


@dataclass
class _Lookup:
    files: list[str]  # files that have entries for the host
    keys: list[asyncssh.SSHKey]  # the keys (and CA keys) they trust for it
    revoked: bool  # the offered key is marked @revoked
    portless: bool  # only a port-less entry matched (asyncssh's fallback off port 22)


def _lookup(
    files: list[str], name: str, addr: str, port: int | None, key: asyncssh.SSHKey | None
) -> _Lookup:
    found = _Lookup([], [], False, False)
    for path in files:
        try:
            known = asyncssh.read_known_hosts(path)
        except (OSError, ValueError):
            continue
        result = known.match(name, addr, port)
        trusted = [*result[0], *result[1]]
        if key is not None and key in result[2]:
            found.revoked = True
            found.files.append(path)
        if trusted:
            if path not in found.files:
                found.files.append(path)
            found.keys += trusted
            if port is not None:
                bare = known.match(name, addr, None)
                if set(bare[0]) == set(result[0]) and set(bare[1]) == set(result[1]):
                    found.portless = True
    return found


async def _fetch_key(
    host: str, port: int, options: asyncssh.SSHClientConnectionOptions, tunnel: Any
) -> asyncssh.SSHKey | None:
    try:
        return await asyncio.wait_for(
            asyncssh.get_server_host_key(host, port, tunnel=tunnel, options=options),
            FETCH_TIMEOUT,
        )
    except (asyncssh.Error, OSError, ValueError, asyncio.TimeoutError):
        return None


def _describe(key: asyncssh.SSHKey | None) -> str:
    if key is None:
        return "a key sshpyk could not fetch again"
    return f"{key.get_algorithm()} {key.get_fingerprint('sha256')}"


def _ssh_command(
    dest: str, port: int | None, jump: str | None, ssh_config: str | None, file: str
) -> str:
    parts = ["ssh"]
    default_config = os.path.expanduser(os.path.join("~", ".ssh", "config"))
    if ssh_config and os.path.abspath(ssh_config) != default_config:
        parts += ["-F", ssh_config]
    if file != os.path.expanduser(DEFAULT_KNOWN_HOSTS):
        parts += ["-o", f"UserKnownHostsFile={file}"]
    if jump:
        parts += ["-J", jump]
    if port:
        parts += ["-p", str(port)]
    parts.append(dest)
    return " ".join(shlex.quote(p) for p in parts)


def _error(
    cls: type[HostKeyError], problem: str, fix: str, key: asyncssh.SSHKey | None, file: str
) -> HostKeyError:
    return cls(
        f"{problem}. {fix[0].upper()}{fix[1:]}",
        problem=problem,
        fix=fix,
        fingerprint=key.get_fingerprint("sha256") if key else None,
        known_hosts=file,
    )


async def host_key_error(
    exc: asyncssh.HostKeyNotVerifiable,
    *,
    label: str,
    options: asyncssh.SSHClientConnectionOptions,
    offered: list[tuple[asyncssh.SSHKey, str]],
    tunnel: Any = (),
    dest: str | None = None,
    dest_port: int | None = None,
    jump: str | None = None,
    ssh_config: str | None = None,
) -> HostKeyError:
    """The one-line error for a host key that known_hosts did not verify.

    ``label`` names the host in the message (an alias or a ProxyJump hop); ``offered``
    is what a :class:`KeyRecorder` saw on the failed connection; ``tunnel`` the path to
    fetch the key again if it saw nothing. ``dest``/``dest_port``/``jump`` make the
    `ssh` command that accepts a new key (default: the label).
    """
    files = known_hosts_files(options)
    host = str(getattr(options, "host", "") or label)
    port = int(getattr(options, "port", 22) or 22)
    alias = getattr(options, "host_key_alias", None)
    name = str(alias or host)
    lookup_port = None if port == 22 else port
    key, addr = offered[-1] if offered else (None, "")
    if key is None:
        key = await _fetch_key(host, port, options, tunnel)
    loop = asyncio.get_running_loop()
    found = await loop.run_in_executor(None, _lookup, files, name, addr or "", lookup_port, key)
    where = host if port == 22 else f"{host} port {port}"
    if alias:
        where += f", HostKeyAlias {alias}"
    offers = _describe(key)
    reason = " ".join(str(exc.reason).split())
    if found.files:
        file = found.files[0]
        entry = name if lookup_port is None or found.portless else f"[{name}]:{port}"
        file_arg = "" if file == os.path.expanduser(DEFAULT_KNOWN_HOSTS) else f" -f {file}"
        what = "is REVOKED in" if found.revoked else "has CHANGED: it does not match"
        problem = (
            f"host key of {label} ({where}) {what} the entry for {entry} checked against "
            f"{file} ({reason}); the server now offers {offers}"
        )
        fix = (
            "this may be an attack (man-in-the-middle): verify that fingerprint with the "
            "host's admin before removing the old entry with "
            f"`ssh-keygen -R {shlex.quote(entry)}{file_arg}` (only if the host really was "
            "reinstalled), then connect once to accept the new key"
        )
        return _error(ChangedHostKeyError, problem, fix, key, file)
    file = files[0]
    entry = name if lookup_port is None else f"[{name}]:{port}"
    command = _ssh_command(dest or label.strip("'"), dest_port, jump, ssh_config, file)
    problem = (
        f"host key of {label} ({where}) is unknown: no entry for {entry} checked against "
        f"{', '.join(files)}; the server offers {offers}"
    )
    fix = (
        "verify that fingerprint with the host's admin, then accept it by connecting once "
        f"with `{command}` (answer yes only if the fingerprint matches)"
    )
    direct = not (jump or tunnel or getattr(options, "tunnel", None))
    if direct and not alias and not getattr(options, "proxy_command", None):
        scan = ["ssh-keyscan", *(["-p", str(port)] if port != 22 else []), host]
        fix += f" or with `{' '.join(shlex.quote(p) for p in scan)} >> {shlex.quote(file)}`"
    return _error(UnknownHostKeyError, problem, fix, key, file)

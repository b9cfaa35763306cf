"""The user's ssh config, read once per connection: host aliases, settings, options.

:func:`host_options` is the one place that turns an alias (or a ProxyJump hop or
chain) into asyncssh's connection options: what the ssh config says (HostName, User,
Port, IdentityFile, ProxyJump, Ciphers, ...) plus sshpyk's defaults on top
(keepalive always on, AES-GCM first, GSSAPI only where the config asks for it, as in
OpenSSH: :mod:`sshpyk.ssh.kerberos`). Kernels, bastions and ``sshpyk check`` all
connect with what it returns. The other functions answer the CLI's questions about
the config: which ``Host`` aliases exist (shell completion), whether an alias is one
of them, what an alias resolves to (``sshpyk check``).
"""

from __future__ import annotations

import asyncio
import fnmatch
import glob
import os
import re
import shlex
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import asyncssh

from ..errors import SSHConfigError, SSHPykError, translating
from .kerberos import GSSSettings, gss_settings

#: bytes an SSH channel of a kernel's (the relay's link, a direct forward, a channel the
#: connection broker relays) may have in flight: asyncssh's default is 2 MiB, which at
#: 100 ms RTT caps a print-heavy cell at ~20 MB/s (benchmarks/RESULTS.md)
CHANNEL_WINDOW = 8 << 20

__all__ = [
    "CHANNEL_WINDOW",
    "DEFAULT_KEEPALIVE_COUNT_MAX",
    "DEFAULT_KEEPALIVE_INTERVAL",
    "PREFERRED_CIPHERS",
    "HostOptions",
    "HostSettings",
    "JumpTarget",
    "alias_in_config",
    "config_path",
    "host_aliases",
    "host_options",
    "host_patterns",
    "preferred_ciphers",
    "resolve_host",
]

#: Used when the ssh config sets no ServerAliveInterval: keepalive is always on.
DEFAULT_KEEPALIVE_INTERVAL = 15.0
DEFAULT_KEEPALIVE_COUNT_MAX = 3

#: asyncssh's first choice, chacha20-poly1305, is computed in Python around
#: cryptography's primitives; AES-GCM runs in OpenSSL with AES-NI. With AES-GCM first a
#: kernel_info round trip costs +0.07 ms over a local kernel instead of +0.86 ms, and a
#: forward moves ~1.5x the bytes per CPU second (benchmarks/RESULTS.md).
PREFERRED_CIPHERS = (b"aes128-gcm@openssh.com", b"aes256-gcm@openssh.com")

_MAX_INCLUDE_DEPTH = 16


def config_path(ssh_config: str | os.PathLike[str] | None) -> str | None:
    """The config file sshpyk uses: ``ssh_config`` made absolute, else ``~/.ssh/config``.

    None when there is no config file at all; a named file that does not exist is an
    error.
    """
    if ssh_config:
        path = os.path.abspath(os.path.expanduser(os.fspath(ssh_config)))
        if not os.path.isfile(path):
            raise SSHPykError(f"ssh config file {path} does not exist")
        return path
    default = os.path.expanduser("~/.ssh/config")
    return default if os.path.isfile(default) else None


# -- ProxyJump hops --------------------------------------------------------------------


@dataclass(frozen=True)
class JumpTarget:
    """What a connection alias names: a Host alias, a ProxyJump hop, or a chain.

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


# -- connection options ----------------------------------------------------------------


def preferred_ciphers(algs: list[bytes]) -> list[bytes] | None:
    """asyncssh's default cipher list with AES-GCM first, or None when the ssh config
    chose its own ``Ciphers`` (then its order stands)."""
    from asyncssh.encryption import get_default_encryption_algs

    if algs != list(get_default_encryption_algs()):
        return None
    first = [a for a in PREFERRED_CIPHERS if a in algs]
    return first + [a for a in algs if a not in first]


@dataclass(frozen=True)
class HostOptions:
    """How to connect to one alias: asyncssh's options and sshpyk's overrides.

    ``options`` are what the ssh config says; ``overrides`` are keyword arguments for
    ``asyncssh.connect`` that sshpyk adds on top (keepalive when the config sets none,
    AES-GCM first when it chose no ``Ciphers``, GSSAPI as ``gss`` says).
    """

    target: JumpTarget
    ssh_config: str | None
    options: asyncssh.SSHClientConnectionOptions
    overrides: dict[str, Any]
    #: GSSAPI (Kerberos) as the ssh config sets it, OpenSSH's defaults (off) otherwise
    gss: GSSSettings = field(default_factory=GSSSettings)

    @property
    def proxy_jump(self) -> str | None:
        """The hop in front of the target: a chain's ``via``, else the config's ProxyJump
        (``none`` reads as None)."""
        if self.target.via is not None:
            return self.target.via
        tunnel = getattr(self.options, "tunnel", None)
        return tunnel.strip() if isinstance(tunnel, str) and tunnel.strip() else None


async def host_options(alias: str, ssh_config: str | None) -> HostOptions:
    """Build the connection options for ``alias`` (a Host alias, a hop or a chain).

    ``ssh_config`` is an absolute file or None (see :func:`config_path`). The options
    read key files, so they are built in an executor. Errors are one-line
    SSHConfigErrors.
    """
    target = JumpTarget.parse(alias)
    config: Any = [ssh_config] if ssh_config else ()
    loop = asyncio.get_running_loop()
    with translating(alias, config=ssh_config):
        options = await loop.run_in_executor(
            None, partial(asyncssh.SSHClientConnectionOptions, config=config, **target.options)
        )
    overrides: dict[str, Any] = {}
    if not options.keepalive_interval:
        overrides["keepalive_interval"] = DEFAULT_KEEPALIVE_INTERVAL
        overrides["keepalive_count_max"] = DEFAULT_KEEPALIVE_COUNT_MAX
    preferred = preferred_ciphers(list(options.encryption_algs))
    if preferred is not None:
        overrides["encryption_algs"] = [alg.decode("ascii") for alg in preferred]
    # asyncssh tries GSSAPI unless the config turns it off; ssh(1) only if it turns it on
    gss = gss_settings(options)
    overrides.update(gss.overrides())
    return HostOptions(target, ssh_config, options, overrides, gss)


# -- what the config says ----------------------------------------------------------------

_KEY_VALUE = re.compile(r"^(\w+)(?:\s*=\s*|\s+)(.*)$")


def _split(line: str) -> tuple[str, list[str]]:
    """``Key value``, ``Key=value`` or ``Key = value`` -> (lowercase key, arguments)."""
    line = line.strip()
    match = _KEY_VALUE.match(line)
    if not match or line.startswith("#"):
        return "", []
    key, rest = match.groups()
    try:
        args = shlex.split(rest, comments=True)
    except ValueError:
        args = rest.split()
    return key.lower(), args


def host_patterns(ssh_config: str | None) -> list[str]:
    """Every pattern of every ``Host`` line, following ``Include`` (in file order)."""
    patterns: list[str] = []
    if ssh_config:
        _collect(ssh_config, patterns, 0, os.path.dirname(ssh_config))
    return patterns


def _collect(path: str, out: list[str], depth: int, base: str) -> None:
    if depth > _MAX_INCLUDE_DEPTH:
        return
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return
    for line in lines:
        key, args = _split(line)
        if key == "host":
            out.extend(args)
        elif key == "include":
            for pattern in args:
                pattern = os.path.expanduser(pattern)
                if not os.path.isabs(pattern):
                    # OpenSSH: relative to ~/.ssh for user configs; for a config kept
                    # elsewhere (--ssh-config), also try next to that file
                    relative = pattern
                    pattern = os.path.join(os.path.expanduser("~/.ssh"), relative)
                    if not glob.glob(pattern):
                        pattern = os.path.join(base, relative)
                for included in sorted(glob.glob(pattern)):
                    if os.path.isfile(included):
                        _collect(included, out, depth + 1, base)


def host_aliases(ssh_config: str | None) -> list[str]:
    """The literal aliases (no wildcards, no negations) of the ``Host`` lines."""
    seen: dict[str, None] = {}
    for pattern in host_patterns(ssh_config):
        if not any(c in pattern for c in "*?!"):
            seen.setdefault(pattern, None)
    return list(seen)


def alias_in_config(alias: str, ssh_config: str | None) -> bool:
    """True if a ``Host`` line other than a bare ``*`` matches ``alias``."""
    for pattern in host_patterns(ssh_config):
        if pattern == "*" or pattern.startswith("!"):
            continue
        if fnmatch.fnmatchcase(alias, pattern):
            return True
    return False


@dataclass(frozen=True)
class HostSettings:
    """What an alias resolves to in the ssh config."""

    alias: str
    ssh_config: str | None
    hostname: str
    user: str
    port: int
    proxy_jump: str | None = None
    proxy_command: str | None = None
    identity_files: tuple[str, ...] = field(default_factory=tuple)
    known_hosts: tuple[str, ...] = field(default_factory=tuple)

    def summary(self) -> str:
        parts = [f"HostName {self.hostname}", f"User {self.user}", f"Port {self.port}"]
        if self.proxy_jump:
            parts.append(f"ProxyJump {self.proxy_jump}")
        if self.proxy_command:
            parts.append(f"ProxyCommand {self.proxy_command}")
        if not (self.proxy_jump or self.proxy_command):
            parts.append("no ProxyJump")
        return ", ".join(parts)


def _strings(value: Any) -> tuple[str, ...]:
    if not value:
        return ()
    if isinstance(value, (str, os.PathLike)):
        return (os.fspath(value),)
    if isinstance(value, (list, tuple)):
        return tuple(os.fspath(v) for v in value if isinstance(v, (str, os.PathLike)))
    return ()


async def resolve_host(alias: str, ssh_config: str | None) -> tuple[HostSettings, HostOptions]:
    """Resolve ``alias`` like a connection would: its settings and its options."""
    built = await host_options(alias, ssh_config)
    options = built.options
    proxy = options.proxy_command
    settings = HostSettings(
        alias=alias,
        ssh_config=ssh_config,
        hostname=str(options.host),
        user=str(options.username),
        port=int(options.port),
        proxy_jump=built.proxy_jump,
        proxy_command=proxy if isinstance(proxy, str) or proxy is None else " ".join(proxy),
        identity_files=_strings(options.config.get("IdentityFile")),
        known_hosts=_strings(options.known_hosts),
    )
    return settings, built

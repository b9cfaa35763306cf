"""The user's ssh config, as sshpyk sees it: host aliases and resolved host settings.

asyncssh reads the config for connections; this module answers the questions the CLI
asks about it: which ``Host`` aliases exist (shell completion), whether an alias is
one of them, and what HostName/User/Port/ProxyJump an alias resolves to (``sshpyk
check``).
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

from .errors import SSHPykError, translate_error

__all__ = [
    "HostSettings",
    "alias_in_config",
    "config_path",
    "host_aliases",
    "host_patterns",
    "resolve_host",
]

_MAX_INCLUDE_DEPTH = 16


def config_path(ssh_config: str | os.PathLike[str] | None) -> str | None:
    """The config file sshpyk uses: ``ssh_config`` made absolute, else ``~/.ssh/config``.

    Mirrors :meth:`sshpyk.SSHSession.connect`; None when there is no config file at all.
    """
    if ssh_config:
        path = os.path.abspath(os.path.expanduser(os.fspath(ssh_config)))
        if not os.path.isfile(path):
            raise SSHPykError(f"ssh config file {path} does not exist")
        return path
    default = os.path.expanduser("~/.ssh/config")
    return default if os.path.isfile(default) else None


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


async def resolve_host(
    alias: str, ssh_config: str | None
) -> tuple[HostSettings, asyncssh.SSHClientConnectionOptions]:
    """Resolve ``alias`` like a connection would; also return the asyncssh options.

    The options read key files, so they are built in an executor.
    """
    config: Any = [ssh_config] if ssh_config else ()
    loop = asyncio.get_running_loop()
    try:
        options = await loop.run_in_executor(
            None, partial(asyncssh.SSHClientConnectionOptions, config=config, host=alias)
        )
    except Exception as exc:
        raise translate_error(exc, alias, config=ssh_config) from exc
    raw = options.config
    tunnel = options.tunnel
    proxy = options.proxy_command
    settings = HostSettings(
        alias=alias,
        ssh_config=ssh_config,
        hostname=str(options.host),
        user=str(options.username),
        port=int(options.port),
        proxy_jump=tunnel if isinstance(tunnel, str) else None,
        proxy_command=proxy if isinstance(proxy, str) or proxy is None else " ".join(proxy),
        identity_files=_strings(raw.get("IdentityFile")),
        known_hosts=_strings(options.known_hosts),
    )
    return settings, options

"""The remote shell command that starts Python, and what goes on its stdin first.

sshd's shell runs :attr:`RemoteCommand.command`; every user on the host can read it in
``ps``, so it holds no secrets: the pre-command's text and the agent's loader follow on
the channel's stdin (:attr:`RemoteCommand.stdin`), before the first protocol line. The
loader names the agent's code by its hash (:data:`AGENT_HASH`) and takes it compiled from
the user's cache on the host; only where it is not cached yet does it ask for the code
(``need_code``): then :attr:`RemoteCommand.code` follows (see ``remote/loader.py``).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from ..errors import SSHPykError
from .bundle import agent_bundle, module_sources
from .remote.loader import HASH_KEY, VERSION_KEY, bundle_hash, encode_bundle
from .remote.protocol import LOADER, PROTOCOL

__all__ = [
    "AGENT_HASH",
    "AGENT_SOURCE",
    "RemoteCommand",
    "extension_source",
    "load_fields",
    "python_command",
    "remote_command",
]

#: the agent's code (its core modules, see sshpyk.agent.bundle), sent on stdin after
#: the pre-command
AGENT_SOURCE = agent_bundle()
#: its name in the hosts' caches
AGENT_HASH = bundle_hash(AGENT_SOURCE)
#: what the agent's stdin starts with (after the pre-command): the loader and the hash
_BOOT_HEADER = encode_bundle(
    {
        "loader": module_sources(("loader",))["loader"],
        HASH_KEY: AGENT_HASH,
        VERSION_KEY: PROTOCOL,
    }
)


def extension_source(name: str, modules: tuple[str, ...]) -> dict[str, str]:
    """The remote modules of extension ``name`` (a launcher's: its ``modules``, in
    dependency order) as {module: source}, sent to an agent on first use only."""
    return module_sources(modules)


def load_fields(name: str, modules: tuple[str, ...]) -> dict[str, Any]:
    """The fields of the ``load`` request that sends extension ``name`` to an agent."""
    return {"name": name, "modules": extension_source(name, modules)}


#: reads the pre-command from stdin (a line count, then the lines) and runs it: the
#: shell's argv, which every user on the host can read in ``ps``, never holds its text
_READ_PRE_COMMAND = (
    'IFS= read -r n || exit 98; s=; i=0; while [ "$i" -lt "$n" ]; do '
    'IFS= read -r l || exit 98; s="$s$l\n"; i=$((i+1)); done; eval "$s"; unset n s i l'
)


@dataclass(frozen=True)
class RemoteCommand:
    """A shell command for the remote host and what it reads first on stdin."""

    #: what sshd's shell runs; visible to every user on the host (``ps``): no secrets
    command: str
    #: written to the channel's stdin before anything else (the pre-command's text)
    stdin: bytes = b""
    #: sent when the remote side asks for it (``need_code``): the agent's bundle
    code: bytes = b""


def python_command(python: str, pre_command: str | None, code: str, *args: str) -> RemoteCommand:
    """The shell command that runs ``python -c code args...`` on the remote host.

    ``python`` is an executable (``python3``, ``/usr/bin/python3``, ``~/venv/bin/python``)
    or an environment prefix such as ``/opt/conda/envs/x`` (then its ``bin/python``);
    ``pre_command`` runs first in the same shell. It travels on stdin, not in the
    command line, so a token it exports does not show in other users' ``ps``.
    """
    if not python or python.startswith("-"):
        raise SSHPykError(
            f"remote python {python!r} is not a path or command name "
            "(it must not be empty or start with '-')"
        )
    if python.startswith("~/"):
        quoted = '"$HOME"/' + shlex.quote(python[2:])
    else:
        quoted = shlex.quote(python)
    argv = "".join(" " + shlex.quote(a) for a in args)
    lines = []
    stdin = b""
    if pre_command:
        text = pre_command.rstrip("\n").split("\n")
        stdin = (f"{len(text)}\n" + "".join(line + "\n" for line in text)).encode("utf-8")
        lines.append(_READ_PRE_COMMAND)
    if "/" in python:
        lines.append(f'p={quoted}; [ -d "$p" ] && p="$p/bin/python"')
        lines.append(f'exec "$p" -c {shlex.quote(code)}{argv}')
    else:
        lines.append(f"exec {quoted} -c {shlex.quote(code)}{argv}")
    return RemoteCommand("\n".join(lines), stdin)


def remote_command(python: str, pre_command: str | None = None) -> RemoteCommand:
    """The command that starts the agent with the remote Python; its stdin carries the
    pre-command, then the loader and the hash of the agent's code (the first protocol
    lines follow at once; the code itself only if the host asks for it)."""
    # the loader reads a header (a length line, then JSON), see LOADER and loader.boot
    command = python_command(python, pre_command, LOADER)
    return RemoteCommand(command.command, command.stdin + _BOOT_HEADER, AGENT_SOURCE)

"""The one table from the agent's error kinds to the exception tree.

The kinds are defined once, in :class:`sshpyk.agent.remote.protocol.Kind` (a module
that is also sent to the remote agent), and a launcher's own in its modules (added with
:func:`add_error_classes` when the launcher is registered,
``sshpyk.kernels.launcher.register``); each maps to one class of :mod:`sshpyk.errors`.
A kind this table does not know is a plain RemoteError.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import (
    AgentGoneError,
    AgentInternalError,
    KernelStartError,
    LaunchFailedError,
    NotPermittedError,
    ProtocolError,
    RemoteError,
    RemoteJupyterClientMissingError,
    RemoteKernelSpecNotFoundError,
    SSHPykError,
    UnsafePathError,
)
from .remote.protocol import Kind

__all__ = [
    "ERROR_CLASSES",
    "add_error_classes",
    "error_class",
    "last_lines",
    "remote_error",
    "remove_error_classes",
]

ERROR_CLASSES: dict[str, type[SSHPykError]] = {
    Kind.PROTOCOL: ProtocolError,
    Kind.INTERNAL: AgentInternalError,
    Kind.JUPYTER_CLIENT_MISSING: RemoteJupyterClientMissingError,
    Kind.KERNELSPEC_NOT_FOUND: RemoteKernelSpecNotFoundError,
    Kind.LAUNCH_FAILED: LaunchFailedError,
    Kind.KERNEL_EXITED: KernelStartError,
    Kind.NOT_FOUND: RemoteError,
    Kind.UNSAFE_PATH: UnsafePathError,
    Kind.NOT_PERMITTED: NotPermittedError,
    Kind.AGENT_GONE: AgentGoneError,
    Kind.BUSY: RemoteError,
}


def add_error_classes(classes: Mapping[str, type[SSHPykError]]) -> None:
    """Map a launcher's own error kinds to their classes; a kind already mapped to
    another class is a ValueError (two launchers, one name)."""
    for kind, cls in classes.items():
        if ERROR_CLASSES.get(kind, cls) is not cls:
            raise ValueError(f"error kind {kind!r} is already mapped")
    ERROR_CLASSES.update(classes)


def remove_error_classes(kinds: Iterable[str]) -> None:
    """Undo :func:`add_error_classes` (a launcher registered for a while: a test's)."""
    for kind in kinds:
        ERROR_CLASSES.pop(kind, None)


def error_class(kind: object) -> type[SSHPykError]:
    """The class of error ``kind``; RemoteError for a kind this version does not know."""
    return ERROR_CLASSES.get(str(kind), RemoteError)


def last_lines(text: str, count: int = 3) -> str:
    """The last ``count`` non-empty lines of ``text``, joined on one line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-count:])


def remote_error(event: dict[str, Any], alias: str) -> SSHPykError:
    """The error an ``error`` event from the agent on ``alias`` reports."""
    message = f"{event.get('message')} on {alias!r}"
    tail = last_lines(str(event.get("stderr_tail") or ""), 5)
    if tail:
        message += f"; kernel output: {tail}"
    return error_class(event.get("kind"))(message)

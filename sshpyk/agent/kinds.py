"""The one table from the agent's error kinds to the exception tree.

The kinds are defined once, in :class:`sshpyk.agent.remote.protocol.Kind` (a module
that is also sent to the remote agent); each maps to one class of
:mod:`sshpyk.errors`. A kind this table does not know is a plain RemoteError.
"""

from __future__ import annotations

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
    SlurmArgsError,
    SlurmError,
    SlurmMissingError,
    SlurmQueueTimeoutError,
    SSHPykError,
    UnsafePathError,
)
from .remote.protocol import Kind

__all__ = ["ERROR_CLASSES", "error_class", "last_lines", "remote_error"]

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
    Kind.SLURM_MISSING: SlurmMissingError,
    Kind.SLURM_ERROR: SlurmError,
    Kind.SLURM_ARGS: SlurmArgsError,
    Kind.SLURM_QUEUE_TIMEOUT: SlurmQueueTimeoutError,
    Kind.SLURM_FAILED: KernelStartError,
}


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

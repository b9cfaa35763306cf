"""sshpyk: Jupyter kernels on remote machines over one SSH connection."""

from __future__ import annotations

__version__ = "2.0.0.dev0"

from .errors import (
    AuthenticationError,
    ChangedHostKeyError,
    ConnectError,
    ConnectionLostError,
    ConnectTimeoutError,
    ForwardingRefusedError,
    HostKeyError,
    HostNotFoundError,
    HostRefusedError,
    KernelStartError,
    KernelStartTimeoutError,
    ProtocolError,
    RemoteError,
    RemoteJupyterClientMissingError,
    RemoteKernelSpecNotFoundError,
    RemotePythonNotFoundError,
    RequestTimeoutError,
    SessionClosedError,
    SSHConfigError,
    SSHPykError,
    UnknownHostKeyError,
    UnsafePathError,
)
from .kernels.kernel import KernelOptions, RemoteKernel
from .kernels.session import SSHSession
from .kernelspec import SSHKernelSpec
from .provisioner import SSHKernelProvisioner

__all__ = [
    "AuthenticationError",
    "ChangedHostKeyError",
    "ConnectError",
    "ConnectTimeoutError",
    "ConnectionLostError",
    "ForwardingRefusedError",
    "HostKeyError",
    "HostNotFoundError",
    "HostRefusedError",
    "KernelOptions",
    "KernelStartError",
    "KernelStartTimeoutError",
    "ProtocolError",
    "RemoteError",
    "RemoteJupyterClientMissingError",
    "RemoteKernel",
    "RemoteKernelSpecNotFoundError",
    "RemotePythonNotFoundError",
    "RequestTimeoutError",
    "SSHConfigError",
    "SSHKernelProvisioner",
    "SSHKernelSpec",
    "SSHPykError",
    "SSHSession",
    "SessionClosedError",
    "UnknownHostKeyError",
    "UnsafePathError",
    "__version__",
]

"""Values of kernel options that need more than a type to be read: srun arguments
(``slurm_args``) and explicit forwards (``forward``). config.py declares the options;
the kernel layer reads them through these functions."""

from __future__ import annotations

import os
import shlex

from .errors import SSHPykError

__all__ = ["check_forwards", "parse_forward", "parse_slurm_args"]


def _port(text: str, what: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise SSHPykError(f"{what} {text!r} is not a port number") from None
    if not 0 < port < 65536:
        raise SSHPykError(f"{what} {port} is not a port number (1-65535)")
    return port


def _unprivileged_start() -> int:
    """The lowest port a user who is not root may listen on (Linux's sysctl, else 1024)."""
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 1024


def parse_forward(text: str) -> tuple[int, str, int]:
    """An explicit forward, ``PORT`` (the remote's localhost:PORT on the same local
    port) or ``LOCAL:REMOTE_HOST:REMOTE_PORT`` (REMOTE_HOST as the remote host sees it,
    [brackets] around an IPv6 address): (local port, remote host, remote port), or
    SSHPykError with the reason in one line."""
    text = text.strip()
    what = f"--forward {text!r}:"
    if ":" not in text:
        local = remote_port = _port(text, f"{what} the port")
        host = "localhost"
    else:
        local_text, _, rest = text.partition(":")
        host, sep, port_text = rest.rpartition(":")
        if not sep or not host:
            raise SSHPykError(f"{what} use PORT or LOCAL_PORT:REMOTE_HOST:REMOTE_PORT")
        local = _port(local_text, f"{what} the local port")
        remote_port = _port(port_text, f"{what} the remote port")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host or any(c.isspace() for c in host) or "[" in host or "]" in host:
            raise SSHPykError(f"{what} {host!r} is not a host name or address")
    if os.geteuid() != 0 and local < _unprivileged_start():
        raise SSHPykError(
            f"{what} local port {local} is privileged: only root may listen on it "
            f"(use a port >= {_unprivileged_start()}, e.g. {local + 8000}:{host}:{remote_port})"
        )
    return local, host, remote_port


def check_forwards(values: list[str]) -> str | None:
    """What is wrong with a list of ``--forward`` values (None: nothing)."""
    locals_seen: set[int] = set()
    for text in values:
        try:
            local, _, _ = parse_forward(text)
        except SSHPykError as exc:
            return str(exc)
        if local in locals_seen:
            return f"--forward {text!r}: local port {local} is forwarded twice"
        locals_seen.add(local)
    return None


_STDIO = "the kernel's stdio is how sshpyk drives it"
#: srun options sshpyk sets itself, and why a user may not
_SRUN_MANAGED = {
    "--input": _STDIO,
    "-i": _STDIO,
    "--output": _STDIO,
    "-o": _STDIO,
    "--error": _STDIO,
    "-e": _STDIO,
    "--pty": _STDIO,
    "--unbuffered": _STDIO,
    "-u": _STDIO,
    "--label": _STDIO,
    "-l": _STDIO,
    "--multi-prog": "a kernel is one program",
    "--ntasks": "a kernel is one task",
    "-n": "a kernel is one task",
    "--test-only": "sshpyk check runs srun --test-only",
}


def parse_slurm_args(text: str) -> list[str]:
    """The srun arguments in ``slurm_args`` (shell quoting), or SSHPykError with the
    reason (an option sshpyk sets itself)."""
    try:
        args = shlex.split(text)
    except ValueError as exc:
        raise SSHPykError(f"--slurm-args {text!r}: {exc}") from None
    for arg in args:
        if arg.startswith("--"):
            name = arg.split("=", 1)[0]
        elif arg.startswith("-") and len(arg) >= 2:
            name = arg[:2]  # a short option, maybe with its value attached (-n4)
        else:
            continue  # the value of the option before
        if name in _SRUN_MANAGED:
            raise SSHPykError(f"--slurm-args: {name} is set by sshpyk ({_SRUN_MANAGED[name]})")
    return args

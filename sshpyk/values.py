"""Values of kernel options that need more than a type to be read: a scheduler's job
arguments (a batch launcher's ``<name>_args``) and explicit forwards (``forward``).
config.py and the launchers declare the options; the kernel layer reads them through
these functions."""

from __future__ import annotations

import os
import shlex

from .errors import SSHPykError

__all__ = ["check_forwards", "parse_forward", "parse_job_args"]


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


def parse_job_args(
    text: str, flag: str, managed: dict[str, str], *, attached: bool = True
) -> list[str]:
    """A scheduler's job arguments in ``text`` (shell quoting), or SSHPykError with the
    reason, naming ``flag`` (``--<launcher>-args``): ``managed`` holds the options sshpyk
    sets itself (``--name``, ``-x``, ``-name``) and why a user may not; ``attached``:
    a short option's value may be attached (``-n4``, as getopt reads it)."""
    try:
        args = shlex.split(text)
    except ValueError as exc:
        raise SSHPykError(f"{flag} {text!r}: {exc}") from None
    for arg in args:
        if arg.startswith("--"):
            name = arg.split("=", 1)[0]
        elif arg.startswith("-") and len(arg) >= 2:
            name = arg[:2] if attached and arg not in managed else arg
        else:
            continue  # the value of the option before
        if name in managed:
            raise SSHPykError(f"{flag}: {name} is set by sshpyk ({managed[name]})")
    return args

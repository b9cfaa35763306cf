"""The forwarding stages: sshd allows TCP forwarding, and unix socket (ipc) forwarding
to where run dirs go; each refusal is fatal only for the transport that needs it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import asyncssh

from ..agent.command import python_command
from ..errors import SSHPykError, translating
from ..kernels.launcher import launcher_for
from .report import Diagnosis, Status, one_line

__all__ = ["expected_transport", "stage_forwarding", "stage_ipc"]

#: A loopback port nothing should listen on: sshd answers "connect failed" (2) when it
#: allows TCP forwarding and "administratively prohibited" (1) when it does not.
PROBE_PORT = 1
#: bootstrap.py's limit for the run dir prefix of unix sockets (sun_path is 108 bytes)
MAX_IPC_PREFIX = 100
#: what a kernel's run dir adds to its root: "/sshpyk-<8 of kernel id>-<8 random>/k"
_RUN_DIR_TAIL = "/sshpyk-12345678-abcdefgh/k"


def expected_transport(d: Diagnosis) -> str:
    """What a kernel's forwards would connect to on the host: ipc (unix sockets) or
    tcp, as the launcher says, and for auto as the agent picks (ipc for ipykernel
    when the run dir fits in a unix socket path)."""
    transport = launcher_for(d.target.launcher).remote_transport(d.target.transport)
    if transport != "auto":
        return transport
    argv = " ".join(str(a) for a in d.kernelspec.get("argv") or [])
    if "ipykernel" in argv and d.ipc_path_ok:
        return "ipc"
    return "tcp"


async def stage_forwarding(d: Diagnosis) -> None:
    assert d.session is not None
    started = time.monotonic()
    try:
        refused = await asyncio.wait_for(_tcp_forwarding_refused(d), d.timeout)
    except (SSHPykError, asyncio.TimeoutError) as exc:
        d.fail(
            "forwarding",
            time.monotonic() - started,
            str(exc) or f"no answer within {d.timeout:g}s",
            None,
        )
    seconds = time.monotonic() - started
    if not refused:
        d.record("forwarding", Status.OK, seconds, "sshd allows TCP forwarding")
        return
    detail = f"sshd refuses TCP forwarding ({refused})"
    fix = f"set `AllowTcpForwarding yes` in the sshd_config of {d.target.alias}"
    if expected_transport(d) == "tcp":
        d.record(
            "forwarding",
            Status.FAIL,
            seconds,
            detail + ": tcp transport cannot work",
            fix + ", or use ipc: " + d.target.change("--transport ipc"),
        )
    else:
        d.record(
            "forwarding",
            Status.WARN,
            seconds,
            detail + ": fine for the ipc transport, fatal for tcp",
            fix,
        )


async def _tcp_forwarding_refused(d: Diagnosis) -> str | None:
    assert d.session is not None
    conn = await d.session.connection()
    with translating(d.target.alias, config=d.config):
        try:
            _, writer = await conn.open_connection("127.0.0.1", PROBE_PORT)
        except asyncssh.ChannelOpenError as exc:
            if exc.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED:
                return one_line(exc.reason) or "administratively prohibited"
            return None  # connect failed on the remote side: forwarding is allowed
    writer.close()
    return None


async def stage_ipc(d: Diagnosis) -> None:
    t = d.target
    started = time.monotonic()
    try:
        path, refused = await asyncio.wait_for(_ipc_probe(d), d.timeout)
    except (SSHPykError, asyncio.TimeoutError) as exc:
        detail = str(exc) or f"no answer within {d.timeout:g}s"
        _ipc_result(d, time.monotonic() - started, f"cannot probe unix sockets: {detail}", None)
        return
    seconds = time.monotonic() - started
    root = os.path.dirname(os.path.dirname(path))
    if len(root) + len(_RUN_DIR_TAIL) > MAX_IPC_PREFIX:
        d.ipc_path_ok = False
        _ipc_result(
            d,
            seconds,
            f"run dirs under {root} are too long for unix sockets",
            "use a shorter remote run root: " + t.change("--remote-run-root /tmp"),
        )
    elif refused:
        _ipc_result(
            d,
            seconds,
            f"sshd refuses unix socket forwarding ({refused})",
            f"set `AllowStreamLocalForwarding yes` in the sshd_config of {t.alias}",
        )
    else:
        d.record(
            "ipc",
            Status.OK,
            seconds,
            f"unix socket forwarding works (probe socket in {os.path.dirname(path)})",
        )


def _ipc_result(d: Diagnosis, seconds: float, detail: str, fix: str | None) -> None:
    """Unix socket forwarding does not work: fatal if the kernel's forwards need it."""
    t = d.target
    if expected_transport(d) != "ipc":
        tail = "auto picks tcp" if t.transport == "auto" else f"not needed for {t.transport}"
        d.record("ipc", Status.WARN, seconds, f"{detail} ({tail})", fix)
        return
    if launcher_for(t.launcher).remote_transport("tcp") == "tcp":
        need = f"the {t.transport} transport needs it"
        fixes = [fix, "use tcp: " + t.change("--transport tcp")]
    else:  # the launcher's forwards go to unix sockets whatever the transport
        need, fixes = f"the {t.launcher} launcher's forwards need it", [fix]
    d.record(
        "ipc", Status.FAIL, seconds, f"{detail}: {need}", ", or ".join(filter(None, fixes)) or None
    )


async def _ipc_probe(d: Diagnosis) -> tuple[str, str | None]:
    """Bind a unix socket where kernels would go and open a channel to it.

    Returns (socket path, refusal reason or None). OpenSSH answers "open failed"
    both for a refused and for a missing socket, so only a listening socket tells
    whether forwarding is allowed.
    """
    t = d.target
    assert d.session is not None
    conn = await d.session.connection()
    command = python_command(t.python, t.pre_command, _IPC_PROBE, t.run_root or "")
    process = await conn.create_process(command.command)
    try:
        if command.stdin:
            process.stdin.write(command.stdin.decode("utf-8"))
        line = await process.stdout.readline()
        path = line.strip()
        if not path.startswith("/"):
            await asyncio.wait_for(process.wait_closed(), 5)
            stderr = one_line(await process.stderr.read())
            raise SSHPykError(
                "the unix socket probe failed on "
                f"{t.alias!r}: {stderr or path or f'exit status {process.exit_status}'}"
            )
        try:
            _, writer = await conn.open_unix_connection(path)
        except asyncssh.ChannelOpenError as exc:
            return path, one_line(exc.reason) or "open failed"
        writer.close()
        return path, None
    finally:
        with contextlib.suppress(Exception):
            process.stdin.write_eof()  # the probe removes its socket and exits
        try:
            await asyncio.wait_for(process.wait_closed(), 5)
        except asyncio.TimeoutError:
            process.close()


#: Run by the remote Python: bind a unix socket where run dirs go, print its path,
#: wait for stdin EOF, remove it. Python >= 3.8, stdlib only.
_IPC_PROBE = """
import os, socket, sys, tempfile
root = sys.argv[1] if len(sys.argv) > 1 else ""
if root:
    os.makedirs(root, mode=0o700, exist_ok=True)
    roots = [root]
else:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    roots = [r for r in (xdg, tempfile.gettempdir()) if r and os.access(r, os.W_OK)]
d = tempfile.mkdtemp(prefix="sshpyk-check-", dir=roots[0])
p = os.path.join(d, "k-1")
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.bind(p)
    s.listen(4)
    print(p, flush=True)
    sys.stdin.read()
finally:
    s.close()
    if os.path.exists(p):
        os.unlink(p)
    os.rmdir(d)
"""

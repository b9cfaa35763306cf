"""Raw tunnel throughput: bytes from a "remote" TCP source through one SSH forward.

``run.py`` imports :func:`measure_all`. The forwarders run as their own processes, so
each one (OpenSSH's ``ssh -L``, an ``ssh`` ControlMaster forward as sshpyk 1.25 sets
them up, sshpyk's ForwardSet, asyncssh's ``forward_local_port``) gets a whole core the
same way; the source and the sink are cheap (``sendall``/``recv_into`` of 1 MiB).

As a script: ``tunnel.py source BYTES`` and ``tunnel.py forward MODE ...`` are those
helper processes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import procstat

CHUNK = 1 << 20
OPENSSH = "OpenSSH ssh -L"
FORWARDSET = "sshpyk ForwardSet"
ASYNCSSH = "asyncssh forward_local_port"
CONTROLMASTER = "OpenSSH ControlMaster + ssh -O forward (as sshpyk 1.25)"


# -- helper processes -------------------------------------------------------------------


def serve_source(total: int) -> None:
    """Listen on 127.0.0.1:0, print the port; send ``total`` bytes to each connection."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    print(server.getsockname()[1], flush=True)
    payload = memoryview(b"\x5a" * CHUNK)

    def send(conn: socket.socket) -> None:
        sent = 0
        try:
            while sent < total:
                n = min(CHUNK, total - sent)
                conn.sendall(payload[:n])
                sent += n
        except OSError:
            pass
        finally:
            conn.close()

    def accept() -> None:
        while True:
            conn, _ = server.accept()
            threading.Thread(target=send, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    sys.stdin.read()  # until the parent closes our stdin


class _FixedTarget:
    """What ForwardSet needs of a remote kernel (sshpyk.agent.process.KernelProcess): here a
    plain TCP port on the remote host, reachable from the start."""

    def __init__(self, port: int) -> None:
        from sshpyk.kernels.forwards import CHANNELS

        self.transport = "tcp"
        self.host = "127.0.0.1"
        self.endpoints = {channel: port for channel in CHANNELS}
        self.relay = None  # no resumable relay: the raw tunnel is measured
        self.exit_code = None
        self.reachable = asyncio.Event()
        self.reachable.set()


async def _forward(mode: str, alias: str, config: str, target: int) -> None:
    """Open one forward to 127.0.0.1:``target``, print the local port, wait for stdin EOF."""
    loop = asyncio.get_running_loop()
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("sshpyk").setLevel(logging.DEBUG)  # a refused forward says why
    if mode == "forwardset":
        # sshpyk's own forwarding code: the listener a kernel channel uses, on the shared
        # connection SSHSession opens (ssh config, known_hosts, keepalive as for kernels)
        from sshpyk.kernels.forwards import ForwardSet
        from sshpyk.kernels.session import SSHSession

        session = await SSHSession.connect(alias, ssh_config=config)
        # tcp listeners: the sink connects to 127.0.0.1:port, as for ssh -L (kernels'
        # forwards default to ipc unix sockets since the local-transport change)
        forwards = ForwardSet(session, transport="tcp")
        ports = await forwards.open()
        forwards.set_target(_FixedTarget(target))  # type: ignore[arg-type]
        conn = await session.connection()
        print(ports["shell"], conn.get_extra_info("send_cipher"), flush=True)
        await loop.run_in_executor(None, sys.stdin.read)
        await forwards.aclose()
        await session.aclose()
    else:
        import asyncssh

        options = asyncssh.SSHClientConnectionOptions(config=[config], host=alias)
        async with asyncssh.connect(alias, options=options) as conn:
            listener = await conn.forward_local_port("127.0.0.1", 0, "127.0.0.1", target)
            print(listener.get_port(), conn.get_extra_info("send_cipher"), flush=True)
            await loop.run_in_executor(None, sys.stdin.read)
            listener.close()


# -- measuring --------------------------------------------------------------------------


@dataclass
class TunnelResult:
    label: str
    #: the Ciphers line we set ("default": none)
    requested: str
    #: what was negotiated
    cipher: str
    mib_per_s: list[float] = field(default_factory=list)
    error: str = ""


def sink(port: int, expected: int, timeout: float) -> float:
    """Connect, read until EOF; seconds from connect to the last byte."""
    buf = bytearray(CHUNK)
    got = 0
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        while True:
            n = conn.recv_into(buf)
            if not n:
                break
            got += n
    seconds = time.perf_counter() - t0
    if got != expected:
        raise RuntimeError(f"received {got} bytes, expected {expected} (see tunnel.log)")
    return seconds


def _wait_listening(port: int, proc: subprocess.Popen[str] | None, timeout: float) -> None:
    # never probe by connecting: each connection would be forwarded to the source
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if procstat.listening_on(port):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"forwarder exited with {proc.returncode}")
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {port} after {timeout:g}s")


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class Forwarders:
    """Starts one forwarder of a kind; returns (local port, stop function)."""

    def __init__(self, alias: str, target: int, env: dict[str, str], log: Path) -> None:
        self.alias = alias
        self.target = target
        self.env = env
        self.log = log

    def _python(self, mode: str, config: Path) -> tuple[int, str, Callable[[], None]]:
        here = Path(__file__).resolve().parent
        with open(self.log, "a") as log:
            proc = subprocess.Popen(
                [
                    *(sys.executable, str(here / "tunnel.py"), "forward", mode),
                    *(self.alias, str(config), str(self.target)),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=self.env,
            )
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        if not line:
            _stop(proc)
            raise RuntimeError(f"{mode} forwarder failed (see {self.log})")
        return int(line[0]), line[1], lambda: _stop(proc)

    def openssh(self, config: Path) -> tuple[int, str, Callable[[], None]]:
        port = _free_port()
        with open(self.log, "a") as log:
            proc = subprocess.Popen(
                [
                    *("ssh", "-F", str(config), "-N", "-o", "ExitOnForwardFailure=yes"),
                    *("-L", f"{port}:127.0.0.1:{self.target}", self.alias),
                ],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=log,
                text=True,
            )
        try:
            _wait_listening(port, proc, 15)
        except BaseException:
            proc.terminate()
            proc.wait(5)
            raise

        def stop() -> None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

        return port, _openssh_cipher(config, self.alias), stop

    def controlmaster(self, config: Path) -> tuple[int, str, Callable[[], None]]:
        """A forward added to a running ControlMaster with ``ssh -O forward`` (sshpyk 1.25)."""
        port = _free_port()
        base = ["ssh", "-F", str(config)]
        subprocess.run([*base, self.alias, "true"], check=True, timeout=30, capture_output=True)
        forward = ["-L", f"{port}:127.0.0.1:{self.target}"]
        subprocess.run(
            [*base, "-O", "forward", *forward, self.alias],
            check=True,
            timeout=30,
            capture_output=True,
        )
        _wait_listening(port, None, 15)

        def stop() -> None:
            subprocess.run([*base, "-O", "exit", self.alias], timeout=30, capture_output=True)

        return port, _openssh_cipher(config, self.alias), stop


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _openssh_cipher(config: Path, alias: str) -> str:
    """The cipher OpenSSH negotiates: its first preference the server (OpenSSH) shares."""
    out = subprocess.run(
        ["ssh", "-F", str(config), "-G", alias], capture_output=True, text=True, timeout=10
    ).stdout
    for line in out.splitlines():
        if line.startswith("ciphers "):
            return line.split()[1].split(",")[0]
    return "?"


def cipher_config(base: Path, cipher: str | None, dest: Path) -> Path:
    """``base`` with a ``Ciphers`` line in front (applies to every host), or as is."""
    if not cipher:
        return base
    dest.write_text(f"Ciphers {cipher}\n\n" + base.read_text())
    return dest


def _measure_one(
    result: TunnelResult,
    start: Callable[[Path], tuple[int, str, Callable[[], None]]],
    config: Path,
    cipher: str | None,
    total: int,
    timeout: float,
) -> None:
    try:
        port, negotiated, stop = start(config)
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return
    try:
        result.cipher = negotiated if not cipher else cipher
        seconds = sink(port, total, timeout)
        result.mib_per_s.append(total / seconds / 2**20)
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        stop()


def measure_all(
    *,
    alias: str,
    ssh_config: Path,
    controlmaster_config: Path,
    work: Path,
    total: int,
    ciphers: list[tuple[str | None, int]],
    env: dict[str, str],
    timeout: float = 120.0,
    progress: Callable[[str], None] = print,
) -> list[TunnelResult]:
    """Each (cipher, reps) for ``ssh -L``, the ForwardSet and asyncssh; plus the 1.25 path
    (ControlMaster forward) with the default ciphers."""
    log = work / "tunnel.log"
    source = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve().parent / "tunnel.py"), "source", str(total)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    results: list[TunnelResult] = []
    by_key: dict[tuple[str, str], TunnelResult] = {}
    try:
        assert source.stdout is not None
        target = int(source.stdout.readline())
        fwd = Forwarders(alias, target, env, log)
        kinds: list[tuple[str, Callable[[Path], tuple[int, str, Callable[[], None]]], bool]] = [
            (OPENSSH, fwd.openssh, True),
            (FORWARDSET, lambda c: fwd._python("forwardset", c), True),
            (ASYNCSSH, lambda c: fwd._python("asyncssh", c), True),
            (CONTROLMASTER, fwd.controlmaster, False),
        ]
        # repetitions outermost, so that a change of machine load hits every forwarder alike
        for rep in range(max((reps for _, reps in ciphers), default=0)):
            for cipher, reps in ciphers:
                if rep >= reps:
                    continue
                name = cipher or "default"
                for label, start, every_cipher in kinds:
                    if not every_cipher and cipher:
                        continue
                    key = (label, name)
                    if key not in by_key:
                        by_key[key] = TunnelResult(label, name, name)
                        results.append(by_key[key])
                    result = by_key[key]
                    if result.error:
                        continue
                    base = controlmaster_config if label == CONTROLMASTER else ssh_config
                    config = cipher_config(base, cipher, work / f"ssh_config-{name}")
                    _measure_one(result, start, config, cipher, total, timeout)
        for result in results:
            progress(
                f"  tunnel {result.label:<56} {result.requested:<30} "
                + (" ".join(f"{v:4.0f}" for v in result.mib_per_s) + " MiB/s")
                + (f" {result.error}" if result.error else "")
            )
    finally:
        if source.stdin is not None:
            source.stdin.close()
        try:
            source.wait(10)
        except subprocess.TimeoutExpired:
            source.kill()
            source.wait(5)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description="tunnel benchmark helper processes")
    sub = parser.add_subparsers(dest="cmd", required=True)
    src = sub.add_parser("source")
    src.add_argument("bytes", type=int)
    fw = sub.add_parser("forward")
    fw.add_argument("mode", choices=["forwardset", "asyncssh"])
    fw.add_argument("alias")
    fw.add_argument("config")
    fw.add_argument("target", type=int)
    args = parser.parse_args()
    if args.cmd == "source":
        serve_source(args.bytes)
    else:
        asyncio.run(_forward(args.mode, args.alias, args.config, args.target))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

"""The connection broker in tests: a private temp dir per test (``SSHPYK_BROKER_DIR``,
never the user's real one), the broker's pid and its end (also when the test failed),
what sshd sees (established TCP connections, logins), and a client process.

A broker found in a test's dir is stopped by its pid, read from the dir's
``hostkey.json`` and checked against ``/proc/PID/cmdline`` (``sshpyk.ssh.broker`` and
that dir), SIGTERM then SIGKILL, bounded.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sshpyk.localfs import BROKER_DIR_ENV
from sshpyk.ssh.brokered import PERSIST_ENV

from .waiting import pid_alive, wait_until

#: a client process: connects through the broker, runs one command, reports, then waits
#: for a line on stdin before it closes (so several can be connected at once)
CLIENT = r"""
import asyncio, json, sys, time
from sshpyk.ssh.session import Session

async def main(alias, config, command):
    started = time.perf_counter()
    session = await Session.connect(alias, ssh_config=config, connect_timeout=30)
    took = time.perf_counter() - started
    result = await session.run(command)
    print(json.dumps({"connect": took, "status": result.exit_status,
                      "out": result.stdout}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await session.aclose()

asyncio.run(main(*sys.argv[1:4]))
"""


@contextlib.contextmanager
def temp_broker_dir() -> Iterator[Path]:
    """A fresh path for the broker's dir (short enough for a unix socket), with any
    broker in it stopped and everything removed at the end."""
    root = Path(tempfile.mkdtemp(prefix="sshpyk-tb-", dir="/tmp"))
    path = root / "b"
    try:
        yield path
    finally:
        stop_broker(path)
        shutil.rmtree(root, ignore_errors=True)


def env_for(path: Path, persist: float | None) -> dict[str, str]:
    """The environment of a client process using the broker in ``path``."""
    env = dict(os.environ)
    env[BROKER_DIR_ENV] = str(path)
    env.pop(PERSIST_ENV, None)
    if persist is not None:
        env[PERSIST_ENV] = f"{persist:g}"
    return env


def broker_pid(path: Path) -> int | None:
    """The pid of the live broker of ``path`` (None if there is none)."""
    try:
        pid = int(json.loads((path / "hostkey.json").read_text())["pid"])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, KeyError):
        return None
    if b"sshpyk.ssh.broker" not in cmdline or str(path).encode() not in cmdline:
        return None
    return pid if pid_alive(pid) else None


def broker_alive(path: Path) -> bool:
    """Whether a broker holds the lock of ``path``."""
    try:
        fd = os.open(path / "broker.lock", os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def stop_broker(path: Path, timeout: float = 10.0) -> None:
    pid = broker_pid(path)
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not wait_until(lambda: not pid_alive(pid), timeout):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not pid_alive(pid), 5)


def established(port: int) -> int:
    """Established TCP connections to 127.0.0.1:``port`` (client ends)."""
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", f"( dport = :{port} )"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    return len([line for line in out.splitlines() if line.strip()])


def logins(log_file: Path) -> int:
    """Public-key logins sshd has logged so far."""
    return log_file.read_text(errors="replace").count("Accepted publickey")


class ClientProcess:
    """:data:`CLIENT` in its own process; :meth:`report` is its first output line."""

    def __init__(self, path: Path, persist: float, alias: str, config: Path, command: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CLIENT, alias, str(config), command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env_for(path, persist),
        )

    def report(self, timeout: float = 60.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], deadline - time.monotonic())
            if not ready:
                break
            line = self.proc.stdout.readline()
            if line.startswith("{"):
                return dict(json.loads(line))
            if line.strip():
                print(f"client said: {line.rstrip()}")  # not a report (a library's print)
            elif self.proc.poll() is not None:
                break
        self.close(5, keep_stderr=True)
        assert self.proc.stderr is not None
        stderr = self.proc.stderr.read()[-3000:]
        self.proc.stderr.close()
        raise AssertionError(f"client said nothing: {stderr}")

    def close(self, timeout: float = 30.0, keep_stderr: bool = False) -> int | None:
        """Let it close its session and exit (killed if it does not)."""
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.write("\n")
            self.proc.stdin.close()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            return None
        finally:
            for stream in (self.proc.stdout, None if keep_stderr else self.proc.stderr):
                if stream is not None:
                    stream.close()


#: a process holding one kernel through the broker: reports the kernel's and its
#: agent's pids, then obeys stdin lines: "check" (runs 6*7 on the kernel), "quit"
KERNEL_CLIENT = r"""
import asyncio, json, sys
from sshpyk import SSHSession
from sshpyk.kernels.kernel import KernelOptions

async def main(alias, config, python, run_root, grace, link_grace):
    options = KernelOptions(python=python, run_root=run_root, grace=float(grace),
                            link_grace=float(link_grace))
    async with await SSHSession.connect(alias, ssh_config=config, connect_timeout=30) as s:
        kernel = await s.start_kernel(options=options)
        kc = kernel.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)
        print(json.dumps({"pid": kernel.process.pid, "agent": kernel.process.agent.pid}),
              flush=True)
        loop = asyncio.get_running_loop()
        while (line := (await loop.run_in_executor(None, sys.stdin.readline)).strip()):
            if line == "check":
                reply = await kc.execute_interactive("6*7", timeout=30, output_hook=lambda m: None)
                print(json.dumps({"status": reply["content"]["status"]}), flush=True)
            elif line == "quit":
                break
        kc.stop_channels()
        await kernel.close()
    print(json.dumps({"bye": True}), flush=True)

asyncio.run(main(*sys.argv[1:7]))
"""


class KernelClientProcess(ClientProcess):
    """:data:`KERNEL_CLIENT` in its own process (its first report: the pids)."""

    def __init__(
        self,
        path: Path,
        persist: float,
        alias: str,
        config: Path,
        run_root: Path,
        grace: float,
        link_grace: float,
    ) -> None:
        argv = [alias, str(config), sys.executable, str(run_root), f"{grace:g}", f"{link_grace:g}"]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", KERNEL_CLIENT, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env_for(path, persist),
        )

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

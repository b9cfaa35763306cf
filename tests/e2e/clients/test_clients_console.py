"""`jupyter console --kernel NAME` on an SSH kernel, typed at through a real pty.

The console runs as a user's would: in its own session with the pty as its controlling
terminal, so Ctrl-C is a real SIGINT that ``jupyter console`` relays as an interrupt
(through the blocking ``KernelManager``, whose loop is idle between calls).
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.waiting import remote_processes, wait_until

pytestmark = pytest.mark.timeout(180)

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")
# setsid (Popen start_new_session) + TIOCSCTTY: what a terminal emulator does for its shell.
WITH_CONTROLLING_TTY = (
    "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


class PtyProcess:
    """A child on a fresh pty; :meth:`expect` reads (ANSI-stripped) until a pattern shows."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
        self.master = master
        self.output = ""  # everything read so far, ANSI-stripped
        self._pos = 0  # where the next expect() starts looking
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", WITH_CONTROLLING_TTY, *argv],
                stdin=slave,
                stdout=slave,
                stderr=slave,
                env=env,
                start_new_session=True,
            )
        finally:
            os.close(slave)

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: the child closed the pty
            return False
        self.output += ANSI.sub("", chunk.decode(errors="replace"))
        return bool(chunk)

    def expect(self, pattern: str, timeout: float) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.output, self._pos)
            if match:
                self._pos = match.end()
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._read(min(remaining, 0.2)):
                tail = self.output[self._pos :][-2000:]
                raise AssertionError(f"{pattern!r} not seen within {timeout:g}s; got:\n{tail}")

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        os.close(self.master)
        return self.proc.returncode


def _jupyter() -> str:
    beside = Path(sys.executable).with_name("jupyter")
    found = str(beside) if beside.exists() else shutil.which("jupyter")
    if not found:
        pytest.skip("the jupyter command is missing (pip install -e '.[clients]')")
    return found


@pytest.fixture
def console(tmp_path: Path, make_kernelspec) -> Iterator[PtyProcess]:
    pytest.importorskip("jupyter_console", reason="jupyter_console is missing ('.[clients]')")
    make_kernelspec("ssh_console")
    env = dict(os.environ)
    env.update(
        {
            "TERM": "xterm",
            "PROMPT_TOOLKIT_NO_CPR": "1",  # nobody answers cursor position requests
            "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config"),
            "IPYTHONDIR": str(tmp_path / "ipython"),
        }
    )
    child = PtyProcess([_jupyter(), "console", "--kernel", "ssh_console"], env)
    try:
        yield child
    finally:
        child.close()


def test_jupyter_console_runs_a_line(console: PtyProcess, sshd, run_root, no_leftovers) -> None:
    console.expect(r"In \[1\]: ", 90)
    # The marker is built at run time, so the echoed input never matches the pattern.
    console.send('import os; print("CONSOLE" + "-OUT", os.getpid(), os.environ["SSH_CONNECTION"])')
    console.send("\r")
    match = console.expect(r"CONSOLE-OUT (\d+) 127\.0\.0\.1 \d+ 127\.0\.0\.1 (\d+)", 30)
    assert int(match.group(2)) == sshd.port  # the kernel lives in a session of the test sshd
    cmdline = Path(f"/proc/{match.group(1)}/cmdline").read_bytes()
    assert str(run_root).encode() in cmdline
    console.expect(r"In \[2\]: ", 10)

    # Ctrl-C while a cell runs: the console interrupts the remote kernel.
    console.send('import time; print("SLEEP" + "ING", flush=True); time.sleep(60)\r')
    console.expect(r"SLEEPING", 30)  # the cell is running now
    time.sleep(0.3)
    started = time.monotonic()
    console.send("\x03")
    console.expect(r"KeyboardInterrupt", 15)
    assert time.monotonic() - started < 10
    console.expect(r"In \[3\]: ", 10)
    console.send("print(6 * 7)\r")
    console.expect(r"\n42\n", 30)

    console.expect(r"In \[4\]: ", 10)
    console.send("exit\r")
    console.expect(r"Shutting down kernel", 30)
    assert console.proc.wait(30) == 0
    # `exit` sends a shutdown_request: the remote kernel process ends with it.
    assert wait_until(lambda: remote_processes(str(run_root)) == [], 10)


class LeftBehindError(AssertionError):
    """Remote files or processes still there after the console exited."""


def test_jupyter_console_exit_leaves_nothing(console: PtyProcess, no_leftovers) -> None:
    console.expect(r"In \[1\]: ", 90)
    console.send("exit\r")
    console.expect(r"Shutting down kernel", 30)
    assert console.proc.wait(30) == 0
    try:
        no_leftovers()
    except AssertionError as exc:
        raise LeftBehindError(str(exc)) from None

"""Helpers for the CLI tests: run sshpyk (CliRunner, a real pty, a subprocess), hold a
remote kernel from another local process, a host that accepts TCP but never speaks."""

from __future__ import annotations

import contextlib
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from sshpyk.cli import main

SSHPYK = [sys.executable, "-m", "sshpyk.cli"]


def sshpyk(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
    """Invoke the CLI in-process (stdout and stderr separately in result.stdout/.stderr)."""
    return CliRunner().invoke(main, list(args), input=input, env=env, prog_name="sshpyk")


def add_args(
    sshd: Any,
    name: str = "ssh_cli",
    *extra: str,
    alias: str | None = None,
    remote_python: str | None = sys.executable,
) -> list[str]:
    """`sshpyk add` of kernel ``name`` on ``sshd`` (or ``alias`` in its config) with this
    Python as the remote one (none given: ``remote_python=None``), then ``extra``."""
    args = [
        "add",
        "--kernel-name",
        name,
        "--ssh-host-alias",
        alias or sshd.alias,
        "--ssh-config",
        str(sshd.ssh_config),
    ]
    if remote_python is not None:
        args += ["--remote-python", remote_python]
    return [*args, *extra]


def assert_one_line_error(result: Result, *fragments: str, code: int = 1) -> str:
    """A user error: exit code, exactly one line on stderr starting with Error:, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def run_in_pty(
    args: list[str],
    env: dict[str, str],
    timeout: float = 60.0,
    *,
    answers: dict[str, str] | None = None,
    new_session: bool = False,
) -> str:
    """Run a command with stdin/stdout/stderr on a pseudo-terminal; return what it wrote.

    ``answers``: type ``answers[prompt]`` (and Enter) when ``prompt`` shows up, each once.
    ``new_session``: the command leads a session of its own (it can then make the pty
    its controlling terminal)."""
    pending = dict(answers or {})
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        args,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        close_fds=True,
        start_new_session=new_session,
    )
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                out += data
                for prompt in list(pending):
                    if prompt.encode() in out:
                        os.write(master, pending.pop(prompt).encode() + b"\n")
            elif proc.poll() is not None:
                break
        else:
            raise AssertionError(f"{args} did not finish within {timeout}s: {bytes(out)!r}")
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        os.close(master)
    return out.decode("utf-8", "replace")


_OWNER = textwrap.dedent(
    """
    import asyncio, sys
    from sshpyk import SSHSession
    from sshpyk.kernels.kernel import KernelOptions

    async def main(alias, config, run_root, grace):
        async with await SSHSession.connect(alias, ssh_config=config) as session:
            options = KernelOptions(python=sys.executable, run_root=run_root, grace=float(grace))
            kernel = await session.start_kernel(options=options)
            print(kernel.kernel_id, kernel.process.pid, flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
            await kernel.close()

    asyncio.run(main(*sys.argv[1:]))
    """
)


class KernelOwner:
    """Another local process that started a remote kernel and holds it until stopped."""

    def __init__(self, sshd: Any, run_root: Path, grace: float = 60.0) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _OWNER,
                sshd.alias,
                str(sshd.ssh_config),
                str(run_root),
                str(grace),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.stop()
            raise AssertionError(f"the kernel owner did not start a kernel: {self.stderr()}")
        kernel_id, pid = line.split()
        self.kernel_id, self.pid = kernel_id, int(pid)

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read()

    def sigkill(self) -> None:
        """Die without a word, as a crashed Jupyter server would."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        """Close the kernel and exit (stdin EOF), or kill if it does not."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


@contextlib.contextmanager
def silent_host(sshd: Any, tmp_path: Path, alias: str = "sshpyk-silent") -> Iterator[Path]:
    """An ssh config whose ``alias`` points at a port that accepts TCP and never speaks."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # never accepted: connects complete in the backlog, then silence
    port = listener.getsockname()[1]
    config = tmp_path / "ssh_config_silent"
    config.write_text(
        sshd.ssh_config.read_text()
        + f"""
Host {alias}
  HostName 127.0.0.1
  Port {port}
  User {sshd.user}
  IdentitiesOnly yes
  IdentityFile {sshd.root / "id_ed25519"}
  UserKnownHostsFile {sshd.known_hosts}
"""
    )
    try:
        yield config
    finally:
        listener.close()

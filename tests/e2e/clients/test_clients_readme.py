"""README.rst's "Embedding in asyncio applications" example, run exactly as written.

The code block is read out of README.rst and run as a script in a fresh Python. Only
the world around it is arranged, as on a user's machine: a local HOME whose
``~/.ssh/config`` maps the example's host alias to a test sshd (with the key and a
known_hosts entry beside it), and on the "remote" account (the sshd's sessions get
their own HOME and XDG_RUNTIME_DIR) the example's Python environment.
"""

from __future__ import annotations

import ast
import getpass
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.sshd import ThrowawaySSHD, find_sshd
from support.waiting import wait_until

pytestmark = pytest.mark.timeout(180)

README = Path(__file__).resolve().parents[3] / "README.rst"
SECTION = "Embedding in asyncio applications"


def readme_example() -> str:
    """The first ``.. code-block:: python`` after the section title, dedented."""
    lines = README.read_text(encoding="utf-8").splitlines()
    try:
        start = lines.index(SECTION)
        begin = next(
            i for i in range(start, len(lines)) if lines[i].strip() == ".. code-block:: python"
        )
    except (ValueError, StopIteration):
        raise AssertionError(f"README.rst has no python code block under {SECTION!r}") from None
    block: list[str] = []
    for line in lines[begin + 1 :]:
        if line.strip() and not line.startswith(" "):
            break  # the next paragraph or title
        block.append(line)
    return textwrap.dedent("\n".join(block)).strip() + "\n"


@dataclass
class ExampleTargets:
    alias: str  # SSHSession.connect("<alias>")
    python: str  # session.start_kernel(..., python="<python>")


def example_targets(code: str) -> ExampleTargets:
    alias: object = None
    python: object = None
    for node in ast.walk(ast.parse(code)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        if node.func.attr == "connect" and node.args and isinstance(node.args[0], ast.Constant):
            alias = node.args[0].value
        if node.func.attr == "start_kernel":
            python = "python3"  # start_kernel's default
            for keyword in node.keywords:
                if keyword.arg == "python" and isinstance(keyword.value, ast.Constant):
                    python = keyword.value.value
    assert isinstance(alias, str), "the example does not call SSHSession.connect('<alias>')"
    assert isinstance(python, str), "the example does not call session.start_kernel()"
    return ExampleTargets(alias, python)


@dataclass
class Remote:
    sshd: ThrowawaySSHD
    home: Path  # HOME of the sshd's sessions
    runtime: Path  # their XDG_RUNTIME_DIR, where sshpyk's run dirs go
    python_log: Path  # the example's remote python appends its path here when run


def install_remote_python(remote: Remote, python: str) -> Path:
    """Make ``python`` (as the example names it) resolve on the remote account.

    It becomes a small wrapper around this test's interpreter, which has jupyter_client
    and ipykernel. ``~/...`` lands in the remote HOME; a bare name goes on its PATH.
    """
    if python.startswith("~/"):
        path = remote.home / python[2:]
        if not path.name.startswith("python"):  # an environment prefix: <prefix>/bin/python
            path = path / "bin" / "python"
    elif "/" not in python:
        path = remote.home / "bin" / python
    else:
        pytest.fail(
            f"the README example's remote python {python!r} is an absolute path this test "
            "cannot provide without touching the machine: use a ~/ path or a command name"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'#!/bin/sh\necho "$0" >> "{remote.python_log}"\nexec "{sys.executable}" "$@"\n'
    )
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    if find_sshd() is None:
        pytest.skip("OpenSSH sshd is not installed (apt-get install openssh-server)")
    targets = example_targets(readme_example())
    root = tmp_path_factory.mktemp("readme-remote")
    home, runtime = root / "home", root / "runtime"
    home.mkdir()
    runtime.mkdir(mode=0o700)
    path = f"{home / 'bin'}:/usr/local/bin:/usr/bin:/bin"
    sshd = ThrowawaySSHD(
        root / "sshd",
        alias=targets.alias,
        extra_sshd_config=f"SetEnv HOME={home} XDG_RUNTIME_DIR={runtime} PATH={path}\n",
    ).start()
    try:
        yield Remote(sshd, home, runtime, root / "remote-python-used")
    finally:
        sshd.stop()


def local_home(path: Path, sshd: ThrowawaySSHD) -> Path:
    """A HOME whose ~/.ssh is set up the way the README's SSH notes describe."""
    ssh_dir = path / ".ssh"
    ssh_dir.mkdir(parents=True, mode=0o700)
    key = ssh_dir / "id_ed25519"
    key.write_bytes((sshd.root / "id_ed25519").read_bytes())
    key.chmod(0o600)
    (ssh_dir / "known_hosts").write_text(sshd.known_hosts.read_text())
    (ssh_dir / "config").write_text(
        f"Host {sshd.alias}\n"
        f"  HostName 127.0.0.1\n"
        f"  Port {sshd.port}\n"
        f"  User {getpass.getuser()}\n"
        f"  IdentityFile ~/.ssh/id_ed25519\n"
    )
    return path


def sshd_children(sshd: ThrowawaySSHD) -> list[str]:
    """Processes below the sshd: its per-connection processes and what they started."""
    assert sshd.proc is not None
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True)
    rows = [line.split(None, 2) for line in out.stdout.splitlines() if line.strip()]
    below, found = {sshd.proc.pid}, []
    for _ in range(10):  # a few generations deep is plenty
        new = [r for r in rows if int(r[1]) in below and int(r[0]) not in below]
        if not new:
            break
        below.update(int(r[0]) for r in new)
        found += [" ".join(r) for r in new]
    return found


def test_readme_embedding_example_runs_as_written(remote: Remote, tmp_path: Path) -> None:
    code = readme_example()
    for needed in ("SSHSession.connect(", ".start_kernel(", ".execute_interactive("):
        assert needed in code, f"the README example no longer shows {needed}"
    targets = example_targets(code)
    remote_python = install_remote_python(remote, targets.python)
    script = tmp_path / "example.py"
    script.write_text(code)
    env = dict(os.environ, HOME=str(local_home(tmp_path / "home", remote.sshd)))
    runtime_mtime = remote.runtime.stat().st_mtime_ns

    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    # execute_interactive's default output hook prints the cell's stdout, then the status
    assert result.stdout == f"{socket.gethostname()}\nok\n"
    # it went through the test sshd, and ran the remote python the example names
    assert f"Accepted publickey for {remote.sshd.user}" in remote.sshd.log_file.read_text()
    assert str(remote_python) in remote.python_log.read_text().splitlines()
    # and left nothing behind on the remote account
    assert wait_until(lambda: sshd_children(remote.sshd) == [], 10), sshd_children(remote.sshd)
    assert remote.runtime.stat().st_mtime_ns > runtime_mtime  # run dirs were made there...
    assert list(remote.runtime.iterdir()) == []  # ...and removed

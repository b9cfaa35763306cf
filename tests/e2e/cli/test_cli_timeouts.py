"""A host that stops answering: `sshpyk ps --timeout T` and `sshpyk kill --timeout T`
return within T (+1 s to hang up) with one line, and no traceback.

The host goes silent through the userspace fault proxy (tests/support/faultproxy.py): the SSH
connection is up and the agent started when every byte stops moving both ways.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sshpyk
from sshpyk import SSHSession

from support.cli import SSHPYK
from support.faultproxy import FaultProxy, proxied_ssh_config
from support.waiting import remote_processes, wait_until

pytestmark = pytest.mark.timeout(120)

T = 3.0


@pytest.fixture
def silent(sshd, proxy, tmp_path: Path):
    """An alias through the proxy, and a remote python that notes when the agent starts."""
    config = proxied_ssh_config(sshd, proxy, tmp_path, "sshpyk-silent")
    marker = tmp_path / "agent-started"
    python = tmp_path / "silent-python"
    python.write_text(f'#!/bin/sh\ntouch {marker}\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    yield config, python, marker
    proxy.heal()  # let the agent see its channel end, and exit
    assert wait_until(lambda: remote_processes(str(python)) == [], 20)


def startup_seconds() -> float:
    """How long the CLI takes to start and exit doing nothing (imports)."""
    started = time.monotonic()
    subprocess.run([*SSHPYK, "--version"], check=True, capture_output=True, timeout=60)
    return time.monotonic() - started


def run_silenced(proxy: FaultProxy, marker: Path, args: list[str]) -> tuple[int, str, float]:
    """Run the CLI; blackhole the link once the agent starts; (code, stderr, seconds)."""
    env = {**os.environ, "NO_COLOR": "1"}
    started = time.monotonic()
    proc = subprocess.Popen(
        [*SSHPYK, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        assert wait_until(marker.exists, 30, step=0.01), "the agent never started"
        proxy.blackhole()
        _, stderr = proc.communicate(timeout=T + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    return proc.returncode, stderr, time.monotonic() - started


@pytest.mark.parametrize(
    "command",
    [
        ["ps"],
        ["kill", "--orphans", "--yes"],
        ["kill", "abcdef", "--yes"],
        ["kill", "--orphans"],  # the listing before the question
    ],
    ids=["ps", "kill-orphans", "kill-id", "kill-confirm"],
)
def test_silent_host_cli_returns_within_the_timeout(sshd, proxy, silent, run_root, command):
    config, python, marker = silent
    startup = startup_seconds()
    head, rest = command[0], command[1:]
    where = ["--ssh-config", str(config), "--remote-python", str(python)]
    where += ["--run-root", str(run_root), "--timeout", f"{T:g}"]
    args = [head, "sshpyk-silent", *rest, *where]
    code, stderr, seconds = run_silenced(proxy, marker, args)
    assert code == 1, (code, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    assert "sshpyk-silent" in lines[0] and "Traceback" not in stderr
    assert f"within {T:g}s" in lines[0], lines[0]
    # T to answer, 1 s to hang up, and the interpreter's own start-up
    assert seconds < T + 1.0 + startup + 0.5, (seconds, startup)


async def test_silent_host_request_and_close_are_bounded(silent, proxy, run_root) -> None:
    """The agent is up, then the link goes silent: the request fails after its timeout
    and hanging up takes no longer than the close timeout."""
    config, python, _ = silent
    session = await SSHSession.connect("sshpyk-silent", ssh_config=config, connect_timeout=10)
    agent = await session.agent(str(python))
    assert await agent.ps(str(run_root)) == []
    proxy.blackhole()
    started = time.monotonic()
    with pytest.raises(sshpyk.RequestTimeoutError) as info:
        await agent.ps(str(run_root), timeout=2.0)
    assert 1.9 < time.monotonic() - started < 3.0
    assert "\n" not in str(info.value) and "'ps'" in str(info.value)
    started = time.monotonic()
    await asyncio.wait_for(session.aclose(timeout=1.0), 10)
    assert time.monotonic() - started < 1.6
    assert not session.connected

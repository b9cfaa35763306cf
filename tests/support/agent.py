"""Shared pieces of the agent's unit tests (tests/unit/agent/remote/): no SSH, the remote
modules imported from sshpyk/agent/remote/ and driven directly. Their fixtures (``procs``,
``root``) are in tests/unit/agent/remote/conftest.py."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sshpyk.agent.remote import direct, procgroup

NOBODY = 65534
IS_ROOT = os.getuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="planting another uid's files needs root")
needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")

#: a stand-in agent: listens on the unix socket argv[1] until killed
LISTENER = (
    "import socket,sys,time;s=socket.socket(socket.AF_UNIX);s.bind(sys.argv[1]);"
    "s.listen(16);print('ok',flush=True);time.sleep(30)"
)


def private_dir(parent: Path, name: str, mode: int = 0o700) -> Path:
    path = parent / name
    path.mkdir()
    os.chmod(path, mode)
    return path


def write_record(directory: Path, name: str, record: dict[str, Any]) -> None:
    (directory / name).write_text(json.dumps(record))


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait(5)
    return proc.pid


def sleeper(procs: list[subprocess.Popen[bytes]], env: dict[str, str] | None = None) -> int:
    proc = subprocess.Popen(["sleep", "30"], env=env, start_new_session=True)
    procs.append(proc)
    return proc.pid


def kernel(procs: list[subprocess.Popen[bytes]], run_dir: Path) -> int:
    """A stand-in kernel started the way the agent starts one (spawn_kernel)."""
    proc, _log = direct.spawn_kernel(["sleep", "30"], {}, "k" * 8, str(run_dir), str(run_dir))
    procs.append(proc)
    return int(proc.pid)


def listener(procs: list[subprocess.Popen[bytes]], path: Path) -> int:
    """A process of ours listening on ``path`` (an agent stand-in); its pid."""
    proc = subprocess.Popen([sys.executable, "-c", LISTENER, str(path)], stdout=subprocess.PIPE)
    procs.append(proc)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 5)
    assert ready and proc.stdout.readline() == b"ok\n"
    return proc.pid


def wait_gone(pid: int, seconds: float = 3.0) -> bool:
    deadline = time.monotonic() + seconds
    while procgroup.pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not procgroup.pid_alive(pid)


class Events:
    """What an Output emits, parsed (an Output's writer)."""

    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []

    def __call__(self, data: bytes) -> None:
        self.got.append(json.loads(data.decode()))

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.got[index]


def answer(
    agent: Any,
    msg: dict[str, Any],
    events: Events,
    timeout: float = 10.0,
    until: Callable[[dict[str, Any]], bool] | None = None,
) -> Any:
    """Hand ``msg`` to ``agent`` (not running its loop) and run the loop's dispatch until
    an event answers it (same rid; ``until``: one it says yes to); that event."""
    seen = len(events.got)
    agent.handle(msg)
    deadline = time.monotonic() + timeout
    while True:  # ends with the answer or the deadline
        for event in events.got[seen:]:
            if until(event) if until is not None else event.get("rid") == msg.get("rid"):
                return event
        assert time.monotonic() < deadline, f"no answer to {msg}: {events.got[seen:]}"
        try:
            kind, value = agent.events.get(timeout=0.05)
        except Exception:
            continue
        agent.dispatch(kind, value)

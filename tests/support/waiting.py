"""Waiting on the remote, which is this host: its live processes, a pid, the leftovers of
a run root, and a polling loop."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def remote_processes(pattern: str) -> list[str]:
    """Command lines of live processes containing ``pattern`` (the remote is this host)."""
    out = subprocess.run(["ps", "-eo", "pid,stat,args"], capture_output=True, text=True).stdout
    lines = []
    for line in out.splitlines()[1:]:
        fields = line.split(None, 2)
        if len(fields) == 3 and pattern in fields[2] and not fields[1].startswith("Z"):
            if "ps -eo" not in fields[2]:
                lines.append(line)
    return lines


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie (the remote is this host: read /proc)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def leftovers(run_root: Path) -> tuple[list[str], list[str]]:
    """(processes mentioning run_root, files under run_root) — both should be empty."""
    files = [str(p) for p in run_root.rglob("*")]
    return remote_processes(str(run_root)), files

"""Process and socket facts read from /proc (Linux, stdlib only).

Shared by ``run.py`` and ``driver.py``; the driver runs in each candidate's own
interpreter (the sshpyk 1.25 venv too), so nothing here imports a third-party package.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "ProcInfo",
    "become_subreaper",
    "cpu_seconds",
    "descendants",
    "established_to_port",
    "listening_on",
    "process_table",
    "rss_bytes",
]

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    state: str
    #: utime + stime of the process itself, seconds
    cpu_self: float
    #: cutime + cstime: CPU of children it has reaped, seconds
    cpu_children: float
    rss: int
    cmdline: str


def _read_stat(pid: int) -> ProcInfo | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ")"
    rest = raw[raw.rfind(")") + 2 :].split()
    state, ppid = rest[0], int(rest[1])
    utime, stime, cutime, cstime = (int(x) for x in rest[11:15])
    rss_pages = int(rest[21])
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        cmdline = ""
    return ProcInfo(
        pid=pid,
        ppid=ppid,
        state=state,
        cpu_self=(utime + stime) / _TICKS,
        cpu_children=(cutime + cstime) / _TICKS,
        rss=rss_pages * _PAGE,
        cmdline=cmdline,
    )


def process_table() -> dict[int, ProcInfo]:
    """Every process visible in /proc, by pid."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = _read_stat(int(name))
            if info is not None:
                table[info.pid] = info
    return table


def descendants(root: int, table: dict[int, ProcInfo] | None = None) -> list[int]:
    """``root`` and every process below it (children first found, breadth first)."""
    table = table if table is not None else process_table()
    children: dict[int, list[int]] = {}
    for info in table.values():
        children.setdefault(info.ppid, []).append(info.pid)
    found, queue = [], [root]
    while queue:
        pid = queue.pop(0)
        if pid in table:
            found.append(pid)
            queue.extend(children.get(pid, []))
    return found


def cpu_seconds(
    root: int, exclude: Iterable[int] = (), table: dict[int, ProcInfo] | None = None
) -> float:
    """CPU seconds used so far by the tree under ``root``.

    Counts each live process (user + system) plus what it reaped from children
    that already exited, so the difference of two calls is the CPU the tree used
    in between, short-lived subprocesses included. Subtrees rooted at ``exclude``
    (e.g. local kernel processes) are left out.
    """
    table = table if table is not None else process_table()
    skip: set[int] = set()
    for pid in exclude:
        skip.update(descendants(pid, table))
    total = 0.0
    for pid in descendants(root, table):
        if pid in skip:
            continue
        info = table[pid]
        total += info.cpu_self + info.cpu_children
    return total


def rss_bytes(pid: int) -> int:
    info = _read_stat(pid)
    return info.rss if info is not None else 0


def _tcp_rows() -> Iterable[list[str]]:
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            yield line.split()


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1], 16)


def established_to_port(port: int) -> int:
    """Client-side ESTABLISHED TCP connections to ``port`` on this machine.

    Our throwaway sshd listens on a private port, so every such connection is an SSH
    connection made by the candidate under test (its driver or an ``ssh`` it ran).
    """
    return sum(1 for row in _tcp_rows() if row[3] == "01" and _port(row[2]) == port)


def listening_on(port: int) -> bool:
    return any(row[3] == "0A" and _port(row[1]) == port for row in _tcp_rows())


def become_subreaper() -> bool:
    """Make orphaned descendants (e.g. a daemonized ``ssh`` ControlMaster) our children.

    Then they stay in this process's tree, so their CPU is counted and they can be
    found and cleaned up. Linux only; returns False where unsupported.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False

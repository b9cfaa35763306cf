"""The one way the agent stops a process group (sshpyk/agent/remote/procgroup.py), on
real process groups: TERM, a bounded wait, KILL; children left in the group too."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from sshpyk.agent.remote import procgroup

from support.agent import dead_pid, wait_gone

#: a group leader with a child in its group; argv[1] "ignore": both ignore SIGTERM
FAMILY = """
import os, signal, subprocess, sys, time
if sys.argv[1] == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen(["sleep", "30"])
print(child.pid, flush=True)
time.sleep(30)
"""


def family(procs: list[subprocess.Popen[bytes]], mode: str) -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", FAMILY, mode], stdout=subprocess.PIPE, start_new_session=True
    )
    procs.append(proc)
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    return proc, child


def test_term_is_enough_for_a_polite_group(procs: list[subprocess.Popen[bytes]]) -> None:
    proc, child = family(procs, "polite")
    started = time.monotonic()
    assert procgroup.stop_group(proc.pid, proc) is None
    assert time.monotonic() - started < 1.5
    assert proc.returncode == -15  # reaped, by TERM
    assert wait_gone(child)  # the child left in the group got KILLed


def test_kill_after_the_term_wait(procs: list[subprocess.Popen[bytes]]) -> None:
    proc, child = family(procs, "ignore")
    started = time.monotonic()
    assert procgroup.stop_group(proc.pid, proc, term_wait=0.3) is None
    assert 0.3 <= time.monotonic() - started < 2.0
    assert proc.returncode == -9 and wait_gone(child)


def test_a_group_that_is_not_our_child(procs: list[subprocess.Popen[bytes]]) -> None:
    """Watched through its pid (a kernel of a dead agent, found by `sshpyk kill`)."""
    proc, child = family(procs, "ignore")
    assert procgroup.stop_group(proc.pid, term_wait=0.3) is None
    proc.wait(5)
    assert wait_gone(child)
    assert procgroup.stop_group(dead_pid()) is None  # nothing there: nothing to do


def test_pid_facts(procs: list[subprocess.Popen[bytes]]) -> None:
    proc, _child = family(procs, "polite")
    assert procgroup.pid_alive(proc.pid) and procgroup.pid_runs_as(proc.pid, os.getuid())
    assert not procgroup.pid_runs_as(proc.pid, os.getuid() + 1) or not os.path.isdir("/proc")
    assert procgroup.signal_group(proc.pid, 0) is True
    zombie = subprocess.Popen(["true"])
    procs.append(zombie)
    deadline = time.monotonic() + 3
    while procgroup.pid_alive(zombie.pid) and time.monotonic() < deadline:
        time.sleep(0.01)  # exits, unreaped: a zombie is not alive
    assert not procgroup.pid_alive(zombie.pid)
    assert procgroup.signal_group(dead_pid(), 0) is False
    assert procgroup.wait_exit(proc, 0.05) is None

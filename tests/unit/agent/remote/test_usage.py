"""What ps says a kernel costs (sshpyk/agent/remote/usage.py), no SSH: the /proc sampler
against a real process tree that allocates memory and burns CPU, and the nvidia-smi
parser against real nvidia-smi output recorded on a GPU server (data/, see its README;
the few edge cases no GPU server here can produce are written out as such)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sshpyk.agent.remote import direct, procgroup, usage  # noqa: F401  (direct: registers the launcher)

from support.agent import needs_proc

DATA = Path(__file__).parent / "data"
MIB = 1 << 20
RECORDED_UUID = "GPU-10a63c62-f2de-b71f-8539-5cb19abc9ba6"

#: a kernel stand-in: leads its session, holds 100 MiB (touched), starts a child that
#: holds 50 MiB and burns CPU, and a grandchild that leaves the session (setsid) and
#: holds 20 MiB; prints the pids of both, then sleeps
TREE = """
import os, subprocess, sys, time
def held(mib):
    return "b = bytearray(%d << 20)\\nfor i in range(0, len(b), 4096): b[i] = 1\\n" % mib
b = bytearray(100 << 20)
for i in range(0, len(b), 4096):
    b[i] = 1
burn = sys.argv[1] == "burn"
child = subprocess.Popen([sys.executable, "-c", held(50) + ("while True: pass" if burn
    else "import time; time.sleep(60)")])
gone = subprocess.Popen([sys.executable, "-c", held(20) + "import time; time.sleep(60)"],
    start_new_session=True)
time.sleep(1.5)
print(child.pid, gone.pid, flush=True)
time.sleep(60)
"""


def start_tree(procs: list[subprocess.Popen[bytes]], burn: bool) -> tuple[int, int, int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", TREE, "burn" if burn else "idle"],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    procs.append(proc)
    assert proc.stdout is not None
    child, gone = map(int, proc.stdout.readline().split())
    return proc.pid, child, gone


def tree_ticks_and_rss(pids: list[int]) -> tuple[int, int]:
    """Straight from /proc, another way than usage.py: utime..cstime of stat, VmRSS of
    status."""
    ticks = rss = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(") ", 1)[1].split()
        ticks += sum(int(x) for x in fields[11:15])
        with open(f"/proc/{pid}/status") as f:
            rss += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024
    return ticks, rss


def record(pid: int, **extra: Any) -> dict[str, Any]:
    return {"pid": pid, "alive": True, "run_dir": f"/r/{pid}", "launcher": "direct", **extra}


class NoGpu(usage.NvidiaSmi):
    def __init__(self) -> None:
        super().__init__("sshpyk-test-no-such-nvidia-smi")


@needs_proc
def test_process_tree_is_the_session_and_the_descendants(procs) -> None:
    pid, child, gone = start_tree(procs, burn=False)
    processes = usage.read_processes()
    assert processes is not None and pid in processes
    assert usage.process_trees([pid], processes)[pid] == {pid, child, gone}
    assert processes[child][0] == pid and processes[pid][1] == pid  # ppid; session
    assert usage.process_trees([os.getpid()], processes)[os.getpid()] >= {os.getpid()}


@needs_proc
def test_busy_tree_cpu_and_memory_match_proc(procs) -> None:
    pid, child, gone = start_tree(procs, burn=True)
    sampler = usage.Usage(nvidia_smi=NoGpu())
    info = record(pid)
    ticks0, _ = tree_ticks_and_rss([pid, child, gone])
    t0 = time.monotonic()
    sampler.annotate([info])  # no baseline yet: samples twice, WINDOW apart
    elapsed = time.monotonic() - t0
    ticks1, rss = tree_ticks_and_rss([pid, child, gone])
    assert usage.WINDOW <= elapsed < usage.WINDOW + 1.5
    assert info["cpu_window_s"] == pytest.approx(usage.WINDOW, abs=0.3)
    # the same tree over (about) the same second, read another way: a loaded machine
    # slows both alike
    direct_cpu = 100.0 * (ticks1 - ticks0) / usage.CLOCK_TICKS / elapsed
    assert info["cpu_percent"] > min(50.0, direct_cpu / 2), (info, direct_cpu)
    assert info["cpu_percent"] < direct_cpu * 1.5 + 15, (info, direct_cpu)
    assert 170 * MIB <= info["rss_bytes"] <= rss + 8 * MIB, (info["rss_bytes"], rss)
    assert info["gpu"] is None  # no nvidia-smi
    # asked again soon: measured since the last sample, no wait
    time.sleep(usage.MIN_WINDOW + 0.3)
    t0 = time.monotonic()
    sampler.annotate([info])
    assert time.monotonic() - t0 < 0.5
    assert info["cpu_window_s"] < usage.WINDOW
    assert info["cpu_percent"] > min(50.0, direct_cpu / 2)
    # asked again at once: too short a window, the last value again
    again = record(pid)
    sampler.annotate([again])
    assert again["cpu_percent"] == info["cpu_percent"]


@needs_proc
def test_idle_tree_uses_little_cpu(procs) -> None:
    pid, _, _ = start_tree(procs, burn=False)
    info = record(pid)
    usage.Usage(nvidia_smi=NoGpu()).annotate([info])
    assert info["cpu_percent"] < 10
    assert info["rss_bytes"] >= 170 * MIB


@needs_proc
def test_only_live_kernels_that_run_here_are_measured(procs) -> None:
    pid, _, _ = start_tree(procs, burn=False)
    waits: list[float] = []
    dead = record(pid, alive=False)
    elsewhere = record(pid, launcher="sshpyk-test-unloaded-scheduler")
    usage.Usage(nvidia_smi=NoGpu()).annotate([dead, elsewhere], wait=waits.append)
    assert waits == []  # nothing to measure: no wait
    for info in (dead, elsewhere):
        assert info["cpu_percent"] is info["rss_bytes"] is info["gpu"] is None


def test_no_proc_leaves_the_fields_empty(tmp_path) -> None:
    info = record(os.getpid())
    usage.Usage(proc=str(tmp_path / "nothing"), nvidia_smi=NoGpu()).annotate([info])
    assert info["cpu_percent"] is info["rss_bytes"] is None


# -- nvidia-smi ---------------------------------------------------------------------------
def recorded(name: str) -> str:
    return (DATA / f"nvidia-smi-{name}.txt").read_text()


def test_recorded_compute_apps_and_gpus() -> None:
    apps = usage.parse_compute_apps(recorded("compute-apps"))
    assert apps == [(2967, None, 3864 * MIB)]
    gpus = usage.parse_gpus(recorded("gpu"))
    assert gpus == {
        RECORDED_UUID: {
            "index": 0,
            "uuid": RECORDED_UUID,
            "utilization_percent": 27.0,
            "memory_used_bytes": 3873 * MIB,
            "memory_total_bytes": 143771 * MIB,
        }
    }
    # the recorded query had no gpu_uuid: the only GPU is the kernel's
    assert usage.kernel_gpus({2967, 2968}, apps, gpus) == [
        {
            "index": 0,
            "uuid": RECORDED_UUID,
            "used_memory_bytes": 3864 * MIB,
            "utilization_percent": 27.0,
        }
    ]
    assert usage.kernel_gpus({1234}, apps, gpus) == []  # another kernel holds no GPU


def test_recorded_plain_output_agrees() -> None:
    """nvidia-smi's own table says the same of the recorded kernel (pid 2967)."""
    plain = recorded("plain")
    (row,) = [line for line in plain.splitlines() if re.search(r"\s2967\s", line)]
    assert row.split()[-2] == "3864MiB" and "/opt/k/bin/python" in row
    assert "27%" in plain and "3873MiB / 143771MiB" in plain


def test_csv_without_units_is_read_by_its_header() -> None:
    """``--format=csv,nounits`` (the recorded answer without units, as nvidia-smi
    writes it then): the header's unit applies."""
    text = recorded("compute-apps").replace(" MiB", "").replace(" %", "")
    assert usage.parse_compute_apps(text) == [(2967, None, 3864 * MIB)]
    gpus = usage.parse_gpus(recorded("gpu").replace(" MiB", "").replace(" %", ""))
    assert gpus[RECORDED_UUID]["utilization_percent"] == 27.0
    assert gpus[RECORDED_UUID]["memory_total_bytes"] == 143771 * MIB


def test_edge_cases_written_out() -> None:
    """What a GPU server prints in cases the recording does not show (written out here):
    no process, values it does not have (MIG instances: no per-GPU utilisation;
    per-process memory under some drivers), two GPUs, a process on both."""
    assert usage.parse_compute_apps("pid, gpu_uuid, used_gpu_memory [MiB]\n") == []
    assert usage.parse_compute_apps("No running processes found\n") == []
    assert usage.parse_compute_apps("") == []
    apps = usage.parse_compute_apps(
        "pid, gpu_uuid, used_gpu_memory [MiB]\n"
        "2967, GPU-a, [N/A]\n"
        "2967, GPU-b, 1024 MiB\n"
        "2968, GPU-b, 512 MiB\n"
        "3000, GPU-a, 9 MiB\n"
        "garbage line without the header's fields\n"
    )
    assert apps == [
        (2967, "GPU-a", None),
        (2967, "GPU-b", MIB << 10),
        (2968, "GPU-b", MIB << 9),
        (3000, "GPU-a", 9 * MIB),  # another kernel's
    ]
    gpus = usage.parse_gpus(
        "index, uuid, utilization.gpu [%], memory.used [MiB], memory.total [MiB]\n"
        "0, GPU-a, [N/A], 10 MiB, 81920 MiB\n"
        "1, GPU-b, [Not Supported], 1536 MiB, 81920 MiB\n"
    )
    assert gpus["GPU-a"]["utilization_percent"] is None
    assert usage.kernel_gpus({2967, 2968}, apps, gpus) == [
        {"index": 0, "uuid": "GPU-a", "used_memory_bytes": None, "utilization_percent": None},
        {"index": 1, "uuid": "GPU-b", "used_memory_bytes": 1536 * MIB, "utilization_percent": None},
    ]


def test_nvidia_smi_absent_or_failing_is_remembered(monkeypatch) -> None:
    absent = NoGpu()
    assert absent.sample({1}) is None
    assert absent.path is None  # looked up once: not on PATH
    monkeypatch.setattr(usage.shutil, "which", lambda name: pytest.fail("looked up again"))
    assert absent.sample({1}) is None
    failing = usage.NvidiaSmi("false")  # on PATH, exits 1: a broken driver
    monkeypatch.undo()
    calls: list[tuple[str, ...]] = []
    run = failing._run

    def counted(args: tuple[str, ...]) -> str:
        calls.append(args)
        return run(args)

    failing._run = counted  # type: ignore[method-assign]
    assert failing.sample({1}) is None
    assert failing.sample({1}) is None  # within FAILED_BACKOFF: not run again
    assert calls == [usage.COMPUTE_APPS_QUERY]


def test_nvidia_smi_is_asked_once_per_period() -> None:
    """Both queries at most once per GPU_PERIOD for every kernel together; the GPU
    query only when a kernel's process holds a GPU."""
    smi = usage.NvidiaSmi("true")
    calls: list[tuple[str, ...]] = []
    answers = {usage.COMPUTE_APPS_QUERY: recorded("compute-apps"), usage.GPU_QUERY: recorded("gpu")}

    def fake(args: tuple[str, ...]) -> str:
        calls.append(args)
        return answers[args]

    smi._run = fake  # type: ignore[method-assign]
    assert smi.sample({1}) == ([(2967, None, 3864 * MIB)], {})
    assert calls == [usage.COMPUTE_APPS_QUERY]
    apps, gpus = smi.sample({2967}) or ([], {})  # now a kernel holds it: the GPU query
    assert calls == [usage.COMPUTE_APPS_QUERY] * 2 + [usage.GPU_QUERY]
    assert gpus[RECORDED_UUID]["utilization_percent"] == 27.0
    assert smi.sample({2967}) == (apps, gpus)  # within GPU_PERIOD: the same answer
    assert len(calls) == 3


# -- bounded: a wedged nvidia-smi, a second ps --------------------------------------------
#: a command that hangs and ignores SIGTERM (as nvidia-smi on a wedged GPU); each run
#: appends its pid to the file argv names
STUCK = "#!/bin/sh\ntrap '' TERM\necho $$ >> {runs}\nexec sleep 60\n"


def stuck_command(tmp_path: Path) -> tuple[Path, Path]:
    runs = tmp_path / "runs"
    command = tmp_path / "stuck-smi"
    command.write_text(STUCK.format(runs=runs))
    command.chmod(0o755)
    return command, runs


def pids_in(runs: Path) -> list[int]:
    return [int(x) for x in runs.read_text().split()] if runs.exists() else []


def test_run_bounded_kills_a_command_that_ignores_term(tmp_path: Path) -> None:
    command, runs = stuck_command(tmp_path)
    t0 = time.monotonic()
    assert procgroup.run_bounded([str(command)], 0.5) == (None, "timeout")
    assert time.monotonic() - t0 < 0.5 + procgroup.ABANDON_WAIT + 0.5
    (pid,) = pids_in(runs)
    assert not procgroup.pid_alive(pid)


def test_run_bounded_abandons_a_command_that_cannot_die(tmp_path: Path, monkeypatch) -> None:
    """A process in D state (a wedged GPU) survives SIGKILL: stood for here by signals
    that do not arrive. The caller is back after the timeout and ABANDON_WAIT."""
    command, runs = stuck_command(tmp_path)
    monkeypatch.setattr(procgroup.os, "killpg", lambda pgid, signum: None)
    t0 = time.monotonic()
    assert procgroup.run_bounded([str(command)], 0.5) == (None, "timeout")
    took = time.monotonic() - t0
    monkeypatch.undo()
    (pid,) = pids_in(runs)
    try:
        assert 0.5 + procgroup.ABANDON_WAIT - 0.1 < took < 0.5 + procgroup.ABANDON_WAIT + 0.6
        assert procgroup.pid_alive(pid)  # left behind, not waited for
    finally:
        os.killpg(pid, 9)


def test_run_bounded_caps_the_output() -> None:
    big = [sys.executable, "-c", "import sys; sys.stdout.write('x' * (3 << 20))"]
    assert procgroup.run_bounded(big, 10) == (None, "more than 1048576 bytes on stdout")
    noisy = [sys.executable, "-c", "import sys; sys.stderr.write('x' * (1 << 20))"]
    assert procgroup.run_bounded(noisy, 10) == (None, "more than 65536 bytes on stderr")
    fine = [sys.executable, "-c", "import sys; print('ok'); sys.exit(3)"]
    assert procgroup.run_bounded(fine, 10) == (None, "exit code 3")
    assert procgroup.run_bounded([sys.executable, "-c", "print('ok')"], 10) == ("ok\n", None)


def test_a_wedged_nvidia_smi_is_asked_once_and_holds_nobody(tmp_path: Path, monkeypatch) -> None:
    """Two ps at once while nvidia-smi hangs: it runs once (the second waits for its
    answer, bounded), both are back after its timeout, and it is believed failed."""
    command, runs = stuck_command(tmp_path)
    monkeypatch.setattr(usage, "NVIDIA_SMI_TIMEOUT", 0.5)
    smi = usage.NvidiaSmi(str(command))
    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(smi.sample({1}))) for _ in "ab"]
    t0 = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert time.monotonic() - t0 < 0.5 + procgroup.ABANDON_WAIT + 1.0
    assert results == [None, None] and len(pids_in(runs)) == 1
    assert smi.sample({1}) is None and len(pids_in(runs)) == 1  # FAILED_BACKOFF
    assert not procgroup.pid_alive(pids_in(runs)[0])


def test_the_cpu_window_is_waited_without_the_lock() -> None:
    """A ps waiting for its second sample does not hold up another ps: the other one,
    of another kernel, is answered meanwhile; one of the same kernel reuses the
    first's baseline (it waits at most what is left of its WINDOW)."""
    sampler = usage.Usage(nvidia_smi=NoGpu())
    release = threading.Event()
    first = record(os.getpid(), run_dir="/r/a")
    blocked = threading.Thread(
        target=lambda: sampler.annotate([first], wait=lambda seconds: release.wait(30))
    )
    blocked.start()
    try:
        deadline = time.monotonic() + 5
        while ("/r/a", os.getpid()) not in sampler.last:  # its baseline is taken
            assert time.monotonic() < deadline
            time.sleep(0.01)
        waits: list[float] = []
        same = record(os.getpid(), run_dir="/r/a")
        sampler.annotate([same], wait=waits.append)
        assert len(waits) == 1 and 0 < waits[0] <= usage.WINDOW
        other = record(os.getpid(), run_dir="/r/b")
        t0 = time.monotonic()
        sampler.annotate([other])
        assert time.monotonic() - t0 < usage.WINDOW + 0.5
        assert other["cpu_percent"] is not None and first["cpu_percent"] is None
    finally:
        release.set()
        blocked.join(5)
    assert first["cpu_window_s"] is not None

"""`sshpyk ps` says what a kernel costs: a kernel started by jupyter_client through the
provisioner (over the real sshd) holds 200 MB and has a child burn a core; the numbers
of `ps --json` are checked against /proc read directly over the same seconds (the
"remote" host is this one). GPU columns: no GPU here, and a fake nvidia-smi would prove
nothing, so only the parser is tested (tests/unit/agent/remote/test_usage.py, with real
recorded output)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
from typing import Any

import pytest

from support.kernels import run_cell, start_manager, stop_manager

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

MIB = 1 << 20
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """The kernel's session and its descendants, from /proc (the test's own reading)."""
    stats = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(") ", 1)[1].split()
            except OSError:
                continue
            stats[int(name)] = (int(fields[1]), int(fields[3]))  # ppid, session
    members = {p for p, (_, sid) in stats.items() if sid == pid} | {pid}
    for _ in range(len(stats)):
        more = {p for p, (ppid, _) in stats.items() if ppid in members} - members
        if not more:
            break
        members |= more
    return sorted(members)


def ticks_and_rss(pids: list[int]) -> tuple[int, int]:
    ticks = rss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                ticks += sum(int(x) for x in f.read().rsplit(") ", 1)[1].split()[11:15])
            with open(f"/proc/{pid}/status") as f:
                rss += next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")) * 1024
        except (OSError, StopIteration):
            continue  # ended meanwhile
    return ticks, rss


async def ps(sshd: Any, run_root: Any, *extra: str) -> str:
    """`sshpyk ps` in a process of its own (a fresh agent, as a user runs it)."""
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "sshpyk.cli", "ps", *extra, sshd.alias),
        *("--ssh-config", str(sshd.ssh_config), "--run-root", str(run_root)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, (out, err)
    return out.decode()


async def measured(sshd: Any, run_root: Any, pid: int) -> tuple[dict[str, Any], float, int]:
    """`ps --json`'s record of kernel ``pid``, and /proc's CPU % of its tree over the
    whole `ps` (which measures the last second of it) and its RSS right after."""
    pids = tree(pid)
    ticks0, _ = ticks_and_rss(pids)
    t0 = time.monotonic()
    (host,) = json.loads(await ps(sshd, run_root, "--json"))["hosts"]
    elapsed = time.monotonic() - t0
    ticks1, rss = ticks_and_rss(pids)
    (kernel,) = [k for k in host["kernels"] if k["pid"] == pid]
    return kernel, 100.0 * (ticks1 - ticks0) / CLOCK_TICKS / elapsed, rss


async def test_ps_reports_cpu_memory_and_client(make_kernelspec, sshd, run_root) -> None:
    make_kernelspec("ssh_usage")
    km, kc = await start_manager("ssh_usage")
    try:
        pid = km.provisioner.remote_kernel.process.pid
        content, _ = await run_cell(
            kc,
            "b = bytearray(200 * 2**20)\n"
            "for i in range(0, len(b), 4096): b[i] = 1\n"
            "import subprocess, sys\n"
            "burner = subprocess.Popen([sys.executable, '-c', 'while True: pass'])\n",
        )
        assert content["status"] == "ok"
        await asyncio.sleep(0.5)
        kernel, direct_cpu, rss = await measured(sshd, run_root, pid)
        print("busy: ps", kernel["cpu_percent"], "%", kernel["rss_bytes"], "B;",
              "/proc", round(direct_cpu, 1), "%", rss, "B")  # fmt: skip
        assert kernel["client"] == "provisioner"
        assert kernel["forwarded"] == []
        assert kernel.get("idle_s") is None or 0 <= kernel["idle_s"] < 120  # the relay's
        assert 200 * MIB <= kernel["rss_bytes"] <= rss + 16 * MIB
        # a loaded machine slows the burner for ps and /proc alike
        assert kernel["cpu_percent"] > min(50.0, direct_cpu / 2), (kernel, direct_cpu)
        assert kernel["cpu_percent"] < direct_cpu * 1.5 + 20, (kernel, direct_cpu)
        assert 0.5 <= kernel["cpu_window_s"] <= 2.0
        if shutil.which("nvidia-smi") is None:
            assert kernel["gpu"] is None
        table = await ps(sshd, run_root)
        header, *rows = table.splitlines()
        assert header.split()[-6:] == ["CPU", "MEM", "GPU", "IDLE", "CLIENT", "PORTS"]
        (row,) = [r for r in rows if r.split()[1:2] == [km.provisioner.kernel_id]]
        assert "provisioner" in row.split() and "MiB" in row

        content, _ = await run_cell(kc, "burner.kill(); burner.wait()")
        assert content["status"] == "ok"
        await asyncio.sleep(1.0)
        kernel, direct_cpu, rss = await measured(sshd, run_root, pid)
        print("idle: ps", kernel["cpu_percent"], "%", kernel["rss_bytes"], "B;",
              "/proc", round(direct_cpu, 1), "%", rss, "B")  # fmt: skip
        assert kernel["cpu_percent"] < max(15.0, direct_cpu + 10), (kernel, direct_cpu)
        assert 200 * MIB <= kernel["rss_bytes"] <= rss + 16 * MIB
    finally:
        await stop_manager(km, kc)

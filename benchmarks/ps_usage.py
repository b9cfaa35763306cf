"""What `sshpyk ps`'s cost columns cost the agent (issue 25): its CPU with N kernels.

    python benchmarks/ps_usage.py                 # 8 kernels, 60 s per phase
    python benchmarks/ps_usage.py --seconds 20    # quicker

One throwaway loopback sshd (tests/support/sshd.py), one SSHSession with ``--kernels``
real ipykernels of this Python on one agent, then three phases of ``--seconds`` each,
reading the agent's utime + stime from /proc (the "remote" is this machine):

* idle: nobody asks (the agent keeps no timer for usage: this is its cost without it);
* ps every second without usage (what ``ps`` cost before: run dir scan, agent probes);
* ps every second with usage (CPU, RSS, GPU of every kernel: usage.py), asked of the
  kernels' own agent, which keeps its samples between asks (no second sample, no wait).

Prints agent CPU seconds per minute for each and the /proc pass's size and duration.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def bench(alias: str, ssh_config: str, run_root: str, kernels: int, seconds: float) -> None:
    from sshpyk import SSHSession
    from sshpyk.agent.remote import usage
    from sshpyk.kernels.kernel import KernelOptions

    async with await SSHSession.connect(alias, ssh_config=ssh_config) as session:
        options = KernelOptions(python=sys.executable, run_root=run_root)
        started = [await session.start_kernel(options=options) for _ in range(kernels)]
        agent = await session.agent(options.python, options.pre_command, run_root=run_root)
        records = await agent.ps(run_root)
        agent_pid = int(records[0]["agent_pid"])
        print(f"{len(records)} kernels, agent pid {agent_pid}; settling 5 s", flush=True)
        await asyncio.sleep(5)

        async def phase(name: str, ask: bool | None) -> None:
            cpu0, t0 = cpu_seconds(agent_pid), time.monotonic()
            latencies = []
            while time.monotonic() - t0 < seconds:
                if ask is None:
                    await asyncio.sleep(1.0)
                    continue
                a0 = time.monotonic()
                found = await agent.ps(run_root, usage=ask)
                latencies.append(time.monotonic() - a0)
                assert len(found) >= kernels, found
                if ask:
                    assert all(k["rss_bytes"] for k in found), found
                await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - a0)))
            per_minute = (cpu_seconds(agent_pid) - cpu0) / (time.monotonic() - t0) * 60
            asks = ""
            if latencies:
                median = sorted(latencies)[len(latencies) // 2]
                asks = f"; {len(latencies)} asks, median {median * 1000:.1f} ms"
            print(f"{name:<28} agent CPU {per_minute:6.3f} s/min{asks}", flush=True)

        await phase("idle", None)
        await phase("ps every 1 s, no usage", False)
        await phase("ps every 1 s, with usage", True)
        passes = []
        for _ in range(20):
            t0 = time.perf_counter()
            found = usage.read_processes()
            passes.append(time.perf_counter() - t0)
        print(
            f"one pass over /proc: {len(found or {})} processes, "
            f"median {sorted(passes)[10] * 1000:.2f} ms (this script's Python)",
            flush=True,
        )
        for kernel in started:
            await kernel.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kernels", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    from support.sshd import ThrowawaySSHD

    with tempfile.TemporaryDirectory(prefix="sshpyk-ps-usage-") as tmp:
        root = Path(tmp)
        run_root = root / "run"
        run_root.mkdir(mode=0o700)
        sshd = ThrowawaySSHD(root / "sshd").start()
        try:
            asyncio.run(
                bench(sshd.alias, str(sshd.ssh_config), str(run_root), args.kernels, args.seconds)
            )
        finally:
            sshd.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

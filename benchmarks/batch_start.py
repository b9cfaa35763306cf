"""Start, restart and shutdown of a batch kernel: SLURM beside Grid Engine
(benchmarks/README.md, "Batch kernels: start and restart").

Against a throwaway sshd (tests/support/sshd.py), a throwaway single-node SLURM
(tests/support/slurm.py: slurm-wlm + munge) and a throwaway single-node Son of Grid
Engine (tests/support/sge.py: gridengine-master/-exec/-client), each kernel through
sshpyk's SSHSession API with an idle cluster, per scheduler ``--rounds`` times:

* start: ``start_kernel`` until the kernel answers kernel_info (the allocation is asked
  for, granted, the first step/task started, the node connection up);
* restart: the kernel stopped with its allocation kept and launched again (a new step
  or task in the same job, no queueing), until it answers kernel_info; ``--restarts``
  per round;
* close: shutdown until the job has left the queue (scancel / qdel).

Also the kernel_info round trip through the relay (median of 50, warm). Prints a
Markdown table of medians (min-max). Run as root: ``python benchmarks/batch_start.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from support.sge import SGE_ARGS, ThrowawaySGE, sge_missing  # noqa: E402
from support.slurm import ThrowawaySlurm, slurm_missing  # noqa: E402
from support.sshd import ThrowawaySSHD  # noqa: E402


async def answered(kernel: Any) -> None:
    kc = kernel.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
    finally:
        kc.stop_channels()


async def round_trip(kernel: Any, count: int = 50) -> float:
    kc = kernel.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        times = []
        for _ in range(count):
            started = time.perf_counter()
            await kc.kernel_info(reply=True, timeout=30)
            times.append(time.perf_counter() - started)
        return statistics.median(times)
    finally:
        kc.stop_channels()


async def measure(session: Any, options: Any, jobs: Any, rounds: int, restarts: int) -> dict:
    starts, again, closes, trips = [], [], [], []
    for _ in range(rounds):
        started = time.perf_counter()
        kernel = await session.start_kernel(options=options)
        await answered(kernel)
        starts.append(time.perf_counter() - started)
        job = kernel.process.details.get("job_id")
        trips.append(await round_trip(kernel))
        for _ in range(restarts):
            started = time.perf_counter()
            await kernel.shutdown(restart=True)
            await kernel.launch(kernel.key, kernel.signature_scheme)
            await answered(kernel)
            again.append(time.perf_counter() - started)
            assert kernel.process.details.get("job_id") == job, "a restart left the job"
        started = time.perf_counter()
        await kernel.close()
        while jobs() and time.perf_counter() - started < 30:
            await asyncio.sleep(0.05)
        closes.append(time.perf_counter() - started)
    return {"start": starts, "restart": again, "close": closes, "rtt": trips}


def cell(values: list[float], scale: float = 1.0, unit: str = "s") -> str:
    if not values:
        return "-"
    median = statistics.median(values) * scale
    return f"{median:.2f} {unit} ({min(values) * scale:.2f}-{max(values) * scale:.2f})"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--schedulers", default="slurm,sge")
    args = parser.parse_args()
    from sshpyk import KernelOptions, SSHSession

    root = Path(tempfile.mkdtemp(prefix="sshpyk-bench-batch-"))
    sshd = ThrowawaySSHD(root / "sshd").start()
    run_root = root / "run"
    run_root.mkdir(mode=0o700)
    base = {"python": sys.executable, "run_root": str(run_root), "transport": "ipc"}
    rows = []
    try:
        async with await SSHSession.connect(sshd.alias, ssh_config=sshd.ssh_config) as session:
            for name in args.schedulers.split(","):
                if name == "slurm":
                    why = slurm_missing()
                    cluster: Any = None if why else ThrowawaySlurm(root / "slurm").start()
                    fields = {"slurm_args": ["--time=30"]}
                else:
                    why = sge_missing()
                    cluster = None if why else ThrowawaySGE().start()
                    fields = {"sge_args": [*SGE_ARGS.split(), "-ckpt", "keep", "-l", "h_rt=1800"]}
                if cluster is None:
                    print(f"{name}: skipped ({why})", file=sys.stderr)
                    continue
                try:
                    options = KernelOptions(
                        **base, **fields, launcher=name, pre_command=cluster.pre_command
                    )
                    got = await measure(session, options, cluster.jobs, args.rounds, args.restarts)
                finally:
                    cluster.stop()
                rows.append((name, got))
    finally:
        sshd.stop()
        subprocess.run(["rm", "-rf", str(root)], check=False)
    print("| scheduler | start to kernel_info | restart (same job) | close to empty queue "
          "| kernel_info round trip |")  # fmt: skip
    print("|---|---|---|---|---|")
    for name, got in rows:
        print(
            f"| {name} | {cell(got['start'])} | {cell(got['restart'])} | {cell(got['close'])} "
            f"| {cell(got['rtt'], 1000, 'ms')} |"
        )


if __name__ == "__main__":
    asyncio.run(main())

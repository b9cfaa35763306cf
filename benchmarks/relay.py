"""The resumable relay against the direct channels (issue 13).

Two kernels of this Python run side by side through one SSHSession to a throwaway
loopback sshd (tests/support/sshd.py): one with the default resumable relay (the remote agent
in the data path of the 5 channels, ``outage_buffer=64``), one with
``outage_buffer=0`` (the channels forwarded directly, as before the relay). The two are
measured in alternation, so that drift on the machine hits both alike:

* kernel_info round trip on the shell channel: median and p90 of ``--rounds`` (200)
  sequential requests per mode (20 warm-up ones first), in blocks of 25 alternating;
* a cell printing 20 MB (200 lines of 100,000 characters), execute to idle status with
  every byte received: median of ``--reps`` (3) per mode, alternating.

The raw tunnel is not measured here: the relay does not change it (benchmarks/tunnel.py).
Prints a Markdown table. Run: python benchmarks/relay.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from lib.kernelio import LINES, WIDTH, printed, round_trips  # noqa: E402

from support.sshd import ThrowawaySSHD  # noqa: E402

MODES = {"direct": 0.0, "relay": 64.0}
BLOCK = 25


async def run(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    from sshpyk import KernelOptions, SSHSession

    root = Path(tempfile.mkdtemp(prefix="spk-relay-", dir="/tmp"))
    sshd = ThrowawaySSHD(root / "sshd").start()
    run_root = root / "run"
    run_root.mkdir(mode=0o700)
    samples: dict[str, dict[str, list[float]]] = {m: {"rtt": [], "print": []} for m in MODES}
    try:
        async with await SSHSession.connect(sshd.alias, ssh_config=sshd.ssh_config) as session:
            kernels: dict[str, Any] = {}
            clients: dict[str, Any] = {}
            try:
                for mode, buffer in MODES.items():
                    options = KernelOptions(
                        kernel_name="python3",
                        python=sys.executable,
                        run_root=str(run_root),
                        outage_buffer=buffer,
                    )
                    kernels[mode] = await session.start_kernel(options=options)
                    kc = kernels[mode].client()
                    kc.start_channels()
                    await kc.wait_for_ready(timeout=60)
                    clients[mode] = kc
                    # the relay is set up on the first channel connection
                    linked = kernels[mode].forwards._link is not None
                    if linked != (buffer > 0):
                        raise RuntimeError(f"{mode}: relay {'on' if linked else 'off'}")
                for mode in MODES:  # warm-up
                    await round_trips(clients[mode], 0)
                for n in range(0, args.rounds, BLOCK):
                    order = list(MODES) if (n // BLOCK) % 2 == 0 else list(MODES)[::-1]
                    for mode in order:
                        block = min(BLOCK, args.rounds - n)
                        samples[mode]["rtt"] += await round_trips(clients[mode], block)
                for rep in range(args.reps):
                    order = list(MODES) if rep % 2 == 0 else list(MODES)[::-1]
                    for mode in order:
                        samples[mode]["print"].append(await printed(clients[mode]))
            finally:
                for kc in clients.values():
                    kc.stop_channels()
                for kernel in kernels.values():
                    await kernel.close()
    finally:
        sshd.stop()
        shutil.rmtree(root, ignore_errors=True)
    return samples


def table(samples: dict[str, dict[str, list[float]]]) -> str:
    def rtt(mode: str) -> tuple[float, float]:
        times = sorted(samples[mode]["rtt"])
        return statistics.median(times) * 1000, times[int(len(times) * 0.9)] * 1000

    def mb_s(mode: str) -> float:
        return LINES * WIDTH / statistics.median(samples[mode]["print"]) / 1e6

    rows = [
        "| mode | kernel_info median | p90 | 20 MB print (median) | min-max | MB/s "
        "| x direct MB/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        med, p90 = rtt(mode)
        secs = samples[mode]["print"]
        rows.append(
            f"| {mode} | {med:.2f} ms | {p90:.2f} ms | {statistics.median(secs):.3f} s "
            f"| {min(secs):.3f}-{max(secs):.3f} s | {mb_s(mode):.1f} "
            f"| {mb_s(mode) / mb_s('direct'):.2f}x |"
        )
    delta = rtt("relay")[0] - rtt("direct")[0]
    rows.append(f"\nrelay - direct kernel_info median: {delta:+.2f} ms")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("JUPYTER_PLATFORM_DIRS", "1")
    samples = asyncio.run(run(args))
    print(f"{os.cpu_count()} cores; {args.rounds} round trips, {args.reps} x 20 MB per mode\n")
    print(table(samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())

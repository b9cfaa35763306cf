"""The cost of relaying a SLURM kernel over srun's stdio (benchmarks/README.md).

Against a throwaway sshd (tests/support/sshd.py) and a throwaway single-node SLURM cluster
(tests/support/slurm.py, needs root and slurm-wlm + munge), three ways of reaching the same
ipykernel from this Python, each through sshpyk's SSHSession API:

* direct ipc: a direct (non-SLURM) kernel next to the agent, ipc transport: the
  direct-streamlocal path every ipc kernel uses, the floor for the other two;
* slurm relay: this tree's SLURM launcher: the kernel binds private sockets on the node,
  its traffic crosses one authenticated TCP connection (TCP_NODELAY, framed,
  multiplexed) from the login node's agent to the node side, to unix sockets on the
  login node, which the local forwards reach with direct-streamlocal;
* slurm stdio relay (``--stdio-relay``, default 413dfc6): the same relay over srun's
  stdin/stdout instead, as first written; its bootstrap_slurm.py from git, the rest is
  this tree;
* slurm tcp (before): the SLURM launcher as of ``--before`` (default 23caeee, the
  commit before the relay): the kernel listens on tcp on the node's address and the
  local forwards reach it with direct-tcpip. Its bootstrap_slurm.py is taken from git
  and loaded into its own agent (a different pre-command), the rest is this tree.

Per candidate: the kernel_info round trip (20 warm-up requests, then ``--rounds``
sequential ones; median) and a cell printing 200 lines of 100,000 characters (20 MB),
timed from execute_request to the kernel's idle status with every byte of stream output
received on IOPub (counted), ``--reps`` times (median MB/s, 10^6 bytes per second).
Prints a Markdown table. Run as root: ``python benchmarks/slurm_relay.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from support.slurm import ThrowawaySlurm, slurm_missing  # noqa: E402
from support.sshd import ThrowawaySSHD  # noqa: E402

sys.path.insert(0, str(HERE))
from lib.kernelio import LINES, WIDTH, printed, round_trips  # noqa: E402


async def measure(label: str, session: Any, options: Any, rounds: int, reps: int) -> dict:
    kernel = await session.start_kernel(options=options)
    try:
        process = kernel.process
        assert process is not None
        if process.transport == "tcp":
            path = f"direct-tcpip to {process.host}:port"
        else:
            path = "direct-streamlocal to unix sockets"
        kc = kernel.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=60)
            rtt = await round_trips(kc, rounds)
            seconds = [await printed(kc) for _ in range(reps)]
        finally:
            kc.stop_channels()
        return {
            "label": label,
            "path": path,
            "rtt_ms": statistics.median(rtt) * 1000,
            "rtt_p90_ms": sorted(rtt)[int(len(rtt) * 0.9)] * 1000,
            "mb_s": [LINES * WIDTH / s / 1e6 for s in seconds],
        }
    finally:
        await kernel.close()


def old_source(rev: str) -> str:
    return subprocess.run(
        ["git", "show", f"{rev}:sshpyk/bootstrap_slurm.py"],
        cwd=HERE.parent,
        check=True,
        capture_output=True,
        text=True,
    ).stdout


async def run(args: argparse.Namespace) -> list[dict]:
    import sshpyk.agent.command
    from sshpyk import KernelOptions, SSHSession
    from sshpyk.kernels.slurm import SlurmLauncher

    root = Path(tempfile.mkdtemp(prefix="spk-bench-", dir="/tmp"))
    sshd = ThrowawaySSHD(root / "sshd").start()
    cluster = ThrowawaySlurm(root / "slurm").start()
    run_root = root / "run"
    run_root.mkdir(mode=0o700)
    base = {"python": sys.executable, "run_root": str(run_root)}
    slurm = {
        **base,
        "launcher": "slurm",
        "pre_command": cluster.pre_command,
        "slurm_args": ["--time=30"],
    }
    results = []
    try:
        async with await SSHSession.connect(sshd.alias, ssh_config=sshd.ssh_config) as session:
            wanted = args.candidates.split(",")
            if "direct" in wanted:
                options = KernelOptions(**base, transport="ipc")
                results.append(
                    await measure("direct ipc", session, options, args.rounds, args.reps)
                )
            if "relay" in wanted:
                options = KernelOptions(**slurm)
                results.append(
                    await measure("slurm relay", session, options, args.rounds, args.reps)
                )
            if "stdio" in wanted:
                source = old_source(args.stdio_relay)
                new_loader = sshpyk.agent.command.extension_source
                sshpyk.agent.command.extension_source = lambda *_: source  # type: ignore[assignment]
                try:
                    options = KernelOptions(
                        **{**slurm, "pre_command": slurm["pre_command"] + "; :"}
                    )
                    label = f"slurm stdio relay ({args.stdio_relay})"
                    results.append(await measure(label, session, options, args.rounds, args.reps))
                finally:
                    sshpyk.agent.command.extension_source = new_loader  # type: ignore[assignment]
            if "before" in wanted:
                source = old_source(args.before)
                new_loader = sshpyk.agent.command.extension_source
                new_wait = SlurmLauncher.wait_ready

                async def old_wait(self: Any, kernel: Any, process: Any) -> None:
                    # the old readiness: the job runs, the node's kernel bound its sockets
                    # (the old direct-tcpip reachability check is left out)
                    t0 = time.monotonic()
                    await process.running.wait()
                    await process.wait_ready()
                    kernel.timings["ready"] = time.monotonic() - t0

                sshpyk.agent.command.extension_source = lambda *_: source  # type: ignore[assignment]
                SlurmLauncher.wait_ready = old_wait  # type: ignore[method-assign]
                try:
                    # another pre-command: another agent, which loads the old source
                    options = KernelOptions(
                        **{**slurm, "pre_command": slurm["pre_command"] + "; true"}
                    )
                    label = f"slurm tcp (before, {args.before})"
                    results.append(await measure(label, session, options, args.rounds, args.reps))
                finally:
                    sshpyk.agent.command.extension_source = new_loader  # type: ignore[assignment]
                    SlurmLauncher.wait_ready = new_wait  # type: ignore[method-assign]
    finally:
        cluster.stop()
        sshd.stop()
        subprocess.run(["rm", "-rf", str(root)], check=False)
    return results


def table(results: list[dict]) -> str:
    rows = [
        "| Path | Local forwards | kernel_info round trip (median / p90) "
        "| 20 MB print (median, min-max) |",
        "|---|---|---|---|",
    ]
    for r in results:
        mb = r["mb_s"]
        rows.append(
            f"| {r['label']} | {r['path']} | {r['rtt_ms']:.2f} ms / {r['rtt_p90_ms']:.2f} ms "
            f"| {statistics.median(mb):.1f} MB/s ({min(mb):.1f}-{max(mb):.1f}) |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--before", default="23caeee", help="git revision of the old launcher")
    parser.add_argument(
        "--stdio-relay", default="413dfc6", help="git revision of the relay over srun's stdio"
    )
    parser.add_argument("--candidates", default="direct,relay,stdio,before")
    args = parser.parse_args()
    why = slurm_missing()
    if why:
        print(why, file=sys.stderr)
        return 1
    os.environ.setdefault("JUPYTER_PLATFORM_DIRS", "1")
    results = asyncio.run(run(args))
    print(f"{os.cpu_count()} cores; {args.rounds} round trips, {args.reps} x 20 MB each\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

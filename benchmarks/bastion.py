"""Kernel round trips through a bastion against a direct connection, with and without the fix.

Builds the namespace topology of ``tests/support/netns.py`` (root only: real OpenSSH sshds
on veths, the internal hosts reachable only through the bastion), starts one kernel
per path with ``AsyncKernelManager`` on SSH kernelspecs (the same code path as
JupyterLab), and measures, interleaved so that machine load hits every path alike:

* ``kernel_info``: request sent until its reply is back (jupyter_client's
  ``kernel_info(reply=True)``);
* ``cell``: ``execute("pass")`` until the reply *and* IOPub's ``idle`` are in, which
  is when a notebook shows the cell as done.

Paths: ``direct`` (a kernel on the bastion host itself), ``1 hop`` (the internal host
through the bastion) and ``2 hops`` (through two bastions), each hop path once with
the fix off (``sshpyk.ssh.jump.NUDGE_BASTIONS = False`` while its bastion connections
open) and once with it on. Every path has its own bastion connections (aliases of
its own in a generated config), so the two do not share a bastion.

Usage (as root)::

    python benchmarks/bastion.py                 # 200 requests per path, fix off and on
    python benchmarks/bastion.py --fix on --requests 500 --hops 1

Prints a Markdown table; see the module docstring of ``sshpyk/ssh/jump.py`` for the
mechanism.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.netns import Topology, unavailable_reason


@dataclass
class Route:
    """One way to a kernel: its alias, whether the fix was on, and what was measured."""

    label: str  # direct, 1 hop, 2 hops
    fix: bool | None  # None: no bastion
    alias: str
    kernel_info_ms: list[float] = field(default_factory=list)
    cell_ms: list[float] = field(default_factory=list)
    km: Any = None
    kc: Any = None


def bench_config(topo: Topology) -> Path:
    """Aliases of the benchmark's own: each path gets bastion connections of its own."""
    b1, b2 = topo.host("bastion"), topo.host("bastion2")
    inner, deep = topo.host("internal"), topo.host("deep")
    blocks = [f"Host bench-direct\n  HostName {b1.address}\n  IdentityFile {b1.client_key}\n"]
    for fix in ("fix", "nofix"):
        blocks += [
            f"Host bench-b1-{fix}\n  HostName {b1.address}\n  IdentityFile {b1.client_key}\n",
            f"Host bench-b2-{fix}\n  HostName {b2.address}\n  IdentityFile {b2.client_key}\n",
            f"Host bench-in-{fix}\n  HostName {inner.address}\n"
            f"  IdentityFile {inner.client_key}\n  ProxyJump bench-b1-{fix}\n",
            f"Host bench-deep-{fix}\n  HostName {deep.address}\n"
            f"  IdentityFile {deep.client_key}\n  ProxyJump bench-b1-{fix},bench-b2-{fix}\n",
        ]
    config = topo.root / "bench_ssh_config"
    # the topology's config (its Host *: User, IdentitiesOnly, the pinned known_hosts) first:
    # an Include after a Host line would belong to that Host block
    config.write_text(f"Include {topo.ssh_config}\n\n" + "\n".join(blocks))
    return config


async def start(path: Route, config: Path, run_root: str) -> None:
    from jupyter_client.manager import AsyncKernelManager

    from sshpyk.kernelspec import SSHKernelSpec, write_spec
    from sshpyk.ssh import jump

    name = path.alias.replace("-", "_")
    write_spec(
        SSHKernelSpec(
            name=name,
            ssh_host_alias=path.alias,
            ssh_config=str(config),
            remote_python=sys.executable,
            display_name=path.alias,
            remote_run_root=run_root,
        ),
        replace=True,
    )
    # read when the bastion connections open, i.e. during start_kernel
    jump.NUDGE_BASTIONS = path.fix is not False
    path.km = AsyncKernelManager(kernel_name=name)
    await path.km.start_kernel()
    path.kc = path.km.client()
    path.kc.start_channels()
    await path.kc.wait_for_ready(timeout=60)
    for _ in range(10):  # warm-up
        await path.kc.kernel_info(reply=True, timeout=10)


async def measure(path: Route, requests: int) -> None:
    kc = path.kc
    for _ in range(requests):
        t0 = time.perf_counter()
        await kc.kernel_info(reply=True, timeout=10)
        path.kernel_info_ms.append((time.perf_counter() - t0) * 1000)
    for _ in range(requests):
        t0 = time.perf_counter()
        reply = await kc.execute_interactive("pass", store_history=False, timeout=10)
        path.cell_ms.append((time.perf_counter() - t0) * 1000)
        assert reply["content"]["status"] == "ok", reply


async def stop(path: Route) -> None:
    if path.kc is not None:
        path.kc.stop_channels()
    if path.km is not None and path.km.has_kernel:
        await path.km.shutdown_kernel()


def stats(values: list[float]) -> tuple[float, float, float, float]:
    """median, min, 90th percentile, max"""
    ordered = sorted(values)
    return statistics.median(ordered), ordered[0], ordered[int(len(ordered) * 0.9)], ordered[-1]


def table(paths: list[Route]) -> str:
    direct = next(p for p in paths if p.fix is None)
    d_ki, d_cell = statistics.median(direct.kernel_info_ms), statistics.median(direct.cell_ms)
    lines = [
        "| path | fix | kernel_info median | min | p90 | max | x direct | "
        "cell median | min | p90 | max | x direct |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in paths:
        ki, cell = stats(p.kernel_info_ms), stats(p.cell_ms)
        fix = "-" if p.fix is None else ("on" if p.fix else "off")
        lines.append(
            f"| {p.label} | {fix} | {ki[0]:.2f} ms | {ki[1]:.2f} | {ki[2]:.2f} | {ki[3]:.2f} | "
            f"{ki[0] / d_ki:.2f}x | {cell[0]:.2f} ms | {cell[1]:.2f} | {cell[2]:.2f} | "
            f"{cell[3]:.2f} | {cell[0] / d_cell:.2f}x |"
        )
    return "\n".join(lines)


def environment() -> str:
    ssh = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{ssh}; Linux {platform.release()}; Python {platform.python_version()}; "
        f"{os.cpu_count()} CPUs, load average {load}"
    )


async def run(args: argparse.Namespace, topo: Topology) -> list[Route]:
    config = bench_config(topo)
    fixes = {"both": [False, True], "on": [True], "off": [False]}[args.fix]
    paths = [Route("direct", None, "bench-direct")]
    for hops in args.hops:
        label, target = ("1 hop", "in") if hops == 1 else ("2 hops", "deep")
        for fix in fixes:
            paths.append(Route(label, fix, f"bench-{target}-{'fix' if fix else 'nofix'}"))
    run_root = tempfile.mkdtemp(prefix="sshpyk-bench-run-")
    try:
        for path in paths:  # one at a time: the fix flag is read while connecting
            await start(path, config, run_root)
        per_round = max(1, args.requests // args.rounds)
        for _ in range(args.rounds):  # interleaved: load spikes hit every path alike
            for path in paths:
                await measure(path, per_round)
    finally:
        await asyncio.gather(*(stop(p) for p in paths), return_exceptions=True)
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="per path and kind")
    parser.add_argument("--rounds", type=int, default=10, help="interleaving rounds")
    parser.add_argument("--fix", choices=["both", "on", "off"], default="both")
    parser.add_argument("--hops", type=int, nargs="+", choices=[1, 2], default=[1, 2])
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason:
        print(f"cannot build the bastion topology: {reason}", file=sys.stderr)
        return 2
    os.environ["JUPYTER_DATA_DIR"] = tempfile.mkdtemp(prefix="sshpyk-bench-jupyter-")
    os.environ.setdefault("JUPYTER_PLATFORM_DIRS", "1")
    with Topology() as topo:
        paths = asyncio.run(run(args, topo))
    print(table(paths))
    print()
    print(f"{args.requests} requests of each kind per path. {environment()}")
    direct = statistics.median(paths[0].kernel_info_ms)
    for p in paths:
        if p.fix and p.label == "1 hop":
            ratio = statistics.median(p.kernel_info_ms) / direct
            verdict = "met" if ratio <= 1.5 else "NOT met"
            print(f"Target (1 hop kernel_info <= 1.5x direct, fix on): {ratio:.2f}x: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Warm spare kernels (``prestart``, issue 16): start to first reply on an open connection.

Through run.py's DelayProxy (``lib/proxy.py``: a latency of RTT/2 each way, chunks not
queued behind each other, one RTT before each new connection) in front of a throwaway
loopback sshd, at each ``--rtts`` (ms): one SSHSession, one kernel already running (the
connection and the agent are up), then ``--reps`` starts each of

* fresh: the key is chosen here (as the argv launcher's clients do), so the agent
  starts a new kernel;
* spare: the agent may choose the key and a spare kernel is ready (waited for, kept
  by ``prestart=1``): it is taken over.

Time: from ``session.start_kernel()`` to the first kernel_info reply through the new
kernel's forwards (channels connected, ZMTP handshakes done). Target: the spare start at
most 3 RTT + 50 ms (issue 26; issue 16 asked 2 RTT). Prints a Markdown table. Run:
python benchmarks/prestart.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

sys.path.insert(0, str(HERE))

from lib.proxy import DelayProxy  # noqa: E402

from support.faultproxy import proxied_ssh_config  # noqa: E402
from support.sshd import ThrowawaySSHD  # noqa: E402


async def spare_ready(run_root: Path, timeout: float = 60.0) -> None:
    """Wait until a spare's five sockets are bound (the remote is this host)."""
    import json

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # bounded in time
        for record in run_root.glob("sshpyk-*/sshpyk.json"):
            try:
                info = json.loads(record.read_text())
            except (OSError, ValueError):
                continue
            if info.get("spare") and all((record.parent / f"k-{n}").exists() for n in range(1, 6)):
                await asyncio.sleep(0.3)  # the agent's own probe sees it too
                return
        await asyncio.sleep(0.1)
    raise RuntimeError("no spare kernel became ready")


async def first_reply(kernel: Any) -> None:
    kc = kernel.client()
    kc.start_channels()
    try:
        msg_id = kc.kernel_info()
        while True:  # ends at the reply (bounded by get_msg's timeout)
            msg = await kc.get_shell_msg(timeout=60)
            if msg["parent_header"].get("msg_id") == msg_id:
                return
    finally:
        kc.stop_channels()


async def one_rtt(rtt_ms: float, reps: int, root: Path, sshd: ThrowawaySSHD) -> dict[str, Any]:
    import uuid

    from sshpyk import KernelOptions, RemoteKernel, SSHSession

    run_root = root / f"run-{rtt_ms:g}"
    run_root.mkdir(mode=0o700)
    results: dict[str, list[float]] = {"fresh": [], "spare": []}
    with DelayProxy(sshd.port, rtt_ms / 2000.0) as proxy:
        directory = root / f"cfg-{rtt_ms:g}"
        directory.mkdir()
        config = proxied_ssh_config(sshd, proxy, directory, "delayed")
        async with await SSHSession.connect("delayed", ssh_config=config) as session:
            options = KernelOptions(
                kernel_name="python3", python=sys.executable, run_root=str(run_root), prestart=1
            )
            # the connection and the agent up, and a spare kept from now on
            keeper = await session.start_kernel(options=options)
            try:
                for _ in range(reps):
                    for mode in ("fresh", "spare"):
                        kernel = RemoteKernel(session, options)
                        if mode == "spare":
                            await spare_ready(run_root)
                        t0 = time.monotonic()
                        await kernel.start(key=None if mode == "spare" else str(uuid.uuid4()))
                        await first_reply(kernel)
                        results[mode].append(time.monotonic() - t0)
                        await kernel.close()
            finally:
                await keeper.close()
    return {"rtt": rtt_ms, **results}


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    root = Path(tempfile.mkdtemp(prefix="spk-prestart-", dir="/tmp"))
    sshd = ThrowawaySSHD(root / "sshd").start()
    try:
        return [await one_rtt(rtt, args.reps, root, sshd) for rtt in args.rtts]
    finally:
        sshd.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rtts", type=lambda s: [float(x) for x in s.split(",")])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write every sample there (run.py)")
    args = parser.parse_args()
    args.rtts = args.rtts or [0.0, 20.0, 100.0]
    rows = asyncio.run(main_async(args))
    if args.json:
        args.json.write_text(json.dumps(rows))
    print("| RTT | fresh start | spare start | spare in RTT | target: 3 RTT + 50 ms |")
    print("|---|---:|---:|---:|---|")
    for row in rows:
        fresh, spare = statistics.median(row["fresh"]), statistics.median(row["spare"])
        rtt = row["rtt"] / 1000.0
        in_rtt = f"{spare / rtt:.1f}" if rtt else "-"
        target = 3 * rtt + 0.050
        met = "met" if spare <= target else f"not met ({target:.3f} s)"
        print(f"| {row['rtt']:g} ms | {fresh:.3f} s | {spare:.3f} s | {in_rtt} | {met} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

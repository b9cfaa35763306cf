"""What a cell's output loses when the SSH link drops mid-cell (issue 4, item 5).

A cell prints one numbered line every 50 ms for 8 s. After 2 s the link fails, in
one of two ways, through a userspace fault proxy (tests/support/faultproxy.py):

* blackhole: bytes stop moving for 3 s, TCP connections stay up (a Wi-Fi stall);
* reset: every TCP connection is reset and the link is down for 3 s (a new network,
  an sshd restart); sshpyk reconnects and reattaches to the remote agent.

Prints a Markdown table: lines printed, received, lost, and whether the cell's
reply arrived. Run: python benchmarks/drop_output.py
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from support.faultproxy import FaultProxy  # noqa: E402
from support.sshd import ThrowawaySSHD  # noqa: E402

LINES = 160
CELL = f"import time\nfor i in range({LINES}):\n    print(i, flush=True)\n    time.sleep(0.05)"


async def _first_round_trip(kc: Any, since: float, limit: float = 60.0) -> float:
    """Seconds from ``since`` until a kernel_info request on the control channel is
    answered (the shell channel would wait for the running cell)."""
    deadline = since + limit
    sent: set[str] = set()  # a reply to any of them counts (the relay loses none)
    while time.monotonic() < deadline:
        request = kc.session.msg("kernel_info_request")
        sent.add(request["header"]["msg_id"])
        kc.control_channel.send(request)
        try:
            while True:
                msg = await kc.control_channel.get_msg(timeout=0.5)
                if msg["parent_header"].get("msg_id") in sent:
                    return time.monotonic() - since
        except Exception:
            continue
    return float("nan")


async def measure(mode: str, kernel_name: str, proxy: FaultProxy) -> dict[str, object]:
    from jupyter_client.manager import AsyncKernelManager

    km = AsyncKernelManager(kernel_name=kernel_name)
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    received: set[int] = set()
    try:
        await kc.wait_for_ready(timeout=60)
        msg_id = kc.execute(CELL)
        await asyncio.sleep(2)
        if mode == "blackhole":
            proxy.blackhole()
        else:
            proxy.reset(down=True)
        await asyncio.sleep(3)
        proxy.heal()
        healed = time.monotonic()
        usable_after = await _first_round_trip(kc, healed)
        reply = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                msg = await kc.get_iopub_msg(timeout=1)
            except Exception:
                msg = None
            if msg and msg["parent_header"].get("msg_id") == msg_id:
                if msg["msg_type"] == "stream":
                    received.update(int(x) for x in msg["content"]["text"].split())
                if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                    break
        try:
            while True:
                shell = await kc.get_shell_msg(timeout=5)
                if shell["parent_header"].get("msg_id") == msg_id:
                    reply = shell["content"]["status"]
                    break
        except Exception:
            reply = "lost"
        return {
            "usable": usable_after,
            "mode": mode,
            "printed": LINES,
            "received": len(received),
            "lost": LINES - len(received),
            "reply": reply,
            "same kernel": km.provisioner._kernel.process is not None,
        }
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="sshpyk-drop-") as tmp, ThrowawaySSHD() as sshd:
        os.environ["JUPYTER_DATA_DIR"] = tmp
        rows = []
        for mode in ("blackhole", "reset"):
            with FaultProxy(sshd.port) as proxy:
                host_key = (sshd.root / "host_ed25519.pub").read_text().split()
                known = Path(tmp, f"known_{mode}")
                known.write_text(f"[127.0.0.1]:{proxy.port} {host_key[0]} {host_key[1]}\n")
                config = Path(tmp, f"config_{mode}")
                config.write_text(
                    f"Host proxied\n  HostName 127.0.0.1\n  Port {proxy.port}\n"
                    f"  User {sshd.user}\n  IdentityFile {sshd.root / 'id_ed25519'}\n"
                    f"  UserKnownHostsFile {known}\n"
                )
                spec_dir = Path(tmp, "kernels", f"drop_{mode}")
                spec_dir.mkdir(parents=True)
                (spec_dir / "kernel.json").write_text(
                    json.dumps(
                        {
                            "argv": ["-"],
                            "display_name": mode,
                            "language": "python",
                            "metadata": {
                                "kernel_provisioner": {
                                    "provisioner_name": "sshpyk-provisioner",
                                    "config": {
                                        "ssh_host_alias": "proxied",
                                        "ssh_config": str(config),
                                        "remote_python": sys.executable,
                                    },
                                }
                            },
                        }
                    )
                )
                rows.append(asyncio.run(measure(mode, f"drop_{mode}", proxy)))
    print(
        "| link fault (3 s, 2 s into the cell) | lines printed | received | lost "
        "| cell reply | usable after the link returns |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['mode']} | {row['printed']} | {row['received']} | {row['lost']} "
            f"| {row['reply']} | {row['usable']:.2f} s |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

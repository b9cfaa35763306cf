"""The sshpyk demo: a throwaway sshd on 127.0.0.1, an SSH kernelspec, a remote cell.

Nothing outside a temp dir is touched; everything is cleaned up at the end.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from sshpyk.localfs import BROKER_DIR_ENV

from support.broker import broker_pid, stop_broker
from support.sshd import ThrowawaySSHD


def step(label: str, seconds: float) -> None:
    print(f"  {label:<42} {seconds * 1000:8.1f} ms", flush=True)


async def run_kernel(kernel_name: str, run_root: str) -> None:
    from jupyter_client.manager import AsyncKernelManager

    km = AsyncKernelManager(kernel_name=kernel_name)
    t0 = time.monotonic()
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        step("start kernel (connect + launch + ready)", time.monotonic() - t0)
        out: list[str] = []
        code = (
            "import os, socket\n"
            "print('hostname      :', socket.gethostname())\n"
            "print('kernel pid    :', os.getpid())\n"
            "print('SSH_CONNECTION:', os.environ.get('SSH_CONNECTION'))"
        )
        t1 = time.monotonic()
        reply = await kc.execute_interactive(
            code,
            output_hook=lambda m: (
                out.append(m["content"].get("text", "")) if m["msg_type"] == "stream" else None
            ),
            timeout=30,
        )
        step("execute a cell", time.monotonic() - t1)
        assert reply["content"]["status"] == "ok", reply["content"]
        t2 = time.monotonic()
        rounds = 50
        for _ in range(rounds):
            msg_id = kc.kernel_info()
            while (await kc.get_shell_msg(timeout=10))["parent_header"]["msg_id"] != msg_id:
                pass
        step("kernel_info round trip (mean of 50)", (time.monotonic() - t2) / rounds)
        print("\n  remote cell output:")
        for line in "".join(out).splitlines():
            print("    " + line)
        print()
    finally:
        kc.stop_channels()
        t3 = time.monotonic()
        await km.shutdown_kernel()
        step("shutdown", time.monotonic() - t3)
    left = list(Path(run_root).iterdir())
    print(f"  remote run dirs left behind: {len(left)}")
    if left:
        raise SystemExit("demo failed: the remote run dir was not cleaned up")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="sshpyk-demo-") as tmp:
        os.environ["JUPYTER_DATA_DIR"] = os.path.join(tmp, "jupyter")
        os.environ["JUPYTER_RUNTIME_DIR"] = os.path.join(tmp, "runtime")
        # the connection broker (connection sharing is on by default) of the demo's own,
        # stopped at the end: not the user's
        broker_dir = Path(tmp, "broker")
        os.environ[BROKER_DIR_ENV] = str(broker_dir)
        run_root = os.path.join(tmp, "remote-run")
        os.makedirs(run_root, mode=0o700)
        t0 = time.monotonic()
        with ThrowawaySSHD(os.path.join(tmp, "sshd")) as sshd:
            print(f"sshpyk demo: throwaway sshd on 127.0.0.1:{sshd.port}")
            step("start sshd", time.monotonic() - t0)
            add = [
                sys.executable,
                "-m",
                "sshpyk.cli",
                "add",
                "--kernel-name",
                "ssh_demo",
                "--ssh-host-alias",
                sshd.alias,
                "--ssh-config",
                str(sshd.ssh_config),
                "--remote-python",
                sys.executable,
            ]
            print("  $ sshpyk add --kernel-name ssh_demo --ssh-host-alias", sshd.alias, "...")
            t1 = time.monotonic()
            subprocess.run(add, check=True)
            step("sshpyk add (checks the remote)", time.monotonic() - t1)
            spec_file = Path(tmp, "jupyter", "kernels", "ssh_demo", "kernel.json")
            # keep the demo's remote run dirs in the temp dir so the check below is exact
            import json

            data = json.loads(spec_file.read_text())
            data["metadata"]["kernel_provisioner"]["config"]["remote_run_root"] = run_root
            spec_file.write_text(json.dumps(data))
            try:
                asyncio.run(run_kernel("ssh_demo", run_root))
                pid = broker_pid(broker_dir)
                print(f"  connection broker (shared by every sshpyk process): pid {pid}")
            finally:
                stop_broker(broker_dir)
        print("sshpyk demo: OK, everything cleaned up")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A client that ignores the provisioner, as VS Code's Jupyter extension, Zed and Positron
do: it writes a connection file with its own ports and key, spawns the argv
KernelSpecManager reports with ``{connection_file}`` substituted, and drives a
BlockingKernelClient on those ports (the kernel is :mod:`sshpyk.launch`)."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from jupyter_client.blocking import BlockingKernelClient
from jupyter_client.connect import write_connection_file
from jupyter_client.kernelspec import KernelSpecManager

REPO = Path(__file__).resolve().parents[2]
CHANNELS = ("shell", "iopub", "stdin", "control", "hb")


class RawClient:
    """The client side of one kernel, as VS Code's Jupyter extension does it."""

    def __init__(
        self,
        name: str,
        tmp_path: Path,
        transport: str = "tcp",
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        #: the launcher's environment (None: this process's)
        self.env = env
        self.transport = transport
        #: ipc: the socket path prefix the client chose (its sockets are {ip}-{port})
        self.ip = str(tmp_path / "ipc" / "kernel") if transport == "ipc" else "127.0.0.1"
        self.key = uuid.uuid4().hex
        self.connection_file = str(tmp_path / f"kernel-{uuid.uuid4().hex[:8]}.json")
        self.stderr_path = tmp_path / f"{name}-launcher.log"
        self.ports: dict[str, int] = {}
        self.launcher: subprocess.Popen[bytes] | None = None
        self.client: BlockingKernelClient | None = None

    def write(self) -> None:
        """The connection file: free ports picked by jupyter_client (the same ones on a
        restart), the client's key."""
        ports = {f"{c}_port": self.ports.get(c, 0) for c in CHANNELS}
        if self.transport == "ipc":
            os.makedirs(os.path.dirname(self.ip), mode=0o700, exist_ok=True)
        _, cfg = write_connection_file(
            self.connection_file,
            ip=self.ip,
            key=self.key.encode(),
            transport=self.transport,
            **ports,
        )
        self.ports = {c: int(cfg[f"{c}_port"]) for c in CHANNELS}

    def argv(self) -> list[str]:
        argv = KernelSpecManager().get_kernel_spec(self.name).argv
        return [a.replace("{connection_file}", self.connection_file) for a in argv]

    def launch(self) -> subprocess.Popen[bytes]:
        """Write the connection file and spawn kernel.json's argv (no client yet)."""
        self.write()
        env = {**(os.environ if self.env is None else self.env), "PYTHONPATH": str(REPO)}
        with open(self.stderr_path, "ab") as log:
            self.launcher = subprocess.Popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env
            )
        return self.launcher

    def spawn(self) -> None:
        self.launch()
        client = BlockingKernelClient(connection_file=self.connection_file)
        client.load_connection_file()
        client.start_channels()
        try:
            self._wait_ready(client)
        except BaseException:
            client.stop_channels()
            raise
        self.client = client

    def _wait_ready(self, client: BlockingKernelClient, timeout: float = 60) -> None:
        """kernel_info answered. The heartbeat misses its first beats while the remote
        kernel starts (wait_for_ready then says "died"): retry while the launcher runs,
        as VS Code waits for the kernel."""
        assert self.launcher is not None
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.wait_for_ready(timeout=max(1.0, deadline - time.monotonic()))
                return
            except RuntimeError:
                if self.launcher.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def execute(self, code: str, timeout: float = 30) -> tuple[dict[str, Any], str]:
        assert self.client is not None
        out: list[str] = []

        def hook(msg: dict[str, Any]) -> None:
            if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
                out.append(msg["content"]["text"])

        reply = self.client.execute_interactive(code, output_hook=hook, timeout=timeout)
        return reply["content"], "".join(out)

    def remote_pid(self) -> int:
        return int(self.execute("import os; print(os.getpid())")[1])

    def stop_client(self) -> None:
        if self.client is not None:
            self.client.stop_channels()
            self.client = None

    def wait_launcher(self, timeout: float) -> int:
        assert self.launcher is not None
        return self.launcher.wait(timeout)

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def close(self) -> None:
        self.stop_client()
        if self.launcher is not None and self.launcher.poll() is None:
            self.launcher.terminate()
            try:
                self.launcher.wait(20)
            except subprocess.TimeoutExpired:
                self.launcher.kill()
                self.launcher.wait(5)

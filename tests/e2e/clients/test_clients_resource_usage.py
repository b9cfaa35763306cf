"""jupyter-resource-usage's kernel usage through sshpyk: its ``usage_request`` on the
control channel, which ipykernel (>= 6.11) answers itself (with psutil, a dependency of
the package), passes through sshpyk's forwards and relay unchanged.

As a user has it: ``pip install jupyter-resource-usage`` next to Jupyter Server, whose
server extension its install enables; nothing to load in the kernel. The test asks the
package's own REST handler of a real Jupyter Server (what its JupyterLab panel asks
every few seconds), then sends the same request from jupyter_client directly.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from support.jupyter_server import JupyterServer
from support.kernels import start_manager, stop_manager

pytest.importorskip("jupyter_server", reason="jupyter_server is missing ('.[clients]')")
pytest.importorskip("jupyter_resource_usage", reason="needs jupyter-resource-usage ('.[clients]')")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

#: what ipykernel's usage_reply carries with psutil (the package's panel shows them)
USAGE_FIELDS = {"hostname", "pid", "kernel_cpu", "kernel_memory", "cpu_count"}


async def remote_pid(sshd: Any, run_root: Path, kernel_id: str) -> int:
    """The kernel's pid as `sshpyk ps --json` says (a process of its own)."""
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "sshpyk.cli", "ps", "--json", sshd.alias),
        *("--ssh-config", str(sshd.ssh_config), "--run-root", str(run_root)),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    (host,) = json.loads(out)["hosts"]
    (kernel,) = [k for k in host["kernels"] if k["kernel_id"] == kernel_id]
    return int(kernel["pid"])


async def test_usage_request_through_jupyter_resource_usage(
    tmp_path: Path, make_kernelspec, sshd, run_root, no_leftovers
) -> None:
    make_kernelspec("ssh_usage_ru")
    server = JupyterServer(tmp_path / "server")
    await asyncio.to_thread(server.start)
    try:
        kernel = await asyncio.to_thread(
            server.api, "POST", "/api/kernels", {"name": "ssh_usage_ru"}
        )
        kernel_id = kernel["id"]
        path = f"/api/metrics/v1/kernel_usage/get_usage/{kernel_id}"
        deadline = time.monotonic() + 60
        while True:  # bounded: the kernel answers once it runs (the handler waits 10 s)
            reply = await asyncio.to_thread(server.api, "GET", path)
            if reply.get("header", {}).get("msg_type") == "usage_reply":
                break
            assert time.monotonic() < deadline, reply
            await asyncio.sleep(0.5)
        content = reply["content"]
        assert USAGE_FIELDS <= set(content), content
        assert reply["kernel_id"] == kernel_id
        assert content["hostname"] == socket.gethostname()  # the "remote" is this host
        assert content["pid"] == await remote_pid(sshd, run_root, kernel_id)
        assert 10 << 20 < content["kernel_memory"] < 4 << 30
        await asyncio.to_thread(server.api, "DELETE", f"/api/kernels/{kernel_id}")
    finally:
        returncode = await asyncio.to_thread(server.stop)
    assert returncode == 0
    no_leftovers()


async def test_usage_request_on_the_control_channel(make_kernelspec, no_leftovers) -> None:
    """What jupyter-resource-usage's handler sends, from jupyter_client: the reply is
    signed with the kernel's key (the client checks it) and answers our request."""
    make_kernelspec("ssh_usage_ctl")
    km, kc = await start_manager("ssh_usage_ctl")
    try:
        request = kc.session.msg("usage_request", {})
        kc.control_channel.send(request)
        reply = await kc.control_channel.get_msg(timeout=30)
        assert reply["msg_type"] == "usage_reply"
        assert reply["parent_header"]["msg_id"] == request["header"]["msg_id"]
        assert USAGE_FIELDS <= set(reply["content"]), reply["content"]
        assert reply["content"]["pid"] == km.provisioner.remote_kernel.process.pid
    finally:
        await stop_manager(km, kc)
    no_leftovers()

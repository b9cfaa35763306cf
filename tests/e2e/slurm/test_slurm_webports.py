"""A web app a SLURM kernel starts on the compute node, forwarded here (issue 21, item 4):
through the login node's agent (a relay socket ``p-PORT`` in the kernel's socket dir,
the node connection behind it), never by a port on the cluster network.

The throwaway single-node SLURM (tests/support/slurm.py) runs on this host, not in a
namespace, so the node's ``127.0.0.1:P`` is ours too: the app holds P here, and the
forward must fall back to a free port (and say so) while still reaching the app on the
node. Neither the node side nor the login node's agent listens on a TCP port for it; the
app's exit removes the relay socket and closes the local port. Fixtures are test_slurm.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from e2e.network.test_webports import START, URL_RE, free_port, http_get, refused, wait_serving
from e2e.slurm.test_slurm import (  # noqa: F401 (cluster, slurm, slurm_spec: fixtures)
    cluster,
    listeners,
    parent_pid,
    slurm,
    slurm_spec,
)
from support.kernels import run_cell, start_manager, stop_manager
from support.slurm import ThrowawaySlurm
from support.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


async def test_a_listener_on_the_compute_node_is_forwarded_through_the_login_node(
    slurm: ThrowawaySlurm,  # noqa: F811
    slurm_spec: Any,  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    no_leftovers: Any,
) -> None:
    caplog.set_level(logging.INFO)
    slurm_spec("ssh_slurm_web")
    port = free_port()
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<h1>served on the compute node</h1>")
    server_pid = 0
    km, kc = await start_manager("ssh_slurm_web")
    try:
        kernel = km.provisioner.remote_kernel
        assert kernel is not None and kernel.process is not None
        assert kernel.process.launcher == "slurm"
        args = ["-u", "-m", "http.server", str(port), "--bind", "127.0.0.1"]
        code = START.format(
            args=[*args, "--directory", str(site)],
            log=str(tmp_path / "http.log"),
            name="node",
            ready="Serving HTTP",
            detach=False,
        )
        content, out = await run_cell(kc, code + "import os; print(os.environ['SLURM_JOB_ID'])")
        printed_at = time.monotonic()
        assert content["status"] == "ok", content
        server_pid = int(re.search(r"^pid (\d+)$", out, re.M).group(1))  # type: ignore[union-attr]
        match = URL_RE.search(out)
        assert match and int(match.group(2)) == port, out
        assert out.split()[-1] == slurm.jobs()[0]["job_id"]  # the cell ran in the job

        def forwarded() -> dict[int, int]:
            return {r["remote_port"]: r["local"] for r in kernel.web.listing() if r["auto"]}

        assert await asyncio.to_thread(wait_until, lambda: port in forwarded(), 10), (
            kernel.web.listing(),
            kernel.process.web_ports,
        )
        local = forwarded()[port]
        assert local != port  # the app holds the port here: the node is this host
        url = f"http://127.0.0.1:{local}"
        took = await asyncio.to_thread(wait_serving, url, "served on the compute node", printed_at)
        print(f"\nSLURM web port: print->URL works {took:.2f}s")
        kid = kernel.kernel_id
        said = f"remote port {port} of kernel {kid} is at {url} (local port {port} is taken)"
        assert any(said in r.getMessage() for r in caplog.records), caplog.text
        # through the login node's agent: its relay socket for the port, in the kernel's
        # socket dir, not a TCP connection to the node
        (entry,) = [p for p in kernel.process.web_ports if p["port"] == port]
        path = entry.get("path")
        assert path and os.path.basename(path) == f"p-{port}", entry
        assert stat.S_ISSOCK(os.stat(path).st_mode), path
        socket_dirs = {os.path.dirname(str(e)) for e in kernel.process.endpoints.values()}
        assert socket_dirs == {os.path.dirname(path)}, (kernel.process.endpoints, path)
        (target,) = [t for t in kernel.web._auto if t.port == port]
        assert target.path == path
        # no port on the cluster network for it: the node side and the login node's
        # agent listen on no TCP port at all, the agent on the relay socket
        node_side = parent_pid(int(kernel.process.details["node_pid"]))
        agent = kernel.process.agent.pid
        assert agent is not None
        others = listeners([node_side, agent])
        assert others["tcp"] == others["tcp6"] == [], others
        assert path in others["unix"], others
        # the app's exit closes the relay socket and the local port
        await run_cell(kc, "_servers['node'].terminate(); _servers['node'].wait(10)")
        assert await asyncio.to_thread(wait_until, lambda: refused("127.0.0.1", local), 10)
        assert not os.path.exists(path)
        assert await asyncio.to_thread(http_get, url) is None
    finally:
        await stop_manager(km, kc)
        if server_pid:
            with contextlib.suppress(OSError):  # ended with the job step, normally
                os.kill(server_pid, signal.SIGKILL)
    assert slurm.jobs() == []
    no_leftovers()

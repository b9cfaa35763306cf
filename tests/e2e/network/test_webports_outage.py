"""A kernel's web forwards across an outage (issue 21, item 5), through the userspace
fault proxy: while the link is down the local listener stays on its port (a browser's
connection is accepted and waits), and after the reconnect the app answers again at the
same local URL, through the same forward."""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from support.faultproxy import FaultProxy
from support.kernels import run_cell, start_manager, stop_manager
from support.kernelspecs import proxied_kernelspec
from support.waiting import leftovers, wait_until

SERVE = """
import subprocess, sys, pathlib
site = pathlib.Path({site!r})
site.mkdir(exist_ok=True)
(site / "index.html").write_text("the remote app")
argv = [sys.executable, "-m", "http.server", "{port}", "--bind", "127.0.0.1"]
server = subprocess.Popen(
    argv + ["--directory", str(site)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
)
print(server.pid)
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return str(reply.read().decode())
    except OSError:
        return None


async def test_a_web_forward_comes_back_after_a_reset(
    make_kernelspec: Callable[..., Any],
    proxied_config: Path,
    proxy: FaultProxy,
    run_root: Path,
    tmp_path: Path,
) -> None:
    proxied_kernelspec(make_kernelspec, proxied_config, "ssh_web_outage")
    km, kc = await start_manager("ssh_web_outage")
    try:
        port = free_port()
        _, out = await run_cell(kc, SERVE.format(site=str(tmp_path / "site"), port=port))
        server_pid = int(out.split()[-1])
        kernel = km.provisioner.remote_kernel

        def forwarded() -> dict[int, str]:
            return {r["remote_port"]: r["url"] for r in kernel.web.listing() if r["auto"]}

        assert await asyncio.to_thread(wait_until, lambda: port in forwarded(), 15), (
            kernel.web.listing()
        )
        url = forwarded()[port]  # a fallback port: on loopback the app holds `port` here
        assert await asyncio.to_thread(wait_until, lambda: get(url) == "the remote app", 10)
        local_port = int(url.rsplit(":", 1)[1])

        proxy.reset(down=True)  # every connection reset, reconnects refused
        await asyncio.sleep(2.0)
        # the listener is still here: a browser's connection is accepted and waits
        with socket.create_connection(("127.0.0.1", local_port), timeout=5):
            pass
        assert forwarded() == {port: url}
        proxy.heal()
        healed = time.monotonic()
        assert await asyncio.to_thread(wait_until, lambda: get(url) == "the remote app", 30, 0.2), (
            f"{url} did not answer within 30 s of the heal"
        )
        print(f"\nweb forward usable {time.monotonic() - healed:.2f}s after the heal")
        assert forwarded() == {port: url}  # the same forward, the same local port
        await run_cell(kc, f"import os, signal; os.kill({server_pid}, signal.SIGTERM)")
        assert await asyncio.to_thread(wait_until, lambda: port not in forwarded(), 10)
    finally:
        proxy.heal()
        await stop_manager(km, kc)
    assert await asyncio.to_thread(wait_until, lambda: leftovers(run_root) == ([], []), 15)

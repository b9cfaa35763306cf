"""Warm spare kernels (``prestart``): the agent keeps N started kernels of a kernelspec;
a start from jupyter_client takes one over (with its own key, which jupyter_client then
uses), a replacement starts, and nothing is left at the end. A restart keeps the key
(jupyter_client's clients hold a copy of it), so it starts a fresh kernel."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from support.kernels import run_cell, start_manager, stop_manager
from support.waiting import leftovers, pid_alive, wait_until

pytestmark = pytest.mark.timeout(300)


def spares(run_root: Path) -> list[dict[str, Any]]:
    """The records of the live spare kernels in ``run_root`` (the remote is this host),
    each with its ``run_dir``."""
    found = []
    for record in run_root.glob("sshpyk-*/sshpyk.json"):
        try:
            info = json.loads(record.read_text())
        except (OSError, ValueError):
            continue  # being written or removed
        if info.get("spare") and pid_alive(int(info.get("pid") or 0)):
            found.append({**info, "run_dir": record.parent})
    return found


async def ready_spare(run_root: Path, timeout: float = 60) -> dict[str, Any]:
    """A spare whose five sockets are bound (ipykernel binds ipc in its run dir)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # bounded in time
        for info in spares(run_root):
            if all((info["run_dir"] / f"k-{n}").exists() for n in range(1, 6)):
                return info
        await asyncio.sleep(0.2)
    raise AssertionError(f"no ready spare kernel within {timeout:g}s: {spares(run_root)}")


async def test_start_and_restart_take_a_warm_spare(make_kernelspec, run_root) -> None:
    make_kernelspec("ssh_warm", prestart=1)
    km1, kc1 = await start_manager("ssh_warm")
    km2 = kc2 = None
    try:
        first = km1.provisioner.remote_kernel.process
        assert not first.key  # nothing to take yet: a fresh kernel, with km's key
        spare = await ready_spare(run_root)
        km2, kc2 = await start_manager("ssh_warm")
        process = km2.provisioner.remote_kernel.process
        assert process.pid == spare["pid"], "the second start did not take the spare"
        assert process.key and km2.session.key == process.key.encode()
        _, out = await run_cell(kc2, "import os; print(os.getpid())")
        assert out.strip() == str(spare["pid"])  # the client speaks the spare's key
        # both first links went on the channel opened to the agent's relay socket
        # while the launch was in flight (the spare's handed over by its new id)
        for km in (km1, km2):
            link = km.provisioner.remote_kernel.forwards._link
            assert link is not None and link.took_ahead
        # a replacement starts; a restart keeps its key: a fresh kernel, clients go on
        replacement = await ready_spare(run_root)
        assert replacement["pid"] != spare["pid"]
        await km1.restart_kernel()
        await kc1.wait_for_ready(timeout=60)
        _, out = await run_cell(kc1, "import os; print(os.getpid())")
        restarted = km1.provisioner.remote_kernel.process
        assert out.strip() == str(restarted.pid) and restarted.pid != replacement["pid"]
        assert not restarted.key
        assert wait_until(lambda: not pid_alive(first.pid), 10)
    finally:
        if km2 is not None:
            await stop_manager(km2, kc2)
        await stop_manager(km1, kc1)
    # the session closes with the last kernel: the agent reaps its spares
    assert wait_until(lambda: spares(run_root) == [], 30), spares(run_root)
    assert wait_until(lambda: leftovers(run_root) == ([], []), 10), leftovers(run_root)


async def test_no_spares_without_prestart(make_kernelspec, run_root) -> None:
    make_kernelspec("ssh_cold")
    km, kc = await start_manager("ssh_cold")
    try:
        await asyncio.sleep(2)
        assert spares(run_root) == []
    finally:
        await stop_manager(km, kc)

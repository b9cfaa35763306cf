"""The idle timeout (``idle_timeout``, sshpyk/agent/remote/idle.py) through a real sshd:
an idle kernel is shut down in time (+-5 s), a busy one (a long cell) is kept, and
Jupyter's KernelRestarter calls it dead without restarting it; the argv launcher exits
with EXIT_IDLE; a persistent kernel whose owner is gone is reaped too; a kernel
without a relay is not watched (ps's idle_s is null)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from jupyter_client.ioloop import AsyncIOLoopKernelManager

from sshpyk.agent.remote.idle import idle_seconds
from sshpyk.kernelspec import kernels_dir
from sshpyk.launch import EXIT_IDLE

from .test_persistent import orphaned_kernel
from support.cli import sshpyk
from support.jupyter_server import JupyterServer
from support.kernels import run_cell
from support.raw_client import RawClient
from support.waiting import leftovers, pid_alive, remote_processes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

#: the idle timeout of these tests (s); the spec allows +-5 s around it
TIMEOUT = 8.0


async def until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Wait (without blocking the loop: the restarter polls on it) for ``predicate``."""
    deadline = time.monotonic() + timeout
    while not predicate():  # ends at the deadline
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


def no_kernel_runs(run_root: Path) -> bool:
    """No kernel process and no kernel run dir under ``run_root`` (agents' dirs aside)."""
    dirs = [p for p in run_root.iterdir() if not p.name.startswith("sshpyk-agent-")]
    return not dirs and not remote_processes(str(run_root))


def kill_if_alive(pid: int) -> None:
    if pid > 1 and pid_alive(pid):
        os.killpg(pid, signal.SIGKILL)


def ps_idle(sshd, run_root, pid: int) -> float | None:
    """``sshpyk ps --json``'s idle_s of the kernel ``pid`` (another agent answers)."""
    args = [sshd.alias, "--ssh-config", str(sshd.ssh_config), "--run-root", str(run_root)]
    result = sshpyk("ps", "--json", *args)
    assert result.exit_code == 0, result.output
    (host,) = json.loads(result.stdout)["hosts"]
    (kernel,) = [k for k in host["kernels"] if k.get("pid") == pid]
    return kernel["idle_s"]


async def test_idle_kernel_is_reaped_busy_kept_and_jupyter_sees_it_dead(
    make_kernelspec, run_root, sshd
) -> None:
    make_kernelspec("ssh_idle", idle_timeout=TIMEOUT)
    km = AsyncIOLoopKernelManager(kernel_name="ssh_idle", autorestart=True)
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    pid = km.provisioner.remote_kernel.process.pid
    try:
        await kc.wait_for_ready(timeout=60)
        events: list[str] = []
        km.add_restart_callback(lambda: events.append("restart"), "restart")
        km.add_restart_callback(lambda: events.append("dead"), "dead")
        run_dir = km.provisioner.remote_kernel.process.run_dir
        limit = km._restarter.restart_limit
        assert limit > 0

        # busy: a cell twice as long as the timeout, then alive and answering
        content, _ = await run_cell(kc, f"import time; time.sleep({2 * TIMEOUT})")
        assert content["status"] == "ok", content
        content, out = await run_cell(kc, "print(6 * 7)")
        assert out.strip() == "42" and pid_alive(pid)
        idle_from = time.monotonic()

        # ps's idle_s counts from the last activity
        await asyncio.sleep(1.5)
        idle = idle_seconds(run_dir)
        assert idle is not None and 0.5 <= idle <= 1.5 + 2.0, idle
        idle = await asyncio.to_thread(ps_idle, sshd, run_root, pid)
        assert idle is not None and 0.5 <= idle < TIMEOUT, idle

        # idle: shut down in time
        assert await until(lambda: not pid_alive(pid), TIMEOUT + 20)
        reaped_after = time.monotonic() - idle_from
        print(f"reaped {reaped_after:.1f} s after the last activity (timeout {TIMEOUT} s)")
        assert TIMEOUT - 5 <= reaped_after <= TIMEOUT + 5, reaped_after

        # dead, not restarted: the restarter (polling every 3 s) fires 'dead' only
        assert await until(lambda: "dead" in events, 15), events
        assert events == ["dead"]
        assert not await km.is_alive()
        assert km.provisioner.remote_kernel is None  # released: its manager is dropped
        await asyncio.sleep(4.0)  # a restart would have started by now
        assert events == ["dead"]
        assert await until(lambda: no_kernel_runs(run_root), 10), leftovers(run_root)

        # the same manager's next kernel is restarted again if it dies (the limit is back)
        await km.start_kernel()
        assert km._restarter.restart_limit == limit
        assert km.provisioner.remote_kernel.process.pid != pid
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
        kill_if_alive(pid)


def test_argv_launcher_exits_with_exit_idle(make_kernelspec, tmp_path, run_root) -> None:
    make_kernelspec("ssh_idle_argv", idle_timeout=TIMEOUT)
    raw = RawClient("ssh_idle_argv", tmp_path, "tcp")
    try:
        raw.spawn()
        pid = raw.remote_pid()  # the last activity
        idle_from = time.monotonic()
        code = raw.wait_launcher(TIMEOUT + 20)
        reaped_after = time.monotonic() - idle_from
        print(f"argv: launcher exited {reaped_after:.1f} s after the last activity")
        assert code == EXIT_IDLE
        assert TIMEOUT - 5 <= reaped_after <= TIMEOUT + 5, reaped_after
        assert not pid_alive(pid)
        assert "shut down after" in raw.log() and "(idle timeout" in raw.log(), raw.log()
        assert raw.key not in raw.log()
    finally:
        raw.close()
    assert no_kernel_runs(run_root), leftovers(run_root)


async def test_persistent_kernel_without_its_owner_is_reaped(
    make_kernelspec, run_root, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("SSHPYK_STATE_DIR", str(tmp_path / "sshpyk-state"))
    make_kernelspec("ssh_idle_persist")
    path = Path(kernels_dir()) / "ssh_idle_persist" / "kernel.json"
    data = json.loads(path.read_text())
    config = data["metadata"]["kernel_provisioner"]["config"]
    config.update(persistent=True, grace_period=2.0, idle_timeout=TIMEOUT)
    path.write_text(json.dumps(data))
    # its owner ran a cell (the last activity), printed the pid and was SIGKILLed
    pid = await orphaned_kernel("ssh_idle_persist", "idle.ipynb")
    idle_from = time.monotonic()
    try:
        assert pid_alive(pid)
        assert await until(lambda: not pid_alive(pid), TIMEOUT + 20)
        reaped_after = time.monotonic() - idle_from
        print(f"persistent: reaped {reaped_after:.1f} s after the last activity")
        assert reaped_after <= TIMEOUT + 5, reaped_after
        assert await until(lambda: no_kernel_runs(run_root), 10), leftovers(run_root)
    finally:
        kill_if_alive(pid)


async def test_kernel_without_relay_is_not_watched(make_kernelspec, run_root, sshd) -> None:
    """outage_buffer 0: the channels are SSH channels straight to the kernel's sockets, the
    agent sees none of it: idle_s is unknown and the timeout does not apply."""
    make_kernelspec("ssh_idle_direct", idle_timeout=2.0, outage_buffer=0.0)
    km = AsyncIOLoopKernelManager(kernel_name="ssh_idle_direct", autorestart=True)
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    pid = km.provisioner.remote_kernel.process.pid
    try:
        await kc.wait_for_ready(timeout=60)
        assert km.provisioner.remote_kernel.process.relay is None
        await asyncio.sleep(2.0 + 4.0)
        assert pid_alive(pid)
        assert await asyncio.to_thread(ps_idle, sshd, run_root, pid) is None
        assert (await run_cell(kc, "print(6 * 7)"))[1].strip() == "42"
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
        kill_if_alive(pid)


async def test_jupyter_server_drops_the_kernel_without_restarting_it(
    tmp_path: Path, make_kernelspec, run_root
) -> None:
    """A real Jupyter Server: the kernel reaped for idleness leaves /api/kernels ('dead'),
    and its log says why, without a restart."""
    make_kernelspec("ssh_idle_server", idle_timeout=TIMEOUT)
    server = JupyterServer(tmp_path / "server")
    await asyncio.to_thread(server.start)
    try:
        kernel = await asyncio.to_thread(
            server.api, "POST", "/api/kernels", {"name": "ssh_idle_server"}
        )
        started = time.monotonic()

        def listed() -> bool:
            return any(k["id"] == kernel["id"] for k in server.api("GET", "/api/kernels"))

        assert await asyncio.to_thread(listed)
        deadline = time.monotonic() + TIMEOUT + 60  # its start, the timeout, 'dead'
        while await asyncio.to_thread(listed):  # bounded by the deadline
            assert time.monotonic() < deadline, server.log_text()[-3000:]
            await asyncio.sleep(0.5)
        print(f"server: the kernel left /api/kernels {time.monotonic() - started:.1f} s after POST")
        log = server.log_text()
        assert "shut down after" in log and "(idle timeout): not restarted" in log, log[-3000:]
        assert "restarting kernel" not in log, log[-3000:]
        assert await until(lambda: no_kernel_runs(run_root), 10), leftovers(run_root)
    finally:
        await asyncio.to_thread(server.stop)

"""Persistent kernels: they outlive their local process and can be reattached."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.provisioning import KernelProvisionerFactory

from sshpyk import state
from sshpyk.kernelspec import kernels_dir

from support.kernels import run_cell, start_manager, stop_manager
from support.waiting import leftovers, pid_alive, wait_until

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "sshpyk-state"
    monkeypatch.setenv("SSHPYK_STATE_DIR", str(path))
    return path


def persistent_spec(make_kernelspec, name: str, grace: float = 3.0) -> None:
    make_kernelspec(name)
    path = Path(kernels_dir()) / name / "kernel.json"
    data = json.loads(path.read_text())
    data["metadata"]["kernel_provisioner"]["config"].update(persistent=True, grace_period=grace)
    path.write_text(json.dumps(data))


OWNER = textwrap.dedent(
    """
    import asyncio, os, sys
    from jupyter_client.manager import AsyncKernelManager

    async def main():
        km = AsyncKernelManager(kernel_name=sys.argv[1])
        await km.start_kernel(env={**os.environ, "JPY_SESSION_NAME": sys.argv[2]})
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)
        reply = await kc.execute_interactive("x = 41", timeout=30)
        assert reply["content"]["status"] == "ok"
        print(km.provisioner.remote_kernel.process.pid, flush=True)
        await asyncio.sleep(600)

    asyncio.run(main())
    """
)


async def orphaned_kernel(kernel_name: str, session_name: str) -> int:
    """OWNER starts ``kernel_name`` for notebook ``session_name`` and is SIGKILLed: the pid
    of the remote kernel it leaves behind."""
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, kernel_name, session_name],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        pid = int(await asyncio.wait_for(asyncio.to_thread(owner.stdout.readline), 60))
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
    finally:
        if owner.poll() is None:
            owner.kill()
        owner.stdout.close()
    return pid


def kill_if_alive(pid: int) -> None:
    """A failed run must not leave a persistent kernel behind."""
    if pid_alive(pid):
        os.killpg(pid, signal.SIGKILL)


async def test_persistent_kernel_survives_owner_and_is_reattached(
    make_kernelspec, run_root
) -> None:
    persistent_spec(make_kernelspec, "ssh_persist", grace=2.0)
    pid = await orphaned_kernel("ssh_persist", "analysis.ipynb")
    try:
        await _reattach_and_check(pid, run_root)
    finally:
        kill_if_alive(pid)


async def _reattach_and_check(pid: int, run_root: Path) -> None:
    await asyncio.sleep(2.0 + 3)  # well past the grace period
    assert pid_alive(pid), "a persistent kernel was reaped with its owner"
    assert len(state.records()) == 1

    # A new "server" opens the same notebook: it gets the same kernel back, state intact.
    km = AsyncKernelManager(kernel_name="ssh_persist")
    await km.start_kernel(env={**os.environ, "JPY_SESSION_NAME": "analysis.ipynb"})
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        content, out = await run_cell(kc, "import os; print(x + 1, os.getpid())")
        assert content["status"] == "ok", content
        assert out.split() == ["42", str(pid)]
    finally:
        kc.stop_channels()
        await km.shutdown_kernel()
    # an explicit shutdown ends it for good
    assert wait_until(lambda: not pid_alive(pid), 10)
    assert state.records() == []
    assert wait_until(lambda: leftovers(run_root) == ([], []), 10), leftovers(run_root)


async def test_other_notebook_gets_a_fresh_kernel(make_kernelspec, run_root) -> None:
    persistent_spec(make_kernelspec, "ssh_persist2")
    km1 = AsyncKernelManager(kernel_name="ssh_persist2")
    await km1.start_kernel(env={**os.environ, "JPY_SESSION_NAME": "a.ipynb"})
    pid1 = km1.provisioner.remote_kernel.process.pid
    km2 = AsyncKernelManager(kernel_name="ssh_persist2")
    await km2.start_kernel(env={**os.environ, "JPY_SESSION_NAME": "b.ipynb"})
    try:
        assert km2.provisioner.remote_kernel.process.pid != pid1
        assert len(state.records()) == 2
    finally:
        await km1.shutdown_kernel()
        await km2.shutdown_kernel()
    assert state.records() == []
    assert wait_until(lambda: leftovers(run_root) == ([], []), 10), leftovers(run_root)


async def test_load_provisioner_info_takes_over_a_kernel(make_kernelspec, run_root) -> None:
    persistent_spec(make_kernelspec, "ssh_takeover", grace=30)
    km, kc = await start_manager("ssh_takeover")
    try:
        await run_cell(kc, "y = 'from the first manager'")
        info = await km.provisioner.get_provisioner_info()
        assert info["remote_kernel_id"] and info["ports"]

        # another manager (e.g. in another process) takes over from the saved info
        km2 = AsyncKernelManager(kernel_name="ssh_takeover")
        provisioner = KernelProvisionerFactory.instance().create_provisioner_instance(
            "other-id", km2.kernel_spec, parent=km2
        )
        await provisioner.load_provisioner_info(info)
        assert await provisioner.poll() is None
        conn = provisioner.connection_info
        assert conn["key"] == info["connection_info"]["key"]
        # the first manager still holds its endpoints (ipc: its socket dir; tcp: its ports)
        assert (conn["ip"], conn["shell_port"]) != (info["ip"], info["ports"]["shell"])
        km2.load_connection_info(conn)
        kc2 = km2.client()
        kc2.start_channels()
        try:
            await kc2.wait_for_ready(timeout=30)
            _, out = await run_cell(kc2, "print(y)")
            assert out.strip() == "from the first manager"
        finally:
            kc2.stop_channels()
            await provisioner.cleanup(restart=False)  # stops the kernel on purpose
        started = time.monotonic()
        while await km.provisioner.poll() is None and time.monotonic() - started < 10:
            await asyncio.sleep(0.1)
        assert await km.provisioner.poll() is not None  # the first manager sees it end
    finally:
        await stop_manager(km, kc)
    assert wait_until(lambda: leftovers(run_root) == ([], []), 10), leftovers(run_root)


async def test_attach_by_hand_after_the_owner_died(make_kernelspec, sshd, run_root, tmp_path):
    """`sshpyk attach` forwards an orphaned persistent kernel for `jupyter console --existing`."""
    persistent_spec(make_kernelspec, "ssh_handattach", grace=2.0)
    pid = await orphaned_kernel("ssh_handattach", "nb.ipynb")
    (record,) = state.records()
    (info,) = [json.loads(p.read_text()) for p in run_root.glob("sshpyk-*/sshpyk.json")]
    assert info["client"] == "provisioner"  # what `sshpyk ps` shows as its CLIENT
    connection_file = tmp_path / "attached.json"
    attach = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sshpyk.cli",
            "attach",
            sshd.alias,
            record["remote_kernel_id"][:8],
            "--ssh-config",
            str(sshd.ssh_config),
            "--remote-python",
            sys.executable,
            "--run-root",
            str(run_root),
            "--connection-file",
            str(connection_file),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = []
        while not any(line.startswith("Connection file:") for line in lines):
            line = await asyncio.wait_for(asyncio.to_thread(attach.stdout.readline), 60)
            assert line, attach.stderr.read()
            lines.append(line)
        assert stat_mode(connection_file) == 0o600
        from jupyter_client.asynchronous import AsyncKernelClient

        kc = AsyncKernelClient(connection_file=str(connection_file))
        kc.load_connection_file()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=30)
            _, out = await run_cell(kc, "import os; print(x, os.getpid())")
            assert out.split() == ["41", str(pid)]
            (info,) = [json.loads(p.read_text()) for p in run_root.glob("sshpyk-*/sshpyk.json")]
            assert info["client"] == "attach"
        finally:
            kc.stop_channels()
        attach.send_signal(signal.SIGINT)
        assert attach.wait(15) == 0
        assert "keeps running" in attach.stderr.read()
        assert not connection_file.exists()
        await asyncio.sleep(1)
        assert pid_alive(pid)  # detaching does not stop it
    finally:
        if attach.poll() is None:
            attach.kill()
        attach.stdout.close()
        attach.stderr.close()
        kill_if_alive(pid)


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777

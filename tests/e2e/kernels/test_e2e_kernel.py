"""End to end through a real OpenSSH sshd: AsyncKernelManager on an SSH kernelspec."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jupyter_client.manager import KernelManager

from support.kernels import interrupt_sleep, run_cell, start_manager, stop_manager
from support.waiting import leftovers, pid_alive, remote_processes, wait_until

pytestmark = pytest.mark.timeout(180)


async def test_execute_runs_remotely(make_kernelspec, no_leftovers) -> None:
    make_kernelspec("ssh_exec")
    km, kc = await start_manager("ssh_exec")
    try:
        content, out = await run_cell(
            kc, "import os; print(os.getpid()); print(os.environ.get('SSH_CONNECTION', ''))"
        )
        assert content["status"] == "ok"
        pid_line, ssh_connection = out.strip().splitlines()
        remote_pid = km.provisioner.remote_kernel.process.pid
        assert int(pid_line) == remote_pid
        assert int(pid_line) != os.getpid()
        assert ssh_connection.startswith("127.0.0.1 ")  # set by sshd for the session
        info = await km.provisioner.get_provisioner_info()
        assert info["remote_pid"] == remote_pid
    finally:
        await stop_manager(km, kc)
    no_leftovers()


@pytest.mark.parametrize("mode", ["signal", "message"])
async def test_interrupt(make_kernelspec, mode: str, no_leftovers) -> None:
    make_kernelspec(f"ssh_int_{mode}", interrupt_mode=mode)
    km, kc = await start_manager(f"ssh_int_{mode}")
    try:
        result, seconds = await interrupt_sleep(km, kc)
        assert result == "error/KeyboardInterrupt"
        assert seconds < 5
        _content, out = await run_cell(kc, "print('alive')")
        assert out.strip() == "alive"
    finally:
        await stop_manager(km, kc)
    no_leftovers()


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
async def test_restart_clears_state_keeps_ports(make_kernelspec, transport, no_leftovers) -> None:
    make_kernelspec("ssh_restart", transport=transport)
    km, kc = await start_manager("ssh_restart")
    try:
        await run_cell(kc, "x = 42")
        ports = km.get_connection_info()
        first_pid = km.provisioner.remote_kernel.process.pid
        assert km.provisioner.remote_kernel.process.transport == transport
        conn_before = km.provisioner.remote_kernel.session.shared.conn
        await km.restart_kernel()
        await kc.wait_for_ready(timeout=60)
        content, _ = await run_cell(kc, "x")
        assert content["status"] == "error" and content["ename"] == "NameError"
        after = km.get_connection_info()
        for channel in ("shell", "iopub", "stdin", "control", "hb"):
            assert after[f"{channel}_port"] == ports[f"{channel}_port"]
        assert km.provisioner.remote_kernel.process.pid != first_pid
        assert km.provisioner.remote_kernel.session.shared.conn is conn_before  # connection reused
        assert not remote_processes(f"{first_pid} ")  # (cheap sanity; real check below)
    finally:
        await stop_manager(km, kc)
    no_leftovers()


async def test_shutdown_leaves_nothing(make_kernelspec, run_root: Path) -> None:
    make_kernelspec("ssh_shutdown")
    km, kc = await start_manager("ssh_shutdown")
    process = km.provisioner.remote_kernel.process
    agent_pid = process.supervisor_pid
    assert agent_pid and Path(f"/proc/{agent_pid}").exists()
    run_dir = Path(process.run_dir)
    assert run_dir.parent == run_root
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((run_dir / "kernel.json").stat().st_mode) == 0o600
    # child processes of the kernel die with it (process group)
    _, out = await run_cell(
        kc, "import subprocess; p = subprocess.Popen(['sleep', '300']); print(p.pid)"
    )
    child_pid = int(out)
    await stop_manager(km, kc)
    # shutdown returned: the supervisor has already cleaned up, no waiting needed
    procs, files = leftovers(run_root)
    assert files == [] and not run_dir.exists()
    assert wait_until(lambda: not remote_processes(str(run_root)), 2), procs
    assert wait_until(lambda: not pid_alive(child_pid), 2)
    # the last kernel on the connection is gone: so are the connection and the agent
    assert wait_until(lambda: not pid_alive(agent_pid), 5)


async def test_crash_is_seen_by_poll(make_kernelspec, no_leftovers) -> None:
    make_kernelspec("ssh_crash")
    km, kc = await start_manager("ssh_crash")
    try:
        assert await km.provisioner.poll() is None
        kc.execute("import os; os._exit(7)")
        deadline = time.monotonic() + 10
        while await km.provisioner.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert await km.provisioner.poll() == 7
        assert not await km.is_alive()
    finally:
        await stop_manager(km, kc)
    no_leftovers()


async def test_two_kernels_share_one_connection(make_kernelspec, no_leftovers) -> None:
    make_kernelspec("ssh_a")
    make_kernelspec("ssh_b")
    (km1, kc1), (km2, kc2) = await asyncio.gather(start_manager("ssh_a"), start_manager("ssh_b"))
    try:
        code = "import os; print(os.environ['SSH_CONNECTION'])"
        _, conn1 = await run_cell(kc1, code)
        _, conn2 = await run_cell(kc2, code)
        # SSH_CONNECTION = client ip, client port, server ip, server port: same TCP connection
        assert conn1.split()[:2] == conn2.split()[:2]
        assert (
            km1.provisioner.remote_kernel.session.shared
            is km2.provisioner.remote_kernel.session.shared
        )
    finally:
        await asyncio.gather(stop_manager(km1, kc1), stop_manager(km2, kc2))
    no_leftovers()


async def test_hmac_key_never_in_ps_or_environment(make_kernelspec, no_leftovers) -> None:
    make_kernelspec("ssh_secret")
    km, kc = await start_manager("ssh_secret")
    try:
        key = km.session.key.decode()
        assert len(key) >= 16
        ps = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout
        assert key not in ps
        process = km.provisioner.remote_kernel.process
        for pid in (process.pid, process.supervisor_pid):
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            assert key.encode() not in environ and key.encode() not in cmdline
    finally:
        await stop_manager(km, kc)
    no_leftovers()


def test_blocking_kernel_manager_keeps_forwards_flowing(make_kernelspec, run_root) -> None:
    """`jupyter console` uses the blocking KernelManager: its loop stops between calls."""
    make_kernelspec("ssh_blocking")
    km = KernelManager(kernel_name="ssh_blocking")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        time.sleep(2)  # no loop runs in this thread now; the SSH loop thread still does
        reply = kc.execute_interactive("print(6 * 7)", timeout=30)
        assert reply["content"]["status"] == "ok"
        msg_id = kc.kernel_info()
        assert kc.get_shell_msg(timeout=10)["parent_header"]["msg_id"] == msg_id
        km.restart_kernel()
        kc.wait_for_ready(timeout=60)
        assert kc.execute_interactive("1", timeout=30)["content"]["status"] == "ok"
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
    assert wait_until(lambda: leftovers(run_root) == ([], []), 10), leftovers(run_root)


async def test_embedding_api(sshd, run_root, no_leftovers) -> None:
    from sshpyk import SSHSession

    async with await SSHSession.connect(sshd.alias, ssh_config=sshd.ssh_config) as session:
        kernel = await session.start_kernel(
            "python3", python=sys.executable, run_root=str(run_root)
        )
        async with kernel:
            client = kernel.client()
            client.start_channels()
            try:
                await client.wait_for_ready(timeout=60)
                reply = await client.execute_interactive("print('hi')", timeout=30)
                assert reply["content"]["status"] == "ok"
            finally:
                client.stop_channels()
        result = await session.run("echo $((6*7))")
        assert result.stdout.strip() == "42" and result.exit_status == 0
    no_leftovers()


async def test_embedding_client_liveness_is_the_process_not_the_heartbeat(
    sshd, run_root, no_leftovers
) -> None:
    """kernel.client()'s is_alive()/wait_for_ready() follow the remote process as the
    agent reports it: a heartbeat that never answers (here: its port points nowhere, as a
    heartbeat late by over 1 s on a loaded host looks to jupyter_client) is no death; an
    exit is one, without a heartbeat."""
    import socket

    from sshpyk import SSHSession

    async with await SSHSession.connect(sshd.alias, ssh_config=sshd.ssh_config) as session:
        kernel = await session.start_kernel(
            "python3", python=sys.executable, run_root=str(run_root)
        )
        async with kernel:
            client = kernel.client()
            with socket.socket() as unused:  # a port nobody listens on
                unused.bind(("127.0.0.1", 0))
                client.hb_port = unused.getsockname()[1]
            client.start_channels()
            try:
                await client.wait_for_ready(timeout=60)
                # the heartbeat's first 1 s (time_to_dead) counts as beating
                assert wait_until(lambda: not client.hb_channel.is_beating(), 10)
                assert await client.is_alive()
                reply = await client.execute_interactive("1+1", timeout=30)
                assert reply["content"]["status"] == "ok"
                client.execute("import os; os._exit(3)")
                deadline = time.monotonic() + 10
                while await client.is_alive() and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert not await client.is_alive() and kernel.poll() == 3
            finally:
                client.stop_channels()
    no_leftovers()

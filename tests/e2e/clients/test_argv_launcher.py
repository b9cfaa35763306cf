"""Clients that ignore the provisioner (VS Code, Zed, Positron) through a real sshd: a
raw client that does what they do. It writes a connection file with its own ports and
key, spawns the argv KernelSpecManager reports with ``{connection_file}`` substituted,
and drives a BlockingKernelClient on those ports (the kernel is :mod:`sshpyk.launch`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.kernelspec import KernelSpecManager

from support.broker import env_for, temp_broker_dir
from support.kernels import start_manager, stop_manager
from support.raw_client import CHANNELS, REPO, RawClient
from support.waiting import pid_alive, remote_processes, wait_until

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def raw_client(tmp_path: Path):
    clients: list[RawClient] = []

    def make(name: str, transport: str = "tcp") -> RawClient:
        client = RawClient(name, tmp_path, transport)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
        # the key never reaches a log or an argv
        assert client.key not in client.log()


def interrupt_sleep(raw: RawClient, interrupt: Any) -> str:
    """time.sleep(60), interrupted by ``interrupt()``; the reply's status/ename."""
    kc = raw.client
    assert kc is not None
    msg_id = kc.execute("import time; time.sleep(60)")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        msg = kc.get_iopub_msg(timeout=20)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "execute_input":
            break
    time.sleep(0.3)
    interrupt()
    while True:
        reply = kc.get_shell_msg(timeout=15)
        if reply["parent_header"].get("msg_id") == msg_id:
            break
    return f"{reply['content']['status']}/{reply['content'].get('ename', '')}"


def test_execute_runs_remotely_and_shutdown_ends_the_launcher(
    make_kernelspec, raw_client, run_root, no_leftovers
) -> None:
    make_kernelspec("ssh_argv_exec")
    raw = raw_client("ssh_argv_exec")
    raw.spawn()
    content, out = raw.execute(
        "import os; print(os.getpid()); print(os.environ.get('SSH_CONNECTION', ''))"
    )
    assert content["status"] == "ok"
    pid_line, ssh_connection = out.strip().splitlines()
    assert int(pid_line) != os.getpid()
    assert ssh_connection.startswith("127.0.0.1 ")  # set by sshd: the kernel runs over SSH
    (info,) = [json.loads(p.read_text()) for p in run_root.glob("sshpyk-*/sshpyk.json")]
    assert info["client"] == "argv"  # what `sshpyk ps` shows as its CLIENT
    assert raw.launcher is not None
    raw.client.shutdown()  # type: ignore[union-attr]
    started = time.monotonic()
    assert raw.wait_launcher(15) == 0
    assert time.monotonic() - started < 15
    assert not pid_alive(int(pid_line))
    log = raw.log()
    for stage in ("connected in", "listening on tcp 127.0.0.1", "closed in"):
        assert stage in log, log
    no_leftovers()


def test_an_ipc_connection_file_is_served_on_its_path_prefix(
    make_kernelspec, raw_client, no_leftovers
) -> None:
    make_kernelspec("ssh_argv_ipc")
    raw = raw_client("ssh_argv_ipc", transport="ipc")
    raw.spawn()
    sockets = [f"{raw.ip}-{raw.ports[c]}" for c in CHANNELS]
    assert all(Path(p).is_socket() for p in sockets), sockets
    assert raw.execute("print(6 * 7)")[1].strip() == "42"
    raw.client.shutdown()  # type: ignore[union-attr]
    assert raw.wait_launcher(15) == 0
    assert not [p for p in sockets if os.path.exists(p)]  # ours removed, the dir is the client's
    assert os.path.isdir(os.path.dirname(raw.ip))
    no_leftovers()


def test_interrupt_in_signal_mode_is_sigint_to_the_launcher(
    make_kernelspec, raw_client, no_leftovers
) -> None:
    make_kernelspec("ssh_argv_sig", interrupt_mode="signal")
    raw = raw_client("ssh_argv_sig")
    raw.spawn()
    assert raw.launcher is not None
    assert interrupt_sleep(raw, lambda: raw.launcher.send_signal(signal.SIGINT)) == (  # type: ignore[union-attr]
        "error/KeyboardInterrupt"
    )
    assert raw.execute("print(6 * 7)")[1].strip() == "42"  # the kernel lives on
    raw.launcher.send_signal(signal.SIGTERM)
    assert raw.wait_launcher(20) == 0
    no_leftovers()


def test_interrupt_in_message_mode_passes_through(
    make_kernelspec, raw_client, no_leftovers
) -> None:
    make_kernelspec("ssh_argv_msg", interrupt_mode="message")
    assert KernelSpecManager().get_kernel_spec("ssh_argv_msg").interrupt_mode == "message"
    raw = raw_client("ssh_argv_msg")
    raw.spawn()
    kc = raw.client
    assert kc is not None

    def interrupt_request() -> None:
        kc.control_channel.send(kc.session.msg("interrupt_request", content={}))

    assert interrupt_sleep(raw, interrupt_request) == "error/KeyboardInterrupt"
    assert raw.execute("print(6 * 7)")[1].strip() == "42"
    raw.client.shutdown()  # type: ignore[union-attr]
    assert raw.wait_launcher(15) == 0
    no_leftovers()


def test_restart_kill_and_respawn_on_the_same_ports(
    make_kernelspec, raw_client, no_leftovers
) -> None:
    make_kernelspec("ssh_argv_restart")
    raw = raw_client("ssh_argv_restart")
    raw.spawn()
    raw.execute("state = 42")
    first_pid, ports = raw.remote_pid(), dict(raw.ports)
    raw.stop_client()
    assert raw.launcher is not None
    raw.launcher.send_signal(signal.SIGTERM)  # VS Code's restart: kill, then spawn again
    assert raw.wait_launcher(20) == 0
    assert wait_until(lambda: not pid_alive(first_pid), 10)
    raw.spawn()
    assert raw.ports == ports
    content, _ = raw.execute("state")
    assert content["status"] == "error" and content["ename"] == "NameError"
    assert raw.remote_pid() != first_pid
    raw.client.shutdown()  # type: ignore[union-attr]
    assert raw.wait_launcher(15) == 0
    no_leftovers()


def test_sigkill_of_the_launcher_reaps_the_kernel_within_the_grace(
    make_kernelspec, tmp_path, no_leftovers
) -> None:
    """VS Code kills a kernel's launcher (-9): the connection broker, which outlives it,
    tells the agent, which stops the kernel after the short grace."""
    grace = 3.0
    make_kernelspec("ssh_argv_kill", grace_period=grace, link_grace=120.0)
    with temp_broker_dir() as bdir:
        raw = RawClient("ssh_argv_kill", tmp_path, env=env_for(bdir, 2.0))
        try:
            sigkill_the_launcher(raw, grace)
        finally:
            raw.close()
        assert raw.key not in raw.log()
    no_leftovers()


def sigkill_the_launcher(raw: RawClient, grace: float) -> None:
    raw.spawn()
    remote_pid = raw.remote_pid()
    raw.stop_client()
    assert raw.launcher is not None
    raw.launcher.kill()
    raw.wait_launcher(5)
    started = time.monotonic()
    # the grace, and the agent's check interval on top
    assert wait_until(lambda: not pid_alive(remote_pid), grace + 15)
    assert time.monotonic() - started < grace + 15


def test_kernel_manager_uses_the_provisioner_and_never_spawns_argv(
    make_kernelspec, isolated_jupyter, no_leftovers
) -> None:
    import asyncio

    make_kernelspec("ssh_argv_km")
    marker = str(isolated_jupyter / "kernels" / "ssh_argv_km")

    async def session() -> list[str]:
        km, kc = await start_manager("ssh_argv_km")
        try:
            reply = await kc.execute_interactive("1", timeout=30)
            assert reply["content"]["status"] == "ok"
            return remote_processes(marker)
        finally:
            await stop_manager(km, kc)

    assert asyncio.run(session()) == []  # the argv launcher did not run
    no_leftovers()


def _launch(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)


def _error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("sshpyk.launch:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_errors_are_one_line_and_a_nonzero_exit(make_kernelspec, tmp_path: Path) -> None:
    make_kernelspec("ssh_argv_err")
    raw = RawClient("ssh_argv_err", tmp_path)
    raw.write()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    argv = raw.argv()
    assert "cannot read connection file" in _error_line(_launch([*argv[:-1], str(bad)]))
    unknown = [sys.executable, "-m", "sshpyk.launch", "--kernel", "nope", raw.connection_file]
    assert "no kernel named 'nope'" in _error_line(_launch(unknown))
    make_kernelspec("ssh_argv_down", ssh_host_alias="sshpyk-no-such-host.invalid", start_timeout=10)
    down = RawClient("ssh_argv_down", tmp_path)
    down.write()
    started = time.monotonic()
    assert "sshpyk-no-such-host.invalid" in _error_line(_launch(down.argv()))
    assert time.monotonic() - started < 30

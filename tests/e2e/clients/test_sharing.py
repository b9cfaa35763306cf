"""One login per host for every local process (issue 22), as the product runs by default
(``connection_persist`` from the kernelspec; the suite's ``SSHPYK_SHARE_PERSIST=0`` is
taken out of these processes' environment): two argv launchers, as VS Code starts
them, and a Jupyter-like process with the provisioner share one TCP connection to sshd,
one login and one agent; the later ones join the agent (a warm start); each keeps to
its own kernel."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sshpyk.localfs import BROKER_DIR_ENV
from sshpyk.ssh.brokered import PERSIST_ENV

from support.broker import broker_alive, broker_pid, established, logins, temp_broker_dir
from support.raw_client import REPO, RawClient
from support.sshd import ThrowawaySSHD
from support.waiting import pid_alive, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

PERSIST = 3.0

#: a Jupyter-like process: AsyncKernelManager on the kernelspec (the provisioner), the
#: kernel's pid and its parent (the agent) once ready, then "quit" on stdin
PROVISIONED = r"""
import asyncio, json, sys
from jupyter_client.manager import AsyncKernelManager

async def main(name):
    km = AsyncKernelManager(kernel_name=name)
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=90)
    out = []
    hook = lambda m: out.append(m["content"]["text"]) if m["msg_type"] == "stream" else None
    await kc.execute_interactive("import os; print(os.getpid(), os.getppid())",
                                 output_hook=hook, timeout=30)
    pid, parent = map(int, "".join(out).split())
    print(json.dumps({"pid": pid, "parent": parent}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    kc.stop_channels()
    await km.shutdown_kernel()
    print(json.dumps({"bye": True}), flush=True)

asyncio.run(main(sys.argv[1]))
"""


def sharing_env(broker_dir: Path) -> dict[str, str]:
    """This environment, with the kernelspec's connection_persist in charge."""
    env = {**os.environ, BROKER_DIR_ENV: str(broker_dir), "PYTHONPATH": str(REPO)}
    env.pop(PERSIST_ENV, None)
    return env


def read_report(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # bounded
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = proc.stdout.readline()
        if line.startswith("{"):
            return dict(json.loads(line))
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"no report from pid {proc.pid} within {timeout:g}s")


def test_launchers_and_a_provisioner_share_one_login_and_one_agent(
    own_sshd: ThrowawaySSHD, make_kernelspec: Any, tmp_path: Path, run_root: Path, no_leftovers
) -> None:
    make_kernelspec(
        "ssh_share",
        ssh_host_alias=own_sshd.alias,
        ssh_config=str(own_sshd.ssh_config),
        connection_persist=PERSIST,
        link_grace=120.0,  # a failed run leaves nothing for long
    )
    before = logins(own_sshd.log_file)
    with temp_broker_dir() as bdir:
        env = sharing_env(bdir)
        first = RawClient("ssh_share", tmp_path, env=env)
        second = RawClient("ssh_share", tmp_path, env=env)
        third: subprocess.Popen[str] | None = None
        try:
            started = time.monotonic()
            first.spawn()
            first_start = time.monotonic() - started
            started = time.monotonic()
            second.spawn()
            second_start = time.monotonic() - started
            third = subprocess.Popen(
                [sys.executable, "-c", PROVISIONED, "ssh_share"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            provisioned = read_report(third, 120)
            kernels = []
            for raw in (first, second):
                pid, parent = map(
                    int, raw.execute("import os; print(os.getpid(), os.getppid())")[1].split()
                )
                kernels.append((pid, parent))
            kernels.append((provisioned["pid"], provisioned["parent"]))
            assert len({pid for pid, _ in kernels}) == 3, kernels
            assert len({parent for _, parent in kernels}) == 1, f"several agents: {kernels}"
            assert established(own_sshd.port) == 1  # the broker's, for all three
            assert logins(own_sshd.log_file) - before == 1
            assert "joined the agent" in second.log(), second.log()
            print(f"first start {first_start:.2f} s, second (joins) {second_start:.2f} s")
            # each keeps to its own: the first launcher's kernel goes, the others stay
            assert first.client is not None
            first.client.shutdown()
            assert first.wait_launcher(30) == 0
            assert wait_until(lambda: not pid_alive(kernels[0][0]), 15)
            assert pid_alive(kernels[1][0]) and pid_alive(kernels[2][0])
            assert second.execute("print(6 * 7)")[1].strip() == "42"
            assert third.stdin is not None
            third.stdin.write("quit\n")
            third.stdin.flush()
            assert read_report(third, 60) == {"bye": True}
            assert third.wait(30) == 0
            assert pid_alive(kernels[1][0])
            second.stop_client()
        finally:
            for raw in (first, second):
                raw.close()
            if third is not None:
                if third.poll() is None:
                    third.kill()
                    third.wait(10)
                for stream in (third.stdin, third.stdout):
                    if stream is not None:
                        stream.close()
        pid = broker_pid(bdir)
        # the last user left: the connection goes after the persist time, then the broker
        assert wait_until(lambda: established(own_sshd.port) == 0, PERSIST + 15)
        assert wait_until(lambda: not broker_alive(bdir), 20), pid
    no_leftovers()


async def test_the_broker_killed_mid_cell_loses_nothing(
    own_sshd: ThrowawaySSHD, run_root: Path, monkeypatch: pytest.MonkeyPatch, no_leftovers
) -> None:
    """kill -9 of the connection broker (the connection owner) while a cell prints 24
    lines: the process reconnects through a new broker and reattaches; every line
    arrives once, then the reply; the same kernel, its state intact."""
    from sshpyk import SSHSession
    from sshpyk.kernels.kernel import KernelOptions

    with temp_broker_dir() as bdir:
        monkeypatch.setenv(BROKER_DIR_ENV, str(bdir))
        monkeypatch.setenv(PERSIST_ENV, "2")
        options = KernelOptions(python=sys.executable, run_root=str(run_root))
        connect = SSHSession.connect(own_sshd.alias, ssh_config=own_sshd.ssh_config)
        async with await connect as session:
            kernel = await session.start_kernel(options=options)
            async with kernel:
                assert kernel.process is not None
                pid, first_broker = kernel.process.pid, broker_pid(bdir)
                assert first_broker is not None
                kc = kernel.client()
                kc.start_channels()
                try:
                    await kc.wait_for_ready(timeout=60)
                    out: list[str] = []

                    def hook(msg: dict[str, Any]) -> None:
                        if msg["msg_type"] == "stream":
                            out.append(msg["content"]["text"])

                    code = "import time\nfor i in range(24):\n    print(f'line {i}', flush=True)\n"
                    code += "    time.sleep(0.25)\ny = 42\n"
                    run = asyncio.ensure_future(
                        kc.execute_interactive(code, output_hook=hook, timeout=90)
                    )
                    await asyncio.sleep(1.5)
                    os.kill(first_broker, signal.SIGKILL)
                    reply = await asyncio.wait_for(run, 100)
                    assert reply["content"]["status"] == "ok"
                    lines = "".join(out).splitlines()
                    assert lines == [f"line {i}" for i in range(24)], lines
                    check = await kc.execute_interactive(
                        "import os; print(y, os.getpid())", output_hook=hook, timeout=30
                    )
                    assert check["content"]["status"] == "ok"
                    assert "".join(out).split()[-2:] == ["42", str(pid)]
                    assert kernel.process.pid == pid
                    second_broker = broker_pid(bdir)
                    assert second_broker not in (None, first_broker)
                    print(f"broker {first_broker} killed; reattached through {second_broker}")
                finally:
                    kc.stop_channels()
    no_leftovers()

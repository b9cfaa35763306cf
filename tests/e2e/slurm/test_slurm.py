"""The SLURM launcher against a real single-node SLURM (tests/support/slurm.py) behind the real
sshd: the host alias is the login node, each kernel a job that srun starts on the node.

Proves: the kernel runs inside the job (SLURM_JOB_ID in its environment), execute,
interrupt and restart work through AsyncKernelManager, shutdown and failures leave the
queue empty, a lost client (SIGKILLed owner, short grace) and a SIGKILLed agent leave no
job, a pending job (node drained) times out with a clear one-line message after logging
its queue state, the walltime warning, and add/check/list/ps/kill for SLURM kernels.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sshpyk import (
    KernelOptions,
    KernelStartError,
    KernelStartTimeoutError,
    RemoteKernel,
    SSHSession,
)
from sshpyk.kernelspec import SSHKernelSpec, kernels_dir, load_spec

from support.broker import env_for, temp_broker_dir
from support.cli import add_args, assert_one_line_error, sshpyk
from support.kernels import interrupt_sleep, run_cell, start_manager, stop_manager
from support.slurm import ThrowawaySlurm, slurm_missing
from support.waiting import leftovers, wait_until

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThrowawaySlurm]:
    why = slurm_missing()
    if why:
        pytest.skip(why)
    server = ThrowawaySlurm(tmp_path_factory.mktemp("slurm"))
    try:
        server.start()
    except RuntimeError as exc:
        server.stop()
        pytest.skip(f"the throwaway SLURM cluster did not start: {exc}")
    yield server
    server.stop()


@pytest.fixture
def slurm(cluster: ThrowawaySlurm) -> Iterator[ThrowawaySlurm]:
    """The cluster with its node up and an empty queue, before and after the test."""
    if cluster.node_state().startswith(("drain", "drng", "down")):
        cluster.resume()
    # (sinfo may still say "mix" just after a job was cancelled: only a drain needs this)
    assert wait_until(lambda: cluster.jobs() == [], 15), cluster.jobs()
    yield cluster
    left = cluster.jobs()
    cluster.run("scancel", f"--user={os.getuid()}")  # keep the next tests clean either way
    assert left == [] or wait_until(lambda: cluster.jobs() == [], 1), f"jobs left: {left}"


@pytest.fixture
def slurm_spec(
    make_kernelspec: Callable[..., SSHKernelSpec], slurm: ThrowawaySlurm
) -> Callable[..., SSHKernelSpec]:
    """An SSH kernelspec with the SLURM launcher on the test cluster; ``provisioner``
    sets provisioner options that are not kernelspec fields (straight into kernel.json)."""

    def make(
        name: str = "ssh_slurm", provisioner: dict[str, Any] | None = None, **fields: Any
    ) -> SSHKernelSpec:
        settings: dict[str, Any] = {
            "launcher": "slurm",
            "pre_command": slurm.pre_command,
            "slurm_args": "--time=10",
        }
        settings.update(fields)
        spec = make_kernelspec(name, **settings)
        if provisioner:
            path = Path(kernels_dir()) / name / "kernel.json"
            data = json.loads(path.read_text())
            data["metadata"]["kernel_provisioner"]["config"].update(provisioner)
            path.write_text(json.dumps(data))
        return spec

    return make


def slurm_options(slurm: ThrowawaySlurm, run_root: Path, **overrides: Any) -> KernelOptions:
    fields: dict[str, Any] = {
        "python": sys.executable,
        "pre_command": slurm.pre_command,
        "run_root": str(run_root),
        "launcher": "slurm",
        "slurm_args": ["--time=10"],
    }
    fields.update(overrides)
    return KernelOptions(**fields)


# -- the kernel in a job, end to end through AsyncKernelManager ---------------------------


async def test_kernel_runs_in_a_slurm_job(
    slurm: ThrowawaySlurm, slurm_spec: Any, no_leftovers: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    slurm_spec("ssh_slurm")
    started = time.monotonic()
    km, kc = await start_manager("ssh_slurm")
    start_seconds = time.monotonic() - started
    try:
        (job,) = slurm.jobs()
        assert job["state"] == "RUNNING" and job["node"] == slurm.node
        _, out = await run_cell(
            kc,
            "import os; print(os.environ['SLURM_JOB_ID'], os.environ['SLURMD_NODENAME'], "
            "os.getppid() == int(os.environ['JPY_PARENT_PID']))",
        )
        assert out.split() == [job["job_id"], slurm.node, "True"]
        assert f"SLURM job {job['job_id']} running on {slurm.node}" in caplog.text
        assert f"SLURM job {job['job_id']} RUNNING on {slurm.node}" in caplog.text  # ready line

        status, seconds = await interrupt_sleep(km, kc)
        assert status == "error/KeyboardInterrupt", status
        assert seconds < 5
        _, out = await run_cell(kc, "print(6 * 7)")
        assert out.strip() == "42"  # the kernel survived the interrupt
        (same,) = slurm.jobs()
        assert same["job_id"] == job["job_id"]

        await km.restart_kernel()
        await kc.wait_for_ready(timeout=60)
        (new_job,) = slurm.jobs()  # a new step in the same allocation: no queueing
        assert new_job["job_id"] == job["job_id"]
        assert f"SLURM job {job['job_id']} restarted in the same allocation" in caplog.text
        _, out = await run_cell(kc, "import os; print(os.environ['SLURM_JOB_ID'])")
        assert out.strip() == new_job["job_id"]
    finally:
        await stop_manager(km, kc)
    assert slurm.jobs() == []  # gone when shutdown returns, not some time later
    no_leftovers()
    assert start_seconds < 30


async def test_shutdown_now_and_the_session_api(
    sshd: Any, slurm: ThrowawaySlurm, run_root: Path, no_leftovers: Any
) -> None:
    """RemoteKernel directly: close() while the kernel runs leaves no job and no run dir."""
    async with await SSHSession.connect(sshd.alias, ssh_config=sshd.ssh_config) as session:
        kernel = await session.start_kernel(options=slurm_options(slurm, run_root))
        process = kernel.process
        assert process is not None and process.launcher == "slurm"
        assert process.details["node"] == slurm.node and process.host
        assert [j["job_id"] for j in slurm.jobs()] == [process.details["job_id"]]
        started = time.monotonic()
        await kernel.close()
        assert time.monotonic() - started < 10
        assert slurm.jobs() == []
    no_leftovers()


# -- the relay: nothing of the kernel on the cluster network -----------------------------


def socket_inodes(pids: list[int]) -> set[str]:
    """The inodes of the sockets these processes hold open."""
    inodes = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def listeners(pids: list[int]) -> dict[str, list[str]]:
    """What these processes listen on: {"tcp": ["127.0.0.1:port", ...], "tcp6": [...],
    "unix": [path, ...]}, from /proc/net (the node is this host)."""
    inodes = socket_inodes(pids)
    found: dict[str, list[str]] = {"tcp": [], "tcp6": [], "unix": []}
    for proto in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{proto}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                address, port = fields[1].split(":")
                if proto == "tcp":
                    host = ".".join(str(b) for b in reversed(bytes.fromhex(address)))
                else:
                    host = address
                found[proto].append(f"{host}:{int(port, 16)}")
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        # flags __SO_ACCEPTCON (listening), then the inode and the path (if any)
        if len(fields) >= 7 and int(fields[3], 16) & 0x10000 and fields[6] in inodes:
            found["unix"].append(fields[7] if len(fields) > 7 else "")
    return found


def process_group(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(") ", 1)[1].split()[2]) == pgid:
                pids.append(int(entry))
    return pids


def parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[1])


@pytest.mark.parametrize("transport", ["auto", "tcp"])
async def test_no_kernel_socket_on_the_cluster_network(
    sshd: Any, slurm: ThrowawaySlurm, transport: str
) -> None:
    """While a SLURM kernel runs, neither the kernel (its whole process group) nor the
    node side nor the agent listens on any address but 127.0.0.1: ipykernel on ipc in the
    node's run dir ("auto", with a run root short enough for unix sockets) or on
    127.0.0.1 ("tcp"); the node side's relay listener is closed once the agent's one
    authenticated connection is made (before "ready"); the login node's relay sockets
    are unix sockets in the kernel's 0700 run dir. Through the relay: execute, two
    clients at once (several connections per channel), 20 MB of output, and a clean
    shutdown."""
    run_root = Path(tempfile.mkdtemp(prefix="spk-", dir="/tmp"))  # short: ipc fits
    try:
        options = slurm_options(slurm, run_root, transport=transport)
        async with await SSHSession.connect(sshd.alias, ssh_config=sshd.ssh_config) as session:
            kernel = await session.start_kernel(options=options)
            try:
                process = kernel.process
                assert process is not None and process.transport == "ipc"
                node_pid = int(process.details["node_pid"])
                kernel_pids = process_group(node_pid)
                assert node_pid in kernel_pids
                node_side = parent_pid(node_pid)  # run_node, the kernel's JPY_PARENT_PID
                agent = process.agent.pid
                assert agent is not None
                kernel_listens = listeners(kernel_pids)
                others = listeners([node_side, agent])
                assert others["tcp"] == others["tcp6"] == [], others
                assert kernel_listens["tcp6"] == [], kernel_listens
                loopback = [a for a in kernel_listens["tcp"] if a.startswith("127.0.0.1:")]
                assert loopback == kernel_listens["tcp"], kernel_listens
                if process.details["node_transport"] == "ipc":
                    assert transport == "auto"
                    assert len(kernel_listens["unix"]) == 5, kernel_listens
                else:
                    assert transport == "tcp"
                    # the five channels (ipykernel's debugger adds one more on 127.0.0.1)
                    assert len(kernel_listens["tcp"]) >= 5, kernel_listens
                # the agent's relay sockets: the five endpoints the local side forwards to
                assert set(process.endpoints.values()) <= set(others["unix"]), others
                relay_dir = os.path.dirname(process.endpoints["hb"])
                assert os.stat(relay_dir).st_mode & 0o777 == 0o700

                kc, kc2 = kernel.client(), kernel.client()
                kc.start_channels()
                kc2.start_channels()
                try:
                    await kc.wait_for_ready(timeout=60)
                    await kc2.wait_for_ready(timeout=60)
                    _, out = await run_cell(
                        kc, "import os; x = os.environ['SLURM_JOB_ID']; print(x)"
                    )
                    assert out.strip() == process.details["job_id"]
                    _, out = await run_cell(kc2, "print(x)")  # the same kernel, another client
                    assert out.strip() == process.details["job_id"]
                    size = 20 * 1000 * 1000
                    started = time.monotonic()
                    _, out = await run_cell(
                        kc, f"import sys; sys.stdout.write('x' * {size}); sys.stdout.flush()"
                    )
                    assert len(out) == size and set(out) == {"x"}
                    assert time.monotonic() - started < 60
                    _, out = await run_cell(kc2, "print(6 * 7)")
                    assert out.strip() == "42"
                finally:
                    kc.stop_channels()
                    kc2.stop_channels()
            finally:
                await kernel.close()
        assert slurm.jobs() == []
        assert wait_until(lambda: leftovers(run_root) == ([], []), 10), leftovers(run_root)
    finally:
        shutil.rmtree(run_root, ignore_errors=True)


async def test_relay_listener_takes_one_authenticated_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The node side's relay listener: a client that does not answer, one that answers
    garbage and one with a wrong secret are each closed without a byte relayed; the
    first that proves the secret gets the connection (TCP_NODELAY), the listener is
    closed right after, and the login side checks the node's proof too."""
    import socket
    import threading

    from sshpyk.agent.remote import relay

    monkeypatch.setattr(relay, "RELAY_AUTH_TIMEOUT", 0.5)  # the silent client's turn
    secret = os.urandom(32)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    accepting = asyncio.ensure_future(relay.relay_accept(listener, secret, time.monotonic() + 20))

    def silent() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            assert client.recv(100).startswith(relay.RELAY_MAGIC)  # the challenge
            assert client.recv(100) == b""  # closed after RELAY_AUTH_TIMEOUT

    def garbage() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            client.recv(100)
            client.sendall(b"x" * 64)
            assert client.recv(100) == b""

    try:
        await asyncio.to_thread(silent)
        await asyncio.to_thread(garbage)
        with pytest.raises((OSError, ValueError)):
            await relay.relay_connect("127.0.0.1", port, os.urandom(32))
        assert not accepting.done()
        sock = await relay.relay_connect("127.0.0.1", port, secret)
        conn = await asyncio.wait_for(accepting, 10)
        assert conn is not None and listener.fileno() == -1  # closed
        assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
        conn.setblocking(True)
        sock.setblocking(True)
        conn.sendall(b"ping")
        assert sock.recv(4) == b"ping"
        sock.close()
        conn.close()
    finally:
        accepting.cancel()
        listener.close()

    # and the login side refuses a node side that does not know the secret
    impostor = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    impostor.bind(("127.0.0.1", 0))
    impostor.listen(1)

    def fake_node() -> None:
        conn, _ = impostor.accept()
        conn.sendall(relay.RELAY_MAGIC + os.urandom(32))
        conn.recv(64)
        conn.sendall(os.urandom(32))
        conn.close()

    faking = threading.Thread(target=fake_node)
    faking.start()
    try:
        with pytest.raises(ValueError):
            await relay.relay_connect("127.0.0.1", impostor.getsockname()[1], secret)
    finally:
        faking.join(10)
        impostor.close()


async def test_persistent_slurm_kernel_is_reattached(
    sshd: Any, slurm: ThrowawaySlurm, run_root: Path, no_leftovers: Any
) -> None:
    """A persistent SLURM kernel outlives its local side; a new session reattaches to it
    (the forwards find the node again from the agent's state) and then ends the job."""
    options = slurm_options(slurm, run_root, persistent=True)
    async with await SSHSession.connect(sshd.alias, ssh_config=sshd.ssh_config) as session:
        kernel = await session.start_kernel(options=options)
        assert kernel.process is not None
        kernel_id, job_id = kernel.kernel_id, kernel.process.details["job_id"]
        kc = kernel.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=60)
            await run_cell(kc, "x = 41")
        finally:
            kc.stop_channels()
        await kernel.detach()
    assert [j["job_id"] for j in slurm.jobs()] == [job_id]  # kept: it is persistent
    async with await SSHSession.connect(sshd.alias, ssh_config=sshd.ssh_config) as session:
        kernel = await RemoteKernel.attach(session, kernel_id, options)
        assert kernel.process is not None and kernel.process.launcher == "slurm"
        assert kernel.process.details["job_id"] == job_id
        kc = kernel.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=60)
            _, out = await run_cell(kc, "import os; print(x + 1, os.environ['SLURM_JOB_ID'])")
            assert out.split() == ["42", job_id]
        finally:
            kc.stop_channels()
        await kernel.close()
    assert slurm.jobs() == []
    no_leftovers()


# -- failures: nothing is left running ----------------------------------------------------


async def test_pending_job_times_out_with_a_clear_message(
    sshd: Any,
    slurm: ThrowawaySlurm,
    slurm_spec: Any,
    no_leftovers: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Node drained: the job pends; its state is logged (refreshed) and it is cancelled
    after the queue timeout with one clear line."""
    caplog.set_level(logging.INFO)
    slurm_spec(
        "ssh_slurm_pending",
        slurm_queue_timeout=4.0,
        provisioner={"slurm_status_interval": 1.0},
    )
    slurm.drain("test")
    started = time.monotonic()
    try:
        with pytest.raises(KernelStartTimeoutError) as raised:
            await start_manager("ssh_slurm_pending")
        elapsed = time.monotonic() - started
        assert slurm.jobs() == []  # cancelled before the error was raised
    finally:
        slurm.resume()
    message = str(raised.value)
    assert "\n" not in message
    # SLURM's own words for the reason (its description of ReqNodeNotAvail)
    match = re.search(r"SLURM job (\d+) was still pending after 4s \(reason: ([^)]+)\)", message)
    assert match, message
    reason = match.group(2)
    assert "DRAINED" in reason or "ReqNodeNotAvail" in reason, reason
    assert message.endswith(
        f", so it was cancelled: raise --slurm-queue-timeout, or see `sinfo` on '{sshd.alias}'"
    )
    assert 4 <= elapsed < 20, elapsed
    job_id = match.group(1)
    pending = [r.getMessage() for r in caplog.records if "pending for" in r.getMessage()]
    assert len(pending) >= 2, caplog.text  # refreshed while it waits
    assert all(f"SLURM job {job_id} pending" in line for line in pending), pending
    assert all("(reason: " in line for line in pending), pending
    assert pending[-1].endswith(f"(reason: {reason})"), pending  # as SLURM put it last
    records = [r for r in caplog.records if "pending for" in r.getMessage()]
    assert all(r.levelno == logging.INFO for r in records)
    # through the provisioner's self.log (Jupyter's log), not sshpyk's module logger
    assert {r.name for r in records} == {logging.getLogger("traitlets").name}, records
    no_leftovers()


async def test_bad_slurm_arguments_fail_fast(
    sshd: Any, slurm: ThrowawaySlurm, run_root: Path, no_leftovers: Any
) -> None:
    """srun refuses the job: the start fails at once with srun's own words."""
    options = slurm_options(slurm, run_root, slurm_args=["--partition=nosuchpartition"])
    started = time.monotonic()
    async with await SSHSession.connect(sshd.alias, ssh_config=sshd.ssh_config) as session:
        with pytest.raises(KernelStartError) as raised:
            await session.start_kernel(options=options)
    assert time.monotonic() - started < 15
    message = str(raised.value)
    assert "ended before the kernel ran" in message and "\n" not in message
    assert "invalid partition" in message.lower(), message
    assert slurm.jobs() == []
    no_leftovers()


async def test_sigkilled_agent_ends_the_job(
    sshd: Any, slurm: ThrowawaySlurm, run_root: Path, no_leftovers: Any
) -> None:
    """The agent dies without cleaning up: srun's stdin ends, the node side stops the
    kernel and removes its run dir, and the job ends: no job outlives its agent. The
    agent's own run dir on the login node stays, as for a direct kernel, until
    `sshpyk kill --orphans`."""
    async with await SSHSession.connect(sshd.alias, ssh_config=sshd.ssh_config) as session:
        kernel = await session.start_kernel(options=slurm_options(slurm, run_root))
        assert kernel.process is not None
        agent_pid = kernel.process.agent.pid
        assert agent_pid and slurm.jobs()
        os.kill(agent_pid, signal.SIGKILL)
        assert wait_until(lambda: slurm.jobs() == [], 15), slurm.jobs()
        assert await asyncio.wait_for(kernel.wait(), 10) is not None
        await kernel.close()
    assert wait_until(lambda: leftovers(run_root)[0] == [], 10), leftovers(run_root)
    (login_dir,) = run_root.iterdir()  # the node's run dir is gone, with its key
    relay = {f"k-{n}" for n in range(1, 6)} | {"r"}  # relay sockets (nobody listens now)
    names = {p.name for p in login_dir.iterdir()} - {"activity"}  # idle.py's, once seen
    assert names == {"srun.log", "sshpyk.json"} | relay
    result = await asyncio.to_thread(
        sshpyk,
        "kill",
        sshd.alias,
        "--orphans",
        "-y",
        "--ssh-config",
        str(sshd.ssh_config),
        "--run-root",
        str(run_root),
    )
    assert result.exit_code == 0, result.output
    no_leftovers()


OWNER = textwrap.dedent(
    """
    import asyncio, sys
    from jupyter_client.manager import AsyncKernelManager

    async def main(name):
        km = AsyncKernelManager(kernel_name=name)
        await km.start_kernel()
        kernel = km.provisioner.remote_kernel
        print(kernel.kernel_id, kernel.process.details["job_id"], flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await km.shutdown_kernel(now=True)

    asyncio.run(main(sys.argv[1]))
    """
)


class SlurmOwner:
    """Another local process holding a SLURM kernel through AsyncKernelManager."""

    def __init__(self, kernel_name: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", OWNER, kernel_name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=os.environ.copy() if env is None else env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.stop()
            raise AssertionError(f"the owner did not start a kernel: {self.proc.stderr}")
        self.kernel_id, self.job_id = line.split()

    def sigkill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None and not stream.closed:
                stream.close()


@pytest.mark.slow
def test_lost_client_leaves_no_job(slurm: ThrowawaySlurm, slurm_spec: Any, run_root: Path) -> None:
    """The process holding the kernel is SIGKILLed; the connection broker, which
    outlives it, tells the agent: after the grace period the agent cancels the job. The
    grace period counts from the last message the agent heard (a ping, every
    ``heartbeat`` seconds: RemoteAgent.start), so the job may go as early as
    ``grace - heartbeat`` after the SIGKILL, never earlier."""
    grace = 3.0
    heartbeat = max(0.5, min(5.0, grace / 4))  # sshpyk.remote's interval for this grace
    slurm_spec("ssh_slurm_owner", grace_period=grace)
    with temp_broker_dir() as bdir:
        lost_client_leaves_no_job(slurm, run_root, env_for(bdir, 2.0), grace, heartbeat)


def lost_client_leaves_no_job(
    slurm: ThrowawaySlurm, run_root: Path, env: dict[str, str], grace: float, heartbeat: float
) -> None:
    owner = SlurmOwner("ssh_slurm_owner", env)
    try:
        assert [j["job_id"] for j in slurm.jobs()] == [owner.job_id]
        owner.sigkill()
        killed = time.monotonic()
        assert wait_until(lambda: slurm.jobs() == [], grace + 20), slurm.jobs()
        # kept for the grace period since the last ping (0.1 s: wait_until's polling)
        assert time.monotonic() - killed >= grace - heartbeat - 0.1
        assert wait_until(lambda: leftovers(run_root) == ([], []), 10), leftovers(run_root)
    finally:
        owner.stop()


async def test_walltime_warning_is_logged(
    sshd: Any, slurm: ThrowawaySlurm, run_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sshpyk")
    options = slurm_options(slurm, run_root, slurm_args=["--time=1"], slurm_walltime_warning=57)
    async with await SSHSession.connect(sshd.alias, ssh_config=sshd.ssh_config) as session:
        kernel = await session.start_kernel(options=options)
        try:
            assert kernel.process is not None
            job_id = kernel.process.details["job_id"]

            def warned() -> bool:
                return any(
                    r.levelno == logging.WARNING and "reaches its time limit in" in r.message
                    for r in caplog.records
                )

            deadline = time.monotonic() + 20
            while not warned() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert warned(), caplog.text
            (line,) = [r.message for r in caplog.records if "time limit" in r.message]
            assert f"SLURM job {job_id} on {slurm.node} reaches its time limit in " in line
            assert kernel.process.details["time_left"] <= 57
        finally:
            await kernel.close()
    assert slurm.jobs() == []


# -- the CLI ------------------------------------------------------------------------------


def slurm_add_args(sshd: Any, slurm: ThrowawaySlurm, name: str, *extra: str) -> list[str]:
    return add_args(sshd, name, "--pre-command", slurm.pre_command, "--launcher", "slurm", *extra)


def test_add_checks_srun_accepts_the_arguments(sshd: Any, slurm: ThrowawaySlurm) -> None:
    args = "--partition=debug --time=04:00:00"
    result = sshpyk(*slurm_add_args(sshd, slurm, "ssh_slurm_cli", "--slurm-args", args))
    assert result.exit_code == 0, result.output
    spec = load_spec("ssh_slurm_cli")
    assert (spec.launcher, spec.slurm_args) == ("slurm", args)
    assert (spec.slurm_queue_timeout, spec.slurm_walltime_warning) == (600.0, 300.0)
    data = json.loads((Path(spec.resource_dir or "") / "kernel.json").read_text())
    config = data["metadata"]["kernel_provisioner"]["config"]
    assert config["launcher"] == "slurm" and config["slurm_args"] == args
    assert slurm.jobs() == []  # srun --test-only submits nothing


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--slurm-args", "--partition=nosuchpartition"], ("srun rejects", "Invalid partition")),
        (["--slurm-args", "--output=/tmp/x"], ("--output is set by sshpyk",)),
        (["--slurm-args", "--time='1"], ("No closing quotation",)),
        (["--slurm-queue-timeout", "0"], ("SLURM queue timeout must be a positive",)),
    ],
)
def test_add_refuses_bad_slurm_settings(
    sshd: Any, slurm: ThrowawaySlurm, extra: list[str], fragments: tuple[str, ...]
) -> None:
    result = sshpyk(*slurm_add_args(sshd, slurm, "ssh_slurm_bad", *extra))
    assert_one_line_error(result, *fragments)
    assert not (Path(kernels_dir()) / "ssh_slurm_bad").exists()


def test_direct_kernelspec_json_has_no_slurm_keys(make_kernelspec: Any) -> None:
    spec = make_kernelspec("ssh_plain")
    data = json.loads((Path(spec.resource_dir) / "kernel.json").read_text())
    config = data["metadata"]["kernel_provisioner"]["config"]
    assert not [k for k in config if k == "launcher" or k.startswith("slurm_")], config


def test_edit_switches_launcher_and_clears_slurm_args(
    make_kernelspec: Any, slurm: ThrowawaySlurm
) -> None:
    make_kernelspec("ssh_edit_slurm", pre_command=slurm.pre_command)
    result = sshpyk(
        "edit", "ssh_edit_slurm", "--launcher", "slurm", "--slurm-args", "--time=5"
    )  # checked against the host: srun --test-only accepts it
    assert result.exit_code == 0, result.output
    assert "launcher: 'direct' -> 'slurm'" in result.stdout
    spec = load_spec("ssh_edit_slurm")
    assert (spec.launcher, spec.slurm_args) == ("slurm", "--time=5")
    result = sshpyk("edit", "ssh_edit_slurm", "-n", "--slurm-args", "")
    assert result.exit_code == 0, result.output
    assert load_spec("ssh_edit_slurm").slurm_args == ""
    # the forwards reach the relay's unix sockets on the login node whatever the node binds
    result = sshpyk("edit", "ssh_edit_slurm", "-n", "--transport", "ipc")
    assert result.exit_code == 0, result.output
    assert load_spec("ssh_edit_slurm").transport == "ipc"


def test_check_runs_a_real_job(slurm: ThrowawaySlurm, slurm_spec: Any, no_leftovers: Any) -> None:
    slurm_spec("ssh_slurm_check")
    result = sshpyk("check", "ssh_slurm_check")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    (slurm_line,) = [line for line in lines if "SLURM (login node)" in line]
    assert slurm_line.startswith("(v) ") and " 22.05" in slurm_line, slurm_line
    assert "partitions: debug* up (1 idle)" in slurm_line and "to start at" in slurm_line
    (kernel_line,) = [line for line in lines if "test kernel" in line]
    assert re.search(rf"SLURM job \d+ RUNNING on {slurm.node} ", kernel_line), kernel_line
    assert "answered kernel_info" in kernel_line
    assert [line.split()[1] for line in lines[1:-1]][-2:] == ["SLURM", "test"]
    assert slurm.jobs() == []
    no_leftovers()


def test_check_fails_at_the_slurm_stage(slurm: ThrowawaySlurm, slurm_spec: Any) -> None:
    slurm_spec("ssh_slurm_badcheck", slurm_args="--partition=nosuchpartition")
    result = sshpyk("check", "--json", "ssh_slurm_badcheck")
    assert result.exit_code == 1
    stages = {s["stage"]: s for s in json.loads(result.stdout)["stages"]}
    assert list(stages)[-2:] == ["slurm", "kernel"]
    assert stages["slurm"]["status"] == "fail" and stages["kernel"]["status"] == "skip"
    assert "invalid partition" in stages["slurm"]["detail"].lower()
    assert "sshpyk edit ssh_slurm_badcheck --slurm-args" in stages["slurm"]["fix"]


@pytest.fixture
def owner(slurm: ThrowawaySlurm, slurm_spec: Any) -> Iterator[SlurmOwner]:
    slurm_spec("ssh_slurm_ps")
    holder = SlurmOwner("ssh_slurm_ps")
    yield holder
    holder.stop()


def test_ps_list_and_kill_show_the_job(
    sshd: Any, slurm: ThrowawaySlurm, owner: SlurmOwner, run_root: Path
) -> None:
    host = [sshd.alias, "--ssh-config", str(sshd.ssh_config), "--run-root", str(run_root)]
    result = sshpyk("ps", *host)
    assert result.exit_code == 0, result.output
    header, *rows, _broker = result.stdout.splitlines()
    assert header.split()[-5:] == ["JOB", "ID", "NODE", "JOB", "STATE"]
    (row,) = rows
    assert row.split()[1] == owner.kernel_id
    assert row.split()[-5:-2] == [owner.job_id, slurm.node, "RUNNING"]
    assert re.search(r" RUNNING \(\d+m\d\ds left\)$", row), row  # the allocation's limit
    result = sshpyk("ps", "--json", *host)
    (kernel,) = json.loads(result.stdout)["hosts"][0]["kernels"]
    assert kernel["launcher"] == "slurm" and kernel["job_id"] == owner.job_id
    assert (kernel["node"], kernel["slurm_state"]) == (slurm.node, "RUNNING")

    result = sshpyk("list", "--remote")
    assert result.exit_code == 0, result.output
    assert f"SLURM Jobs:            job {owner.job_id} RUNNING on {slurm.node} " in result.stdout
    assert "Launcher:              (v) slurm" in result.stdout
    result = sshpyk("list", "--remote", "--json")
    (entry,) = json.loads(result.stdout)["kernels"]
    assert entry["checks"]["slurm_args"] == "ok"
    (job,) = entry["checks"]["remote"]["slurm_jobs"]
    assert (job["job_id"], job["state"], job["node"]) == (owner.job_id, "RUNNING", slurm.node)

    result = sshpyk("kill", "-y", *host[:3], owner.kernel_id, "--run-root", str(run_root))
    assert result.exit_code == 0, result.output
    assert f"cancelled SLURM job {owner.job_id}" in result.stdout
    assert slurm.jobs() == []
    assert wait_until(lambda: leftovers(run_root)[1] == [], 10), leftovers(run_root)


def test_ps_shows_the_time_left_of_a_running_job(
    slurm: ThrowawaySlurm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent's squeue annotation carries the job's time left (real squeue) and the
    JOB STATE cell of `sshpyk ps` shows it; a job without a limit shows none."""
    from sshpyk.agent.remote.slurm import SlurmKernel
    from sshpyk.kernels.batch import duration
    from sshpyk.kernels.launcher import launcher_for

    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    srun = shutil.which("srun")
    assert srun is not None
    jobs = []
    try:
        for name, limit in (("limited", ["--time=5"]), ("unlimited", [])):
            jobs.append(
                subprocess.Popen(
                    [srun, f"--job-name={name}", "--ntasks=1", *limit, "sleep", "60"],
                    env=slurm.env(),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        assert wait_until(
            lambda: [j["state"] for j in slurm.jobs()] == ["RUNNING", "RUNNING"], 20
        ), slurm.jobs()
        by_id = {j["job_id"]: j for j in slurm.jobs()}
        records = [{"launcher": "slurm", "job_id": job_id, "alive": True} for job_id in by_id]
        annotated = {k["job_id"]: k for k in SlurmKernel.annotate(records)}
        lefts = sorted(
            (k["time_left"] for k in annotated.values()), key=lambda v: -1 if v is None else v
        )
        assert lefts[0] is None and 240 <= lefts[1] <= 300, annotated
        cells = [launcher_for("slurm").ps_cells(k)[2] for k in annotated.values()]
        assert sorted(cells) == ["RUNNING", f"RUNNING ({duration(lefts[1])} left)"], cells
    finally:
        for proc in jobs:
            proc.kill()
            proc.wait(10)
        for job in slurm.jobs():
            slurm.run("scancel", job["job_id"])
        assert wait_until(lambda: slurm.jobs() == [], 20), slurm.jobs()


# -- the allocation across restarts (salloc once, a job step per kernel start) ------------


async def test_restart_on_a_busy_node_stays_in_the_allocation(
    slurm: ThrowawaySlurm, slurm_spec: Any, no_leftovers: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Another job waits for the node: a restart is a new step in the kernel's own
    allocation, so it answers in seconds and the other job still waits; shutdown then
    releases the allocation (nothing of ours left in squeue) and the other job runs."""
    caplog.set_level(logging.INFO)
    slurm_spec("ssh_slurm")
    km, kc = await start_manager("ssh_slurm")
    other = None
    try:
        (job,) = slurm.jobs()
        other = subprocess.Popen(
            [shutil.which("srun") or "srun", "--job-name=other", "--exclusive", "sleep", "300"],
            env=slurm.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        assert wait_until(lambda: len(slurm.jobs()) == 2, 15), slurm.jobs()
        waiting = [j for j in slurm.jobs() if j["job_id"] != job["job_id"]]
        assert [j["state"] for j in waiting] == ["PENDING"], waiting
        started = time.monotonic()
        await km.restart_kernel()
        await kc.wait_for_ready(timeout=20)
        seconds = time.monotonic() - started
        assert seconds < 20, seconds
        _, out = await run_cell(kc, "import os; print(os.environ['SLURM_JOB_ID'])")
        assert out.strip() == job["job_id"]
        states = {j["job_id"]: j["state"] for j in slurm.jobs()}
        assert states == {job["job_id"]: "RUNNING", waiting[0]["job_id"]: "PENDING"}, states
        assert f"SLURM job {job['job_id']} restarted in the same allocation" in caplog.text
    finally:
        await stop_manager(km, kc)
        ours = [j for j in slurm.jobs() if j["job_id"] == job["job_id"]]
        if other is not None:
            other.kill()
            other.wait(10)
        slurm.run("scancel", "--name=other")
    assert ours == []  # shutdown released the allocation
    assert wait_until(lambda: slurm.jobs() == [], 20), slurm.jobs()
    no_leftovers()


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_restart_after_the_allocation_ended_asks_for_a_new_one(
    slurm: ThrowawaySlurm, slurm_spec: Any, no_leftovers: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The allocation's time limit ends the kernel (a restart never resets it); the
    restart then says so in the log and gets a new allocation."""
    caplog.set_level(logging.INFO)
    slurm_spec("ssh_slurm", slurm_args="--time=0:05")
    km, kc = await start_manager("ssh_slurm")
    try:
        (job,) = slurm.jobs()
        deadline = time.monotonic() + 150  # slurmctld checks limits every 30 s, KillWait
        while slurm.jobs() and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        assert slurm.jobs() == []
        await km.restart_kernel()
        await kc.wait_for_ready(timeout=60)
        (new_job,) = slurm.jobs()
        assert new_job["job_id"] != job["job_id"]
        _, out = await run_cell(kc, "import os; print(os.environ['SLURM_JOB_ID'])")
        assert out.strip() == new_job["job_id"]
        (line,) = [r.message for r in caplog.records if "allocation has ended" in r.message]
        assert f"SLURM job {job['job_id']}: its allocation has ended" in line
    finally:
        await stop_manager(km, kc)
    assert slurm.jobs() == []
    no_leftovers()


# -- the outage guarantees through the login node (issue 13) ------------------------------


async def test_output_during_an_outage_arrives_through_the_login_node(
    slurm: ThrowawaySlurm, slurm_spec: Any, sshd: Any, tmp_path: Path, no_leftovers: Any
) -> None:
    """The 24-line reset scenario for a kernel in a SLURM job: the resumable relay runs
    in the login node's agent, so the output of the outage arrives after the heal."""
    from e2e.network.test_outage import assert_all_lines, cell_through_outage, lines_cell
    from support.faultproxy import FaultProxy, proxied_ssh_config

    with FaultProxy(sshd.port) as proxy:
        config = proxied_ssh_config(sshd, proxy, tmp_path, "sshpyk-proxied")
        slurm_spec("ssh_slurm_outage", ssh_host_alias="sshpyk-proxied", ssh_config=str(config))
        km, kc = await start_manager("ssh_slurm_outage")
        try:
            (job,) = slurm.jobs()
            cell = await cell_through_outage(
                kc,
                proxy,
                lines_cell(24),
                lambda: proxy.reset(down=True),
                fault_after=1.0,
                down_for=8.0,
                after_heal=20.0,
            )
            assert_all_lines(cell, 24)
            _, out = await run_cell(kc, "import os; print(y, os.environ['SLURM_JOB_ID'])")
            assert out.split() == ["42", job["job_id"]]
        finally:
            proxy.heal()
            await stop_manager(km, kc)
    assert slurm.jobs() == []
    no_leftovers()

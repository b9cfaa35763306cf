"""The Grid Engine launcher against a real single-node Son of Grid Engine
(tests/support/sge.py) behind the real sshd: the host alias is the submit host, each
kernel a task (qrsh -inherit) of a job held for it on the execution host.

Proves: the kernel runs in the job (JOB_ID in its environment), its queue state and job
id are in Jupyter's log, interrupt and restarts work and stay in the job (no re-queue),
its sockets are private (unix or loopback) and reached over the node connection, the
outage relay runs through the login host, shutdown / a lost client / a SIGKILLed agent
/ a queue timeout leave nothing in qstat, the walltime warning, `sshpyk ps` shows the
job, `sshpyk check` runs a real job, and bad --sge-args give one line at check and at
launch with nothing left in qstat.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sshpyk import KernelStartTimeoutError, SSHPykError, SSHSession
from sshpyk.errors import QueueTimeoutError, SchedulerArgsError

from .conftest import TEST_ARGS, sge_options
from support.cli import sshpyk
from support.kernels import interrupt_sleep, run_cell, start_manager, stop_manager
from support.sge import ThrowawaySGE
from support.waiting import leftovers, wait_until

pytestmark = pytest.mark.timeout(180)


def kernel_listeners(node_pid: int) -> list[str]:
    """The TCP addresses the node side's kernel (its children) listens on."""
    children = Path(f"/proc/{node_pid}/task/{node_pid}/children").read_text().split()
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True).stdout
    return [
        line.split()[3]
        for line in out.splitlines()
        if any(f"pid={pid}," in line for pid in [str(node_pid), *children])
    ]


async def test_kernel_runs_in_a_job_and_restarts_stay_in_it(
    sge: ThrowawaySGE, sge_spec: Any, no_leftovers: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    sge_spec("ssh_sge")
    started = time.monotonic()
    km, kc = await start_manager("ssh_sge")
    start_seconds = time.monotonic() - started
    try:
        (job,) = sge.jobs()
        assert job["state"] in ("r", "t") and job["queue"] == f"all.q@{sge.node}"
        _, out = await run_cell(
            kc,
            "import os; print(os.environ['JOB_ID'], "
            "os.getppid() == int(os.environ['JPY_PARENT_PID']))",
        )
        assert out.split() == [job["job_id"], "True"]
        assert f"Grid Engine job {job['job_id']} running on {sge.node}" in caplog.text
        assert f"Grid Engine job {job['job_id']} RUNNING on {sge.node}" in caplog.text
        process = km.provisioner.remote_kernel.process  # type: ignore[union-attr]
        # private sockets only: unix in the node's run dir, or loopback ports
        assert process.details["node_transport"] in ("ipc", "tcp")
        addresses = kernel_listeners(int(process.details["node_pid"]))
        assert all(a.startswith("127.0.0.1:") for a in addresses), addresses

        status, seconds = await interrupt_sleep(km, kc)
        assert status == "error/KeyboardInterrupt", status
        assert seconds < 5
        for restart in range(2):
            await km.restart_kernel()
            await kc.wait_for_ready(timeout=60)
            (same,) = sge.jobs()  # a new task in the same job: no queueing
            assert same["job_id"] == job["job_id"], restart
            _, out = await run_cell(kc, "import os; print(os.environ['JOB_ID'])")
            assert out.strip() == job["job_id"]
        line = f"Grid Engine job {job['job_id']} restarted in the same allocation"
        assert caplog.text.count(line) == 2
    finally:
        await stop_manager(km, kc)
    assert sge.jobs() == []  # deleted when shutdown returns, not some time later
    no_leftovers()
    assert start_seconds < 30


async def test_a_queued_job_is_logged_then_times_out(
    sshd: Any,
    sge: ThrowawaySGE,
    sge_spec: Any,
    no_leftovers: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every slot taken: the job waits; its state and id are logged while it waits, and
    it is deleted after the queue timeout with one clear line."""
    caplog.set_level(logging.INFO)
    sge_spec("ssh_sge_pending", sge_queue_timeout=4.0, provisioner={"sge_status_interval": 1.0})
    blocker = sge.run(
        "qsub", "-terse", "-pe", "smp", str(sge.slots), "-b", "y", "-o", "/dev/null",
        "-e", "/dev/null", "sleep", "600",
    ).stdout.strip()  # fmt: skip
    assert wait_until(lambda: [j["state"] for j in sge.jobs()] == ["r"], 20), sge.jobs()
    started = time.monotonic()
    with pytest.raises(KernelStartTimeoutError) as raised:
        await start_manager("ssh_sge_pending")
    elapsed = time.monotonic() - started
    assert isinstance(raised.value, QueueTimeoutError)
    assert [j["job_id"] for j in sge.jobs()] == [blocker]  # deleted before the error
    sge.run("qdel", blocker)
    assert wait_until(lambda: sge.jobs() == [], 20), sge.jobs()
    message = str(raised.value)
    assert "\n" not in message
    match = re.search(r"Grid Engine job (\d+) was still pending after 4s", message)
    assert match, message
    assert message.endswith(
        f", so it was cancelled: raise --sge-queue-timeout, or see `qstat -f` on '{sshd.alias}'"
    )
    assert 4 <= elapsed < 20, elapsed
    pending = [r.getMessage() for r in caplog.records if "pending for" in r.getMessage()]
    assert len(pending) >= 2, caplog.text  # refreshed while it waits
    assert all(f"Grid Engine job {match.group(1)} pending" in line for line in pending)
    records = [r for r in caplog.records if "pending for" in r.getMessage()]
    # through the provisioner's self.log (Jupyter's log), not sshpyk's module logger
    assert {r.name for r in records} == {logging.getLogger("traitlets").name}, records
    no_leftovers()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["-pe", "smp", "1", "-q", "nosuch.q"], "nosuch.q"),
        (["-l", "h_rt=600"], "need a parallel environment"),
        (["-pe", "nosuchpe", "1"], "nosuchpe"),
    ],
)
async def test_bad_arguments_fail_the_launch_in_one_line(
    sshd: Any, sge: ThrowawaySGE, run_root: Path, no_leftovers: Any, args: list[str], words: str
) -> None:
    options = sge_options(sge, run_root, sge_args=args)
    started = time.monotonic()
    async with await SSHSession.connect(sshd.alias, ssh_config=sshd.ssh_config) as session:
        with pytest.raises(SSHPykError) as raised:
            await session.start_kernel(options=options)
    assert time.monotonic() - started < 20
    assert isinstance(raised.value, SchedulerArgsError), raised.value
    message = str(raised.value)
    assert "\n" not in message and words in message, message
    assert sge.jobs() == []
    no_leftovers()


def test_check_runs_a_real_job(sge: ThrowawaySGE, sge_spec: Any, no_leftovers: Any) -> None:
    sge_spec("ssh_sge_check")
    result = sshpyk("check", "ssh_sge_check")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    (sge_line,) = [line for line in lines if "Grid Engine (login node)" in line]
    assert sge_line.startswith("(v) ") and "qsub at " in sge_line, sge_line
    assert "queues: all.q" in sge_line and "found suitable queue" in sge_line, sge_line
    (kernel_line,) = [line for line in lines if "test kernel" in line]
    assert re.search(rf"Grid Engine job \d+ RUNNING on {sge.node} ", kernel_line), kernel_line
    assert sge.jobs() == []
    no_leftovers()


def test_check_fails_at_the_sge_stage(sge: ThrowawaySGE, sge_spec: Any) -> None:
    sge_spec("ssh_sge_badcheck", sge_args=f"{TEST_ARGS} -q nosuch.q")
    result = sshpyk("check", "--json", "ssh_sge_badcheck")
    assert result.exit_code == 1
    stages = {s["stage"]: s for s in json.loads(result.stdout)["stages"]}
    assert list(stages)[-2:] == ["sge", "kernel"]
    assert stages["sge"]["status"] == "fail" and stages["kernel"]["status"] == "skip"
    assert "nosuch.q" in stages["sge"]["detail"] and "\n" not in stages["sge"]["detail"]
    assert "sshpyk edit ssh_sge_badcheck --sge-args" in stages["sge"]["fix"]
    assert sge.jobs() == []


def test_add_refuses_arguments_sshpyk_sets(sshd: Any, sge: ThrowawaySGE) -> None:
    result = sshpyk(
        "add", "--kernel-name", "ssh_sge_bad", "--ssh-host-alias", sshd.alias,
        "--ssh-config", str(sshd.ssh_config), "--launcher", "sge", "--sge-args",
        "-pe smp 1 -t 1-4", "--no-check",
    )  # fmt: skip
    assert result.exit_code != 0
    assert "--sge-args: -t is set by sshpyk (a kernel is one job" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


async def test_walltime_warning_and_ps(
    sshd: Any, sge: ThrowawaySGE, run_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """h_rt: the warning before it, and `sshpyk ps` with the job, host, state and time
    left."""
    caplog.set_level(logging.INFO, logger="sshpyk")
    args = [*TEST_ARGS.split(), "-l", "h_rt=60"]
    options = sge_options(sge, run_root, sge_args=args, sge_walltime_warning=57)
    async with await SSHSession.connect(sshd.alias, ssh_config=sshd.ssh_config) as session:
        kernel = await session.start_kernel(options=options)
        try:
            assert kernel.process is not None
            job_id = kernel.process.details["job_id"]
            host = [sshd.alias, "--ssh-config", str(sshd.ssh_config), "--run-root", str(run_root)]
            result = await asyncio.to_thread(sshpyk, "ps", *host)
            assert result.exit_code == 0, result.output
            header, *rows = result.stdout.splitlines()
            assert header.split()[-5:] == ["JOB", "ID", "NODE", "JOB", "STATE"]
            (row,) = [r for r in rows if kernel.kernel_id in r]
            assert row.split()[-5:-2] == [job_id, sge.node, "RUNNING"], row
            assert re.search(r" RUNNING \(\d+s left\)$", row), row  # h_rt, from qstat

            def warned() -> bool:
                return any(
                    r.levelno == logging.WARNING and "reaches its time limit in" in r.message
                    for r in caplog.records
                )

            assert await asyncio.to_thread(wait_until, warned, 20), caplog.text
            (line,) = [r.message for r in caplog.records if "time limit" in r.message]
            assert f"Grid Engine job {job_id} on {sge.node} reaches its time limit in " in line
        finally:
            await kernel.close()
    assert sge.jobs() == []


async def test_sigkilled_agent_deletes_the_job(
    sshd: Any, sge: ThrowawaySGE, run_root: Path
) -> None:
    """The agent dies without cleaning up: the holder's stdin ends and it deletes the job;
    the task's stdin ends too and the node side stops the kernel."""
    async with await SSHSession.connect(sshd.alias, ssh_config=sshd.ssh_config) as session:
        kernel = await session.start_kernel(options=sge_options(sge, run_root))
        assert kernel.process is not None and sge.jobs()
        os.kill(kernel.process.agent.pid, signal.SIGKILL)
        assert await asyncio.to_thread(wait_until, lambda: sge.jobs() == [], 30), sge.jobs()
        assert await asyncio.wait_for(kernel.wait(), 10) is not None
        await kernel.close()
    assert wait_until(lambda: leftovers(run_root)[0] == [], 10), leftovers(run_root)


OWNER = """
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


def test_a_lost_client_deletes_the_job_after_its_grace(
    sge: ThrowawaySGE, sge_spec: Any, run_root: Path
) -> None:
    """The process holding the kernel is SIGKILLed: after the grace period the agent
    stops the kernel and deletes the job. (Its own connection, no broker: to the remote
    that looks like a reset, so the link grace applies: set to the same.)"""
    grace = 3.0
    sge_spec("ssh_sge_owner", grace_period=grace, link_grace=grace)
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, "ssh_sge_owner"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None
        _, job_id = owner.stdout.readline().split()
        assert [j["job_id"] for j in sge.jobs()] == [job_id]
        owner.kill()
        owner.wait(10)
        assert wait_until(lambda: sge.jobs() == [], grace + 30), sge.jobs()
        assert wait_until(lambda: leftovers(run_root) == ([], []), 10), leftovers(run_root)
    finally:
        if owner.poll() is None:
            owner.kill()
        owner.wait(10)
        for stream in (owner.stdin, owner.stdout):
            if stream is not None:
                stream.close()


async def test_output_during_an_outage_arrives_through_the_login_host(
    sge: ThrowawaySGE, sge_spec: Any, sshd: Any, tmp_path: Path, no_leftovers: Any
) -> None:
    """The 24-line reset scenario: the resumable relay runs in the login host's agent,
    so the output of the outage arrives after the heal."""
    from e2e.network.test_outage import assert_all_lines, cell_through_outage, lines_cell
    from support.faultproxy import FaultProxy, proxied_ssh_config

    with FaultProxy(sshd.port) as proxy:
        config = proxied_ssh_config(sshd, proxy, tmp_path, "sshpyk-proxied")
        sge_spec("ssh_sge_outage", ssh_host_alias="sshpyk-proxied", ssh_config=str(config))
        km, kc = await start_manager("ssh_sge_outage")
        try:
            (job,) = sge.jobs()
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
            _, out = await run_cell(kc, "import os; print(y, os.environ['JOB_ID'])")
            assert out.split() == ["42", job["job_id"]]
        finally:
            await stop_manager(km, kc)
    assert sge.jobs() == []
    no_leftovers()

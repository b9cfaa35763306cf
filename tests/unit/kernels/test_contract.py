"""The launcher contract, the error-kind table, owned tasks, the KernelProcess state
machine and the remote command's quoting: all local, no sshd."""

from __future__ import annotations

import asyncio
import logging
import shlex
import subprocess
from typing import Any

import pytest

from sshpyk import errors
from sshpyk.agent.command import python_command, remote_command
from sshpyk.agent.kinds import ERROR_CLASSES, error_class, remote_error
from sshpyk.agent.process import LOST, KernelProcess
from sshpyk.agent.remote.protocol import KINDS, Kind
from sshpyk.config import config_field, launcher_names
from sshpyk.kernels import LAUNCHERS, Launcher, launcher_for
from sshpyk.kernels.kernel import KernelOptions, RemoteKernel
from sshpyk.kernels.launcher import find_launcher, register, unregister
from sshpyk.kernelspec import SSHKernelSpec
from sshpyk.tasks import TaskOwner, wait_event

pytestmark = pytest.mark.timeout(30)


# -- the launcher registry and contract -------------------------------------------------
def test_every_configured_launcher_is_registered() -> None:
    assert set(LAUNCHERS) == set(launcher_names()) == set(config_field("launcher").choices)
    for name, launcher in LAUNCHERS.items():
        assert isinstance(launcher, Launcher) and launcher.name == name
    assert launcher_for(None) is LAUNCHERS["direct"]
    with pytest.raises(errors.SSHPykError, match="unknown launcher 'pbs'"):
        launcher_for("pbs")


def test_the_start_timeout_comes_from_the_launcher() -> None:
    direct = KernelOptions(start_timeout=7.0, slurm_queue_timeout=100.0)
    slurm = KernelOptions(start_timeout=7.0, slurm_queue_timeout=100.0, launcher="slurm")
    assert direct.total_start_timeout == 7.0
    assert slurm.total_start_timeout == 107.0


def test_launch_requests_carry_only_the_launchers_own_fields() -> None:
    assert set(LAUNCHERS["slurm"].request_fields()) == {
        "slurm_args",
        "slurm_queue_timeout",
        "slurm_walltime_warning",
        "slurm_status_interval",
    }
    assert LAUNCHERS["direct"].request_fields() == ()
    direct = KernelOptions().launch_request("k", "hmac-sha256").message("kid")
    assert direct["launcher"] == "direct" and not any(k.startswith("slurm") for k in direct)
    slurm = KernelOptions(launcher="slurm").launch_request("k", "hmac-sha256").message("kid")
    assert slurm["slurm_queue_timeout"] == KernelOptions().slurm_queue_timeout


class _Agent:
    """What a KernelProcess needs of its agent, recorded."""

    alias = "host"
    pid = 42

    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self.sent: list[dict[str, Any]] = []
        self.forgotten: list[str] = []

    def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def forget(self, kid: str) -> None:
        self.forgotten.append(kid)

    def error_from_event(self, event: dict[str, Any]) -> errors.SSHPykError:
        return remote_error(event, self.alias)


class _Session:
    alias = "host"
    ssh_config = None


class _Fake(Launcher):
    """A test double: a launcher whose kernels are ready once the agent says so, and
    that records every hook the kernel layer calls."""

    name = "fake"
    help = "a test double"
    stop_timeout = 1.5

    def __init__(self) -> None:
        self.calls: list[str] = []

    def start_timeout(self, options: KernelOptions) -> float:
        return 3 * options.start_timeout

    async def wait_ready(self, kernel: RemoteKernel, process: KernelProcess) -> None:
        self.calls.append("wait_ready")
        await process.wait_ready()
        kernel.timings["ready"] = 0.25

    def describe(self, process: KernelProcess) -> str:
        return f"fake {process.details.get('where')}"

    def info(self, process: KernelProcess) -> dict[str, Any]:
        return {"fake": dict(process.details)}


@pytest.fixture
def fake() -> Any:
    register(_Fake)
    try:
        yield LAUNCHERS["fake"]
    finally:
        unregister("fake")


async def test_a_new_launcher_is_one_class(fake: _Fake) -> None:
    options = KernelOptions(launcher="fake", start_timeout=2.0)
    assert options.total_start_timeout == 6.0
    kernel = RemoteKernel(_Session(), options, kernel_id="kid")  # type: ignore[arg-type]
    process = KernelProcess(_Agent(), "kid")
    process.on_event(
        {
            "event": "started",
            "pid": 5,
            "pgid": 5,
            "run_dir": "/r",
            "transport": "ipc",
            "endpoints": {"hb": "/r/hb"},
            "launcher": "fake",
        }
    )
    process.details["where"] = "there"
    process.on_event({"event": "ready"})
    await fake.wait_ready(kernel, process)
    kernel.process = process
    assert kernel.info()["fake"] == {"where": "there"}
    assert kernel.info()["remote_pid"] == 5
    line, args = kernel.ready_line()
    assert line % args == "remote pid 5 ready in 0.000s"
    assert fake.describe(process) == "fake there" and fake.calls == ["wait_ready"]


def test_the_diagnostics_hooks_default_to_nothing() -> None:
    direct = LAUNCHERS["direct"]
    spec = SSHKernelSpec(name="k", ssh_host_alias="h")
    assert (direct.ps_columns, direct.ps_cells({"pid": 1}), direct.check_field) == ((), [], None)
    assert direct.command_tail(spec) == ""
    assert direct.listing_lines(spec, {}, str) == []
    assert direct.live_kernel({"kernel_id": "k"}, KernelOptions()) is None
    assert find_launcher(None) is direct and find_launcher("pbs") is None


def test_the_slurm_diagnostics_hooks() -> None:
    slurm = LAUNCHERS["slurm"]
    spec = SSHKernelSpec(name="k", ssh_host_alias="h", launcher="slurm", slurm_args="-p gpu")
    assert slurm.command_tail(spec) == " -> srun -p gpu python3 <sshpyk node>"
    assert slurm.ps_columns == ("JOB ID", "NODE", "JOB STATE")
    pending = {"job_id": "7", "slurm_state": "PENDING", "slurm_reason": "Resources"}
    assert slurm.ps_cells(pending) == ["7", "-", "PENDING (Resources)"]
    running = {"job_id": "7", "node": "n1", "slurm_state": "RUNNING", "slurm_reason": "None"}
    assert slurm.ps_cells(running) == ["7", "n1", "RUNNING"]
    options = KernelOptions.from_config(spec)
    assert slurm.live_kernel({**running, "slurm_args": ["-p", "cpu"]}, options) is None
    job = slurm.live_kernel({**running, "kernel_id": "abc", "slurm_args": ["-p", "gpu"]}, options)
    assert job == {"kernel_id": "abc", "job_id": "7", "node": "n1", "state": "RUNNING",
                   "reason": "None"}  # fmt: skip
    remote = {"slurm_jobs": [job]}
    lines = dict(slurm.listing_lines(spec, remote, lambda v: f"(v) {v}"))
    assert lines["Launcher"] == "(v) slurm (srun on the login node)"
    assert lines["SLURM Args"] == "-p gpu" and "SLURM" not in lines
    assert lines["SLURM Jobs"] == "job 7 RUNNING on n1 (kernel abc)"


def test_the_sge_diagnostics_hooks() -> None:
    """The second scheduler: its own words on the shared batch hooks."""
    sge = LAUNCHERS["sge"]
    spec = SSHKernelSpec(name="k", ssh_host_alias="h", launcher="sge", sge_args="-pe smp 1")
    assert sge.command_tail(spec) == " -> qsub -pe smp 1 + qrsh -inherit python3 <sshpyk node>"
    assert sge.check_stage == ("sge", "Grid Engine (login node)")
    assert sge.check_field == "sge_args" and sge.request_fields() == (
        "sge_args", "sge_queue_timeout", "sge_walltime_warning", "sge_status_interval",
    )  # fmt: skip
    running = {"job_id": "3", "node": "n1", "sge_state": "RUNNING", "time_left": 125}
    assert sge.ps_cells(running) == ["3", "n1", "RUNNING (2m05s left)"]
    info = {"version": "SGE 8.1.9", "qsub": "/usr/bin/qsub", "test": "verification: ok",
            "queues": [{"queue": "all.q", "available": "3", "total": "4"}]}  # fmt: skip
    assert sge.host_summary(info) == (
        "SGE 8.1.9, qsub at /usr/bin/qsub; queues: all.q 3/4 free; verification: ok"
    )
    lines = dict(sge.listing_lines(spec, {"sge": info}, str))
    assert lines["Grid Engine Args"] == "-pe smp 1"
    assert lines["Grid Engine"] == "SGE 8.1.9; queues: all.q 3/4 free"
    change = "`sshpyk edit k {}`".format
    fix = sge.fix(errors.SchedulerArgsError("x"), change, "h")
    assert fix == 'fix the job options: `sshpyk edit k --sge-args "-pe smp 1 -q ..."`'
    fix = sge.fix(errors.QueueTimeoutError("x"), change, "h")
    assert fix is not None and "--sge-queue-timeout 3600" in fix and "qstat -g c" in fix
    assert sge.fix(errors.RemoteError("x"), change, "h") is None  # the class decides
    assert error_class("sge_args") is errors.SchedulerArgsError


# -- error kinds ----------------------------------------------------------------------
def test_every_error_kind_has_a_class() -> None:
    own = {kind for launcher in LAUNCHERS.values() for kind in launcher.error_kinds}
    assert set(ERROR_CLASSES) == set(KINDS) | own and not own & set(KINDS)
    for launcher in LAUNCHERS.values():  # a launcher's kinds map to its classes
        for kind, cls in launcher.error_kinds.items():
            assert error_class(kind) is cls and kind.startswith(launcher.name + "_"), kind
    assert error_class("slurm_args") is errors.SchedulerArgsError
    assert error_class("slurm_queue_timeout") is errors.QueueTimeoutError
    for kind in KINDS:
        assert issubclass(error_class(kind), errors.SSHPykError), kind
    assert error_class("no_such_kind") is errors.RemoteError
    assert error_class(None) is errors.RemoteError
    assert error_class(Kind.AGENT_GONE) is errors.AgentGoneError
    assert issubclass(errors.QueueTimeoutError, errors.KernelStartTimeoutError)
    assert issubclass(errors.SchedulerMissingError, errors.SchedulerError)
    assert issubclass(errors.SchedulerArgsError, errors.SchedulerError)
    assert issubclass(errors.LaunchFailedError, errors.KernelStartError)
    for name in ("NotPermittedError", "AgentInternalError", "AgentGoneError"):
        assert issubclass(getattr(errors, name), errors.RemoteError), name


def test_an_error_event_becomes_its_class_with_the_kernel_output() -> None:
    exc = remote_error(
        {"kind": Kind.KERNEL_EXITED, "message": "kernel died", "stderr_tail": "a\n\nb\n"}, "h"
    )
    assert type(exc) is errors.KernelStartError
    assert str(exc) == "kernel died on 'h'; kernel output: a | b"
    assert type(remote_error({"kind": "new_kind", "message": "m"}, "h")) is errors.RemoteError


# -- TaskOwner ------------------------------------------------------------------------
async def test_a_failed_task_is_logged_and_dropped(caplog: pytest.LogCaptureFixture) -> None:
    owner = TaskOwner("[h] test")

    async def fail() -> None:
        raise ValueError("boom")

    task = owner.create_task(fail(), name="failing")
    with caplog.at_level(logging.ERROR, logger="sshpyk"):
        await asyncio.wait([task])
        await asyncio.sleep(0)
    assert len(owner) == 0
    assert "[h] test: task failing failed: ValueError('boom')" in caplog.text
    await owner.aclose()


async def test_aclose_cancels_what_is_left_and_refuses_new_tasks() -> None:
    owner = TaskOwner("t")
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            cancelled.set()

    task = owner.create_task(forever())
    await asyncio.sleep(0)
    await owner.aclose(timeout=1.0)
    assert task.cancelled() and cancelled.is_set() and len(owner) == 0
    coro = forever()
    with pytest.raises(RuntimeError):
        owner.create_task(coro)


async def test_aclose_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    owner = TaskOwner("t")
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue  # refuses to die (until released)

    task = owner.create_task(stubborn())
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with caplog.at_level(logging.WARNING, logger="sshpyk"):
        await owner.aclose(timeout=0.2)
    assert loop.time() - started < 1.0
    assert "1 task(s) still running" in caplog.text
    release.set()
    await task


async def test_wait_event_leaves_no_waiter() -> None:
    event = asyncio.Event()
    assert not await wait_event(event, 0.01)
    assert not event._waiters  # type: ignore[attr-defined]
    waiting = asyncio.ensure_future(wait_event(event, 10))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await asyncio.sleep(0)
    assert not event._waiters  # type: ignore[attr-defined]
    event.set()
    assert await wait_event(event, 0)


# -- KernelProcess --------------------------------------------------------------------
STARTED = {
    "event": "started",
    "kid": "k",
    "pid": 7,
    "pgid": 7,
    "run_dir": "/run/k",
    "transport": "ipc",
    "endpoints": {"hb": "/run/k/hb"},
    "argv": ["python"],
}


async def test_a_direct_kernel_runs_at_once_and_is_ready_on_ready() -> None:
    process = KernelProcess(_Agent(), "k")
    process.on_event(STARTED)
    assert process.started.is_set() and process.running.is_set()
    assert not process.ready.is_set() and process.poll() is None
    process.on_event({"event": "ready", "kid": "k"})
    await process.wait_ready()
    assert process.reachable.is_set()
    process.on_event({"event": "exited", "kid": "k", "code": 3, "stderr_tail": "bye"})
    assert await process.wait() == 3 and process.stderr_tail == "bye"
    assert not process.stopped.is_set()
    process.on_event({"event": "stopped", "kid": "k"})
    assert process.stopped.is_set() and process.poll() == 3


async def test_a_queued_kernel_runs_when_its_endpoints_come() -> None:
    process = KernelProcess(_Agent(), "k")
    seen: list[dict[str, Any]] = []
    process.listeners.append(lambda p, e: seen.append(e))
    process.on_event({**STARTED, "endpoints": {}, "launcher": "slurm", "job_name": "sshpyk-k"})
    assert process.started.is_set() and not process.running.is_set()
    process.on_event({"event": "job", "kid": "k", "job_id": "12", "state": "PENDING"})
    assert not process.running.is_set() and process.details["state"] == "PENDING"
    process.on_event(
        {
            "event": "job",
            "kid": "k",
            "job_id": "12",
            "state": "RUNNING",
            "node": "n1",
            "host": "10.0.0.2",
            "endpoints": {"hb": "/s/hb"},
        }
    )
    assert process.running.is_set() and process.host == "10.0.0.2"
    assert process.details == {
        "job_name": "sshpyk-k",
        "job_id": "12",
        "state": "RUNNING",
        "node": "n1",
        "host": "10.0.0.2",
    }
    assert [e["state"] for e in seen] == ["PENDING", "RUNNING"]


async def test_an_error_event_fails_the_start_with_its_class() -> None:
    process = KernelProcess(_Agent(), "k")
    process.on_event(
        {"event": "error", "kid": "k", "kind": Kind.LAUNCH_FAILED, "message": "cannot start"}
    )
    with pytest.raises(errors.LaunchFailedError, match="cannot start on 'host'"):
        await process.wait_started()
    assert process.poll() == LOST and process.stopped.is_set()


async def test_restore_after_a_reattach() -> None:
    queued = KernelProcess(_Agent(), "k")
    queued.restore(
        {
            "kid": "k",
            "pid": 9,
            "endpoints": {"hb": "/s"},
            "ready": False,
            "launcher": "slurm",
            "host": None,
            "job_id": "5",
            "slurm_state": "PENDING",
        }
    )
    assert queued.started.is_set() and not queued.running.is_set()
    assert queued.details == {"job_id": "5", "state": "PENDING"}
    direct = KernelProcess(_Agent(), "k")
    direct.restore({"kid": "k", "pid": 9, "endpoints": {"hb": 1}, "ready": True})
    assert direct.running.is_set() and direct.reachable.is_set() and direct.poll() is None
    ended = KernelProcess(_Agent(), "k")
    ended.restore({"kid": "k", "pid": 9, "exit_code": 0})
    assert ended.poll() == 0 and ended.ready.is_set()


async def test_agent_loss_and_a_bounded_stop() -> None:
    agent = _Agent()
    process = KernelProcess(agent, "k")
    process.on_event(STARTED)
    await process.stop(timeout=5)  # the link is down: returns at once
    assert agent.sent == [] and agent.forgotten == ["k"]
    agent.connected.set()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await process.stop(timeout=0.1)  # no confirmation: bounded
    assert loop.time() - started < 1 and agent.sent == [{"op": "stop", "kid": "k"}]
    assert not process.stopped._waiters  # type: ignore[attr-defined]
    process.on_agent_lost(errors.ConnectionLostError("gone"))
    assert process.poll() == LOST and process.stopped.is_set()
    with pytest.raises(errors.ConnectionLostError):
        await process.wait_started()


# -- the remote command ---------------------------------------------------------------
@pytest.mark.parametrize(
    "python", ["python3", "/usr/bin/python3", "~/venv dir/bin/python", "/opt/env's"]
)
def test_python_command_quotes_for_the_shell(python: str) -> None:
    command = python_command(python, None, "import sys; print(sys.argv[1:])", "a b", "$HOME")
    assert command.stdin == b""
    words = shlex.split(command.command.splitlines()[-1])
    assert words[0] == "exec" and words[-4:] == [
        "-c",
        "import sys; print(sys.argv[1:])",
        "a b",
        "$HOME",
    ]
    if "/" not in python:
        assert words[1] == python


def test_python_command_runs_with_the_pre_command_on_stdin() -> None:
    command = python_command(
        "python3",
        "export SECRET=s3cr3t\necho pre >&2",
        "import os,sys;print(os.environ['SECRET'], sys.argv[1])",
        "x y",
    )
    assert "s3cr3t" not in command.command  # never in argv (ps)
    result = subprocess.run(
        ["sh", "-c", command.command], input=command.stdin, capture_output=True, timeout=20
    )
    assert result.stdout.decode().split() == ["s3cr3t", "x", "y"]
    assert result.stderr.decode().strip() == "pre"


def test_python_command_refuses_option_like_pythons() -> None:
    for python in ("", "-c"):
        with pytest.raises(errors.SSHPykError, match="not a path or command name"):
            python_command(python, None, "pass")


def test_the_agent_command_sends_its_code_on_stdin() -> None:
    command = remote_command("python3", "module load x")
    assert command.stdin.startswith(b"1\nmodule load x\n")
    assert "module load x" not in command.command
    assert len(command.stdin) > 1000 and len(command.command) < 1000

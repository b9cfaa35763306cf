"""The diagnostics layer without SSH: the transport check's verdicts per launcher, the
launcher's own stage, its fixes chosen by error class (never by message text), the
runner skipping what follows a failure, and SLURM kernelspecs accepting ipc; ``ps``
and ``list`` through the launcher contract (prepare, ps columns, list's JSON checks)."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncssh
import pytest

from sshpyk.diagnostics.check import STAGES, CheckTarget, Status, run_check, stages_for
from sshpyk.diagnostics.forwarding import _ipc_result, expected_transport, stage_forwarding
from sshpyk.diagnostics.inventory import (
    HostKernels,
    HostTarget,
    _ps,
    forwarded,
    host_targets,
    ps_table,
)
from sshpyk.diagnostics.launch import stage_kernel, stage_launcher
from sshpyk.diagnostics.live import KernelStatus
from sshpyk.diagnostics.report import Diagnosis, StageFailedError, StageResult
from sshpyk.errors import (
    KernelStartTimeoutError,
    QueueTimeoutError,
    RemoteError,
    SchedulerArgsError,
    SchedulerMissingError,
)
from sshpyk.kernels import LAUNCHERS, Launcher
from sshpyk.kernels.launcher import register, unregister
from sshpyk.kernelspec import SSHKernelSpec


def diagnosis(**target: Any) -> Diagnosis:
    results: list[StageResult] = []
    d = Diagnosis(
        CheckTarget(alias="gpubox", **target), timeout=5, test_kernel=False, report=results.append
    )
    return d


def test_slurm_forwards_are_unix_sockets_whatever_the_transport() -> None:
    for transport in ("auto", "ipc", "tcp"):
        assert expected_transport(diagnosis(launcher="slurm", transport=transport)) == "ipc"
    assert expected_transport(diagnosis(transport="tcp")) == "tcp"
    d = diagnosis(transport="auto")
    d.kernelspec = {"argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]}
    assert expected_transport(d) == "ipc"
    d.ipc_path_ok = False
    assert expected_transport(d) == "tcp"


def test_refused_unix_socket_forwarding_is_fatal_for_slurm_even_with_tcp() -> None:
    d = diagnosis(launcher="slurm", transport="tcp", kernel="ssh_slurm")
    _ipc_result(d, 0.1, "sshd refuses unix socket forwarding (prohibited)", "set it")
    (result,) = d.results
    assert result.status is Status.FAIL
    assert "the slurm launcher's forwards need it" in result.detail
    assert result.fix == "set it"  # switching to --transport tcp would not help
    d = diagnosis(transport="tcp")
    _ipc_result(d, 0.1, "refused", "set it")
    assert d.results[0].status is Status.WARN


class _RefusingConnection:
    async def open_connection(self, host: str, port: int) -> Any:
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "prohibited")


class _Session:
    async def connection(self) -> _RefusingConnection:
        return _RefusingConnection()


@pytest.mark.parametrize(("launcher", "status"), [("slurm", Status.WARN), ("direct", Status.FAIL)])
def test_refused_tcp_forwarding_is_not_fatal_for_slurm(launcher: str, status: Status) -> None:
    d = diagnosis(launcher=launcher, transport="tcp")
    d.session = _Session()  # type: ignore[assignment]
    try:
        asyncio.run(stage_forwarding(d))
    except StageFailedError:
        pass
    (result,) = d.results
    assert (result.stage, result.status) == ("forwarding", status), result


class _Agent:
    def __init__(self, error: Exception | None) -> None:
        self.error = error

    async def load(self, name: str, modules: tuple[str, ...]) -> None:
        assert name == "slurm" and "slurm" in modules

    async def probe(self, launcher: str, args: list[str] | None = None) -> dict[str, Any]:
        assert launcher == "slurm"
        if self.error is not None:
            raise self.error
        return {"version": "slurm 22.05", "srun": "/usr/bin/srun", "partitions": []}


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (SchedulerMissingError("srun not found on the PATH"), "module load slurm"),
        (SchedulerArgsError("srun rejects the SLURM arguments"), "--slurm-args"),
        # the kind decides, not the words: a RemoteError saying the same is no SLURM fix
        (RemoteError("srun not found on the PATH; rejects the SLURM arguments"), "-vvv"),
    ],
)
def test_launcher_stage_fix_follows_the_error_class(error: Exception, words: str) -> None:
    d = diagnosis(launcher="slurm", kernel="ssh_slurm")
    d.agent = _Agent(error)  # type: ignore[assignment]
    with pytest.raises(StageFailedError):
        asyncio.run(stage_launcher(d))
    (result,) = d.results
    assert (result.stage, result.status) == ("slurm", Status.FAIL)
    assert result.fix is not None and words in result.fix, result.fix


def test_launcher_stage_ok_summarises_slurm() -> None:
    d = diagnosis(launcher="slurm")
    d.agent = _Agent(None)  # type: ignore[assignment]
    asyncio.run(stage_launcher(d))
    (result,) = d.results
    assert result.status is Status.OK
    assert result.detail == "slurm 22.05, srun at /usr/bin/srun; partitions: none"


def test_stages_per_launcher() -> None:
    assert stages_for("direct") == STAGES
    keys = [key for key, _ in stages_for("slurm")]
    assert keys[-2:] == ["slurm", "kernel"] and len(keys) == len(STAGES) + 1


def test_a_failed_stage_skips_the_rest(tmp_path: Any) -> None:
    target = CheckTarget(alias="gpubox", ssh_config=str(tmp_path / "missing"), launcher="slurm")
    results = asyncio.run(run_check(target, timeout=5))
    assert [r.stage for r in results] == [key for key, _ in stages_for("slurm")]
    assert results[0].status is Status.FAIL
    assert {r.status for r in results[1:]} == {Status.SKIP}


def test_slurm_kernelspec_accepts_ipc() -> None:
    SSHKernelSpec(name="ok", ssh_host_alias="gpubox", launcher="slurm", transport="ipc").validate()


# -- the kernel stage's fix: by error class ---------------------------------------------
class _FailingSession:
    def __init__(self, error: Exception) -> None:
        self.error = error

    async def start_kernel(self, options: Any) -> Any:
        raise self.error


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (QueueTimeoutError("job 7 PENDING (Resources) for 600s"), "--slurm-queue-timeout"),
        # a SLURM kernel that left the queue but did not bind its sockets: not the queue
        (KernelStartTimeoutError("SLURM job 7 RUNNING on n1, but ..."), "--start-timeout"),
    ],
)
def test_kernel_stage_fix_follows_the_error_class(error: Exception, words: str) -> None:
    results: list[StageResult] = []
    d = Diagnosis(
        CheckTarget(alias="gpubox", launcher="slurm", kernel="ssh_slurm"),
        timeout=5,
        test_kernel=True,
        report=results.append,
    )
    d.session = _FailingSession(error)  # type: ignore[assignment]
    with pytest.raises(StageFailedError):
        asyncio.run(stage_kernel(d))
    (result,) = d.results
    assert (result.stage, result.status) == ("kernel", Status.FAIL)
    assert result.fix is not None and words in result.fix, result.fix


# -- ps and kill through the launcher contract ------------------------------------------
class _Sched(Launcher):
    """A new scheduler: its own ps columns, its remote code loaded by prepare."""

    name = "sched"
    help = "a test double"
    ps_columns = ("QUEUE",)

    async def prepare(self, agent: Any) -> None:
        agent.loaded.append(self.name)

    async def wait_ready(self, kernel: Any, process: Any) -> None:
        raise NotImplementedError

    def ps_cells(self, entry: dict[str, Any]) -> list[str]:
        return [str(entry.get("queue") or "?")]


@pytest.fixture
def sched() -> Any:
    register(_Sched)
    try:
        yield LAUNCHERS["sched"]
    finally:
        unregister("sched")


class _PsAgent:
    def __init__(self, kernels: list[dict[str, Any]]) -> None:
        self.kernels = kernels
        self.loaded: list[str] = []
        self.asked: list[list[str]] = []

    async def ps(
        self, run_root: Any = None, *, all_users: bool = False, usage: bool = False
    ) -> list[dict[str, Any]]:
        self.asked.append(list(self.loaded))
        ready = set(self.loaded)
        return [
            {**k, "queue": "batch"} if k["launcher"] in ready else dict(k) for k in self.kernels
        ]


def _kernel(kid: str, launcher: str, **more: Any) -> dict[str, Any]:
    return {"kernel_id": kid, "launcher": launcher, "run_dir": f"/r/{kid}", "started": 1, **more}


def test_ps_prepares_the_launchers_of_the_kernelspecs(sched: Any) -> None:
    agent = _PsAgent([_kernel("a", "sched"), _kernel("b", "direct")])
    target = HostTarget("h", launchers=["sched", "direct"])
    kernels = asyncio.run(_ps(agent, target))  # type: ignore[arg-type]
    assert agent.loaded == ["sched"] and agent.asked == [["sched"]]
    assert [k.get("queue") for k in kernels] == ["batch", None]


def test_ps_asks_again_for_kernels_of_an_unprepared_launcher(sched: Any) -> None:
    agent = _PsAgent([_kernel("a", "sched"), _kernel("b", "direct"), _kernel("c", "newer")])
    kernels = asyncio.run(_ps(agent, HostTarget("h", launchers=["direct"])))  # type: ignore[arg-type]
    assert agent.asked == [[], ["sched"]]
    assert kernels[0]["queue"] == "batch"


def test_ps_does_not_ask_again_for_direct_kernels() -> None:
    agent = _PsAgent([_kernel("b", "direct")])
    asyncio.run(_ps(agent, HostTarget("h")))  # type: ignore[arg-type]
    assert agent.asked == [[]]


def test_ps_table_columns_come_from_the_launchers(sched: Any) -> None:
    hosts = [
        HostKernels(
            "h",
            [
                _kernel("a", "sched", queue="batch"),
                _kernel("b", "direct"),
                _kernel("c", "slurm", job_id="7", node="n1", slurm_state="RUNNING"),
                _kernel("d", "newer"),
                _kernel("e", "sge", job_id="9", node="n2", sge_state="PENDING", sge_reason="hqw"),
            ],
        )
    ]
    header, *rows = ps_table(hosts)
    # registry order; the batch launchers share their columns
    assert header[9:] == ["JOB ID", "NODE", "JOB STATE", "QUEUE"]
    assert [row[9:] for row in rows] == [
        ["-", "-", "-", "batch"],
        ["-", "-", "-", "-"],
        ["7", "n1", "RUNNING", "-"],
        ["-", "-", "-", "-"],
        ["9", "n2", "PENDING (hqw)", "-"],
    ]
    assert ps_table([HostKernels("h", [_kernel("b", "direct")])])[0][-1] == "PORTS"


def test_ps_shows_the_forwarded_web_ports() -> None:
    """PORTS: what the local side forwards (remote -> local), and ports the agent found
    that nobody forwards (->?); `sshpyk ports` lists the same rows with their URLs."""
    kernel = _kernel(
        "a",
        "direct",
        ports=[{"port": 6006, "host": "127.0.0.1"}, {"port": 8787, "host": "::1"}],
        forwards=[
            {
                "remote": "127.0.0.1:6006",
                "remote_port": 6006,
                "local": 6006,
                "url": "http://127.0.0.1:6006",
                "auto": True,
            },
            {
                "remote": "db:5432",
                "remote_port": 5432,
                "local": 15432,
                "url": "http://127.0.0.1:15432",
                "auto": False,
            },
        ],
    )
    header, row = ps_table([HostKernels("h", [kernel])])
    assert header[8] == "PORTS"
    assert row[8] == "6006->6006, db:5432->15432, 8787->?"
    assert [f["url"] for f in forwarded(kernel)] == [
        "http://127.0.0.1:6006",
        "http://127.0.0.1:15432",
        None,
    ]
    assert forwarded(kernel)[2]["remote"] == "[::1]:8787"
    assert ps_table([HostKernels("h", [_kernel("b", "direct")])])[1][8] == "-"


def test_host_targets_name_the_launchers_of_the_kernelspecs() -> None:
    specs = [
        SSHKernelSpec(name="a", ssh_host_alias="h", launcher="slurm"),
        SSHKernelSpec(name="b", ssh_host_alias="h"),
        SSHKernelSpec(name="c", ssh_host_alias="h", launcher="slurm"),
    ]
    (target,) = host_targets([], specs)
    assert target.launchers == ["slurm", "direct"]


def test_list_json_reports_each_launcher_check_under_its_field() -> None:
    slurm = KernelStatus(launcher=Status.OK, launcher_name="slurm").as_dict()
    direct = KernelStatus(launcher_name="direct").as_dict()
    assert list(slurm) == [
        "ssh_host_alias",
        "remote_python",
        "remote_kernel_name",
        "sge_args",
        "slurm_args",
        "remote",
        "error",
        "seconds",
    ]
    assert (slurm["slurm_args"], direct["slurm_args"]) == ("ok", "skip")
    assert (slurm["sge_args"], direct["sge_args"]) == ("skip", "skip")
    assert list(direct) == list(slurm)


def test_a_hosts_error_prints_without_its_control_characters(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """What a remote host said goes to the terminal escaped, every host's error on one
    line (the last as the command's error)."""
    import click

    from sshpyk.cli.common import fail_hosts

    hosts = [
        HostKernels("a", [], error="first\x1b[2Jcleared"),
        HostKernels("b", [], error="second\nline\x07"),
    ]
    with pytest.raises(click.ClickException) as caught:
        fail_hosts(hosts)
    assert caught.value.message == "second\\nline\\x07"
    assert capsys.readouterr().err == "Error: first\\x1b[2Jcleared\n"

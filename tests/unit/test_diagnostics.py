"""The diagnostics layer without SSH: the transport check's verdicts per launcher, the
launcher's own stage, its fixes chosen by error class (never by message text), the
runner skipping what follows a failure, and SLURM kernelspecs accepting ipc."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncssh
import pytest

from sshpyk.diagnostics.check import STAGES, CheckTarget, Status, run_check, stages_for
from sshpyk.diagnostics.forwarding import _ipc_result, expected_transport, stage_forwarding
from sshpyk.diagnostics.launch import stage_launcher
from sshpyk.diagnostics.report import Diagnosis, StageFailedError, StageResult
from sshpyk.errors import RemoteError, SlurmArgsError, SlurmMissingError
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

    async def slurm_info(self, args: list[str] | None = None) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        return {"version": "slurm 22.05", "srun": "/usr/bin/srun", "partitions": []}


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (SlurmMissingError("srun not found on the PATH"), "module load slurm"),
        (SlurmArgsError("srun rejects the SLURM arguments"), "--slurm-args"),
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

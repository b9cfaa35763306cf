"""The SLURM modules' pure parts (sshpyk/agent/remote/slurmctl.py, slurm.py, with
batch.py's shared part), no SSH
and no SLURM: durations, squeue's output, what ``ps`` adds, what ``kill`` does with a
record, with SLURM's commands replaced by canned answers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from sshpyk.agent.remote import batchjobs, launcher, records, slurm, slurmctl
from sshpyk.agent.remote.protocol import AgentError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("59", 59),
        ("1:00", 60),
        ("2:03:04", 7384),
        ("1-00:00:01", 86401),
        ("UNLIMITED", None),
        ("NOT_SET", None),
        ("1:2:3:4", None),
        ("x-1:00", None),
        ("", None),
    ],
)
def test_parse_duration(text: str, seconds: int | None) -> None:
    assert slurmctl.parse_duration(text) == seconds


class Canned:
    """slurm_command's stand-in: answers by the command's name, records the calls."""

    def __init__(self, answers: dict[str, tuple[int, str, str]]) -> None:
        self.answers = answers
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str], timeout: float = 0) -> tuple[int, str, str]:
        self.calls.append([str(a) for a in argv])
        return self.answers[argv[0] + (" " + argv[1] if argv[1].startswith("--") else "")]


def test_squeue_parsing_and_ps_states(monkeypatch: pytest.MonkeyPatch) -> None:
    out = "12|PENDING|Resources||INVALID\n13|RUNNING|None|node1|1:00:00\nbroken line\n"
    canned = Canned({"squeue": (0, out, "")})
    monkeypatch.setattr(slurmctl, "slurm_command", canned)
    jobs = slurmctl.squeue_jobs(["12", None, "13"])
    assert canned.calls[0][:4] == ["squeue", "-h", "-j", "12,13"]
    assert jobs == {
        "12": {"state": "PENDING", "reason": "Resources", "node": None, "time_left": None},
        "13": {"state": "RUNNING", "reason": "", "node": "node1", "time_left": 3600},
    }
    kernels = [
        {"launcher": "slurm", "job_id": "13"},
        {"launcher": "slurm", "job_id": "99"},
        {"launcher": "slurm", "alive": True},
    ]
    records.annotate(kernels, {"slurm": slurm.SlurmKernel})
    assert [(k["slurm_state"], k.get("node")) for k in kernels] == [
        ("RUNNING", "node1"),
        ("GONE", None),
        ("SUBMITTING", None),
    ]
    assert slurmctl.squeue_jobs([]) == {}


def test_squeue_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        slurmctl, "slurm_command", Canned({"squeue": (1, "", "Invalid job id specified")})
    )
    assert slurmctl.squeue_jobs(["5"]) == {}  # finished and purged
    monkeypatch.setattr(
        slurmctl, "slurm_command", Canned({"squeue": (1, "", "x\nslurmctld is down\n")})
    )
    with pytest.raises(AgentError) as err:
        slurmctl.squeue_jobs(["5"])
    assert err.value.kind == "slurm_error" and "slurmctld is down" in err.value.message
    kernels = [{"launcher": "slurm", "job_id": "5"}]
    slurm.SlurmKernel.annotate(kernels)
    assert kernels[0]["slurm_state"] == "UNKNOWN"


def test_slurm_info(monkeypatch: pytest.MonkeyPatch) -> None:
    canned = Canned(
        {
            "sinfo --version": (0, "slurm 23.02.1\n", ""),
            "sinfo": (0, "debug*|up|1|idle\n", ""),
            "srun --test-only": (1, "", "srun: error: invalid partition\n"),
        }
    )
    monkeypatch.setattr(slurmctl, "slurm_command", canned)
    info = slurm.SlurmKernel.probe(None)
    assert info["version"] == "slurm 23.02.1"
    assert info["partitions"] == [
        {"partition": "debug*", "avail": "up", "nodes": "1", "state": "idle"}
    ]
    with pytest.raises(AgentError) as err:
        slurm.SlurmKernel.probe(["-p", "nope"])
    assert err.value.kind == "slurm_args" and "invalid partition" in err.value.message


def test_a_missing_command_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(AgentError) as err:
        slurmctl.slurm_command(["squeue"])
    assert err.value.kind == "slurm_missing" and "module load slurm" in err.value.message


def test_kill_record_acts_on_jobs_of_our_uid_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    done: list[tuple[str, Any]] = []
    monkeypatch.setattr(
        slurm.SlurmKernel, "terminate_job", classmethod(lambda c, i: done.append(("term", i)))
    )
    monkeypatch.setattr(
        slurm.SlurmKernel, "cancel", classmethod(lambda c, j, wait=0: done.append(("cancel", j)))
    )
    mine = {"launcher": "slurm", "job_id": "7", "uid": os.getuid(), "run_dir": str(tmp_path)}
    assert slurm.SlurmKernel.kill_record(mine, 0) == []
    assert done == [("cancel", "7")]  # no verified srun: the job is still cancelled
    done.clear()
    theirs = dict(mine, uid=os.getuid() + 1)
    (error,) = slurm.SlurmKernel.kill_record(theirs, 0)
    assert "SLURM job 7 of uid" in error and "not cancelled" in error and done == []
    assert records.record_launcher(mine, {"slurm": slurm.SlurmKernel}) is slurm.SlurmKernel
    assert records.record_launcher(mine, {}) is None
    assert slurm.SlurmKernel.sweep_kills and not launcher.LAUNCHERS["direct"].sweep_kills


def test_srun_job_lines() -> None:
    match = slurmctl._SRUN_JOB_RE.search("srun: job 42 queued and waiting for resources")
    assert match and match.group(1) == "42"
    assert slurmctl._SRUN_JOB_RE.search("srun: job 43 has been allocated resources")
    assert batchjobs.last_line("a\n\n b \n\n") == "b" and batchjobs.last_line(None) == ""

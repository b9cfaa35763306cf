"""The Grid Engine module's pure parts (sshpyk/agent/remote/sge.py) and the qsub
arguments of the local side, no SSH and no Grid Engine: qstat's XML, job states and
time left, the arguments sshpyk sets itself."""

from __future__ import annotations

import time

import pytest

from sshpyk.agent.remote import sge
from sshpyk.errors import SSHPykError
from sshpyk.kernels.sge import parse_sge_args

QSTAT = """<?xml version='1.0'?>
<job_info>
  <queue_info>
    <job_list state="running">
      <JB_job_number>7</JB_job_number>
      <JB_name>sshpyk-abc</JB_name>
      <JB_owner>alice</JB_owner>
      <state>r</state>
      <JAT_start_time>{start}</JAT_start_time>
      <queue_name>gpu.q@node3</queue_name>
      <hard_request name="h_rt" resource_contribution="0.000000">3600</hard_request>
    </job_list>
    <job_list state="running">
      <JB_job_number>7</JB_job_number>
      <state>r</state>
      <queue_name>gpu.q@node4</queue_name>
    </job_list>
  </queue_info>
  <job_info>
    <job_list state="pending">
      <JB_job_number>8</JB_job_number>
      <JB_name>other</JB_name>
      <JB_owner>bob</JB_owner>
      <state>hqw</state>
      <queue_name></queue_name>
    </job_list>
    <job_list state="pending">
      <JB_job_number>9</JB_job_number>
      <state>qw</state>
    </job_list>
  </job_info>
</job_info>
"""


def test_qstat_xml_gives_states_hosts_and_time_left() -> None:
    now = float(int(time.time()))  # qstat's start times are whole seconds
    start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now - 600))
    jobs = sge.parse_qstat(QSTAT.format(start=start), now=now)
    assert jobs["7"] == {
        "state": "RUNNING",
        "reason": "",
        "node": "node3",  # the first queue instance of a parallel job: its master's
        "time_left": 3000,
        "name": "sshpyk-abc",
        "owner": "alice",
    }
    held, queued = jobs["8"], jobs["9"]
    assert (held["state"], held["reason"], held["node"]) == ("PENDING", "hqw", None)
    assert (queued["state"], queued["reason"], queued["time_left"]) == ("PENDING", "", None)


@pytest.mark.parametrize(
    ("code", "state"),
    [
        ("qw", "PENDING"),
        ("hqw", "PENDING"),
        ("r", "RUNNING"),
        ("t", "RUNNING"),
        ("Rr", "RUNNING"),
        ("dr", "DELETING"),
        ("Eqw", "ERROR"),
        ("s", "SUSPENDED"),
        ("S", "SUSPENDED"),
    ],
)
def test_job_states(code: str, state: str) -> None:
    assert sge.job_state(code) == state


def test_the_task_needs_a_parallel_environment() -> None:
    assert sge.parallel_environment(["-q", "a.q", "-pe", "smp", "4"]) == "smp"
    assert sge.parallel_environment(["-q", "a.q"]) is None
    with pytest.raises(sge.AgentError) as err:
        sge.check_args(["-l", "h_rt=60"])
    assert err.value.kind == "sge_args" and "-pe smp 1" in err.value.message


def test_a_missing_command_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(sge.AgentError) as err:
        sge.sge_command(["qstat"])
    assert err.value.kind == "sge_missing" and "settings.sh" in err.value.message


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("-pe smp 1 -t 1-4", "-t is set by sshpyk (a kernel is one job"),
        ("-pe smp 1 -o /tmp/x", "-o is set by sshpyk"),
        ("-N mine -pe smp 1", "-N is set by sshpyk"),
        ("-pe smp 1 -q 'a.q", "No closing quotation"),
    ],
)
def test_arguments_sshpyk_sets_are_refused(text: str, words: str) -> None:
    with pytest.raises(SSHPykError, match="--sge-args") as err:
        parse_sge_args(text)
    assert words in str(err.value)


def test_arguments_that_only_start_like_a_managed_one_are_taken() -> None:
    # -tc, -now's cousins: SGE's options are whole words, never -t with a value attached
    assert parse_sge_args("-pe smp 4 -tc 2 -l h_rt=04:00:00 -q gpu.q") == [
        "-pe", "smp", "4", "-tc", "2", "-l", "h_rt=04:00:00", "-q", "gpu.q",
    ]  # fmt: skip

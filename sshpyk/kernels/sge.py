"""The Grid Engine launcher, local side: its options, words and ``check`` answer; the
rest is every batch scheduler's (:mod:`sshpyk.kernels.batch`).

With ``launcher: sge`` the remote agent runs on a submit host of a Grid Engine cluster
(Son of Grid Engine, or one with the same commands): each kernel holds a job
(``qsub``, kept across its restarts) and runs as a task of it on its execution host
(``qrsh -inherit``; ``sshpyk.agent.remote.sge`` says why). The job needs a parallel
environment whose tasks it controls: ``--sge-args "-pe smp 1 ..."``.
"""

from __future__ import annotations

from typing import Any

from ..values import parse_job_args
from .batch import BatchLauncher, batch_error_kinds, batch_options
from .launcher import register

__all__ = ["SgeLauncher", "parse_sge_args"]

_SLOT = "the job holds the kernel's slots: sshpyk submits and names it"
#: qsub options sshpyk sets itself, and why a user may not
_QSUB_MANAGED = {
    "-N": _SLOT,
    "-b": _SLOT,
    "-terse": "sshpyk reads the job id",
    "-sync": "sshpyk waits for the job itself",
    "-now": "sshpyk waits for the job itself",
    "-w": "sshpyk verifies the request (-w e at submission, -w v in sshpyk check)",
    "-t": "a kernel is one job, not an array",
    "-o": "the holding job has no output: the kernel's log is in its run dir",
    "-e": "the holding job has no output: the kernel's log is in its run dir",
    "-j": "the holding job has no output: the kernel's log is in its run dir",
    "-@": "give the options themselves",
}


def parse_sge_args(text: str) -> list[str]:
    """The qsub arguments in ``sge_args`` (shell quoting), or SSHPykError with the
    reason (an option sshpyk sets itself)."""
    return parse_job_args(text, "--sge-args", _QSUB_MANAGED, attached=False)


def _queues(info: dict[str, Any]) -> str:
    return ", ".join(
        f"{q.get('queue')} {q.get('available')}/{q.get('total')} free"
        for q in info.get("queues") or []
    )


@register
class SgeLauncher(BatchLauncher):
    """Runs the kernel as a task of a Grid Engine job from a submit host."""

    name = "sge"
    help = (
        "the host submits to Grid Engine and each kernel runs in a job (qsub, then qrsh "
        "-inherit) on an execution host"
    )
    options = batch_options(
        "sge",
        "Grid Engine",
        args_help="qsub options for --launcher sge, e.g. "
        '"-q gpu.q -l h_rt=04:00:00 -pe smp 4": a parallel environment whose '
        "control_slaves is TRUE is needed (the kernel runs as a task of the job).",
        parse=parse_sge_args,
    )
    error_kinds = batch_error_kinds("sge")
    remote_modules = (*BatchLauncher.remote_modules, "sge")
    scheduler = "Grid Engine"
    runs_as = "qrsh -inherit in a job held on the login node"
    args_example = '"-pe smp 1 -q ..."'
    module_name = "gridengine"
    status_command = "qstat -f"
    busy_hint = "a less busy queue (`qstat -g c`)"

    def command_tail(self, spec: Any) -> str:
        args = f"{spec.sge_args} " if spec.sge_args else ""
        return f" -> qsub {args}+ qrsh -inherit {spec.remote_python} <sshpyk node>"

    def host_summary(self, info: dict[str, Any]) -> str:
        """Grid Engine's version, qsub, the queues, what ``qsub -w v`` said."""
        summary = f"{info.get('version')}, qsub at {info.get('qsub')}"
        summary += f"; queues: {_queues(info) or 'none'}"
        if info.get("test"):
            summary += f"; {info['test']}"
        return summary

    def host_line(self, info: dict[str, Any]) -> str:
        return f"{info.get('version')}; queues: {_queues(info) or 'none'}"

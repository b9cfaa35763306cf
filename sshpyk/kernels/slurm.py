"""The SLURM launcher, local side: SLURM's options, words and ``check`` answer; the
rest is every batch scheduler's (:mod:`sshpyk.kernels.batch`).

With ``launcher: slurm`` the remote agent runs on the login node and submits each
kernel with ``salloc`` and ``srun`` (``sshpyk.agent.remote.slurm`` says why srun and
not sbatch).
"""

from __future__ import annotations

from typing import Any

from ..values import parse_job_args
from .batch import BatchLauncher, batch_error_kinds, batch_options
from .launcher import register

__all__ = ["SlurmLauncher", "parse_slurm_args"]

_STDIO = "the kernel's stdio is how sshpyk drives it"
#: srun options sshpyk sets itself, and why a user may not
_SRUN_MANAGED = {
    "--input": _STDIO,
    "-i": _STDIO,
    "--output": _STDIO,
    "-o": _STDIO,
    "--error": _STDIO,
    "-e": _STDIO,
    "--pty": _STDIO,
    "--unbuffered": _STDIO,
    "-u": _STDIO,
    "--label": _STDIO,
    "-l": _STDIO,
    "--multi-prog": "a kernel is one program",
    "--ntasks": "a kernel is one task",
    "-n": "a kernel is one task",
    "--test-only": "sshpyk check runs srun --test-only",
}


def parse_slurm_args(text: str) -> list[str]:
    """The srun arguments in ``slurm_args`` (shell quoting), or SSHPykError with the
    reason (an option sshpyk sets itself)."""
    return parse_job_args(text, "--slurm-args", _SRUN_MANAGED)


def _partitions(info: dict[str, Any]) -> str:
    return ", ".join(
        f"{p.get('partition')} {p.get('avail')} ({p.get('nodes')} {p.get('state')})"
        for p in info.get("partitions") or []
    )


@register
class SlurmLauncher(BatchLauncher):
    """Runs the kernel as a SLURM job (``srun``) from a login node."""

    name = "slurm"
    help = "the host is a login node and each kernel runs as a SLURM job (srun) on a compute node"
    options = batch_options(
        "slurm",
        "SLURM",
        args_help="srun options for --launcher slurm, e.g. "
        '"--partition=gpu --gres=gpu:1 --time=04:00:00".',
        parse=parse_slurm_args,
    )
    error_kinds = batch_error_kinds("slurm")
    remote_modules = (*BatchLauncher.remote_modules, "slurmctl", "slurm")
    scheduler = "SLURM"
    runs_as = "srun on the login node"
    args_example = '"--partition=..."'
    module_name = "slurm"
    status_command = "sinfo"
    busy_hint = "a less busy partition (`sinfo`)"

    def host_summary(self, info: dict[str, Any]) -> str:
        """SLURM's version, srun, the partitions, what ``srun --test-only`` said."""
        summary = f"{info.get('version')}, srun at {info.get('srun')}"
        summary += f"; partitions: {_partitions(info) or 'none'}"
        if info.get("test"):
            summary += f"; {info['test']}"
        return summary

    def host_line(self, info: dict[str, Any]) -> str:
        return f"{info.get('version')}; partitions: {_partitions(info) or 'none'}"

"""The SLURM launcher, login node side: each kernel holds a SLURM allocation (salloc,
kept across its restarts: batch.Allocation) and runs as a job step in it (``srun
--jobid``); on the compute node the same modules run in node mode (node.py). What
every scheduler shares is batch.py's; SLURM's commands are slurmctl.py's.
"""

import os
import sys

from .batch import BatchKernel
from .batchjobs import COMMAND_TIMEOUT, GONE_WAIT, Allocation, spawn_holder
from .launcher import register
from .slurmctl import (
    _SRUN_JOB_RE,
    HOLDER,
    scancel,
    slurm_command,
    slurm_info,
    slurm_job_by_name,
    squeue_jobs,
)


@register
class SlurmKernel(BatchKernel):
    """A kernel run as a SLURM job: ``srun`` here on the login node, the kernel on a
    compute node, where the same modules run in node mode (node.py).

    Why srun and not sbatch:

    - srun's stdin reaches the job: the node side's code and the HMAC key travel over
      it (no shared file system needed; the key is never stored by SLURM as an sbatch
      script or an ``--export`` value would be), then signal and stop requests; srun's
      stdout brings the node's events back. One SSH connection, no extra files.
    - the step lives as long as srun, a child of this agent: if the agent dies, even by
      SIGKILL, srun's stdin ends, the node side stops the kernel and the step ends, and
      so does the allocation (salloc's command waits for a pipe from the agent). A batch
      job would run on, holding its allocation, until its time limit.
    - the kernel starts ~0.1 s after submission when resources are free; a batch job
      waits for the scheduler's batch cycle.

    Signals never go to srun itself (a SIGINT makes it print the step's status, a second
    one within a second kills the step): they travel over srun's stdin (batch.py),
    without a round trip through slurmctld (scancel --signal).
    """

    name = "slurm"
    scheduler = "SLURM"
    status_command = "sinfo"
    step_program = "srun"

    def submit(self, args, env):
        """salloc, whose command (on the login node) holds the allocation until its
        stdin, a pipe from the agent, ends (HOLDER)."""
        salloc = self.program("salloc")
        command = [salloc, "--job-name=" + self.job_name] + args + [sys.executable, "-c", HOLDER]
        return Allocation(spawn_holder(command, env, self.cwd), type(self))

    def await_allocation(self, log):
        """salloc's stderr, to the log: its job id, then "Granted job allocation"."""
        allocation = self.allocation
        for line in iter(allocation.proc.stderr.readline, b""):
            log.write(line)
            log.flush()
            text = line.decode("utf-8", "replace")
            match = _SRUN_JOB_RE.search(text)
            if match and allocation.job_id is None:
                allocation.job_id = self.job_id = match.group(1) or match.group(2)
                self.write_info()
            if "granted job allocation" in text.lower():
                return True
        return False  # salloc ended without an allocation (revoked, rejected)

    def step_command(self, program):
        """srun --jobid: the kernel's job step, its stdio the JSON control lines."""
        return [
            self.step_path,
            "--jobid=" + str(self.allocation.job_id),
            "--job-name=" + self.job_name,
            "--ntasks=1",
        ] + program

    @classmethod
    def command(cls, argv, timeout=COMMAND_TIMEOUT):
        return slurm_command(argv, timeout)

    @classmethod
    def jobs(cls, job_ids):
        return squeue_jobs(job_ids)

    @classmethod
    def job_by_name(cls, name):
        return slurm_job_by_name(name)

    @classmethod
    def cancel(cls, job_id, wait=GONE_WAIT):
        """scancel, then wait (bounded) until the job leaves squeue."""
        scancel(job_id, wait)

    @classmethod
    def terminate_job(cls, info):
        """SIGTERM to the processes of the job (scancel --signal=TERM), not to srun,
        which would SIGKILL the step at once."""
        slurm_command(["scancel", "--signal=TERM", str(info["job_id"])])
        return True

    @classmethod
    def probe(cls, args):
        """For ``probe``: is SLURM usable here (see slurmctl.slurm_info)."""
        return slurm_info(args)

    @classmethod
    def node_facts(cls):
        """SLURM's environment of the job step on the compute node."""
        env = os.environ
        return {
            "node": env.get("SLURMD_NODENAME"),
            "job_id": env.get("SLURM_JOB_ID"),
            "step_id": env.get("SLURM_STEP_ID"),
            "launch_addr": env.get("SLURM_LAUNCH_NODE_IPADDR"),
        }

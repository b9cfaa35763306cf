"""SLURM's client commands as the agent uses them (sinfo, srun --test-only, squeue,
scancel), each bounded by batchjobs.COMMAND_TIMEOUT, and the parsing of their output.
They block: the agent calls them from worker threads and launcher threads only."""

import os
import re
import shutil
import time

from .batchjobs import COMMAND_TIMEOUT, GONE_WAIT, last_line, scheduler_command
from .protocol import AgentError

#: what to do when SLURM's commands are missing
INSTALL_HINT = "load it in the pre-command, e.g. 'module load slurm'"
#: job states after which nothing of the job runs any more
SLURM_ENDED = frozenset(
    (
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    )
)
#: srun's and salloc's "job N queued", "Pending/Granted job allocation N"
_SRUN_JOB_RE = re.compile(
    r"job (\d+) (?:queued|has been allocated)|job allocation (\d+)", re.IGNORECASE
)
_SQUEUE_FORMAT = "%i|%T|%r|%N|%L"


def slurm_command(argv, timeout=COMMAND_TIMEOUT):
    """Run a SLURM client command: (exit code, stdout, stderr); AgentError
    ``slurm_missing`` if it is not found, ``slurm_error`` if it does not run."""
    return scheduler_command("slurm", "SLURM", INSTALL_HINT, argv, timeout)


def parse_duration(text):
    """Seconds in a SLURM duration ([days-]hours:minutes:seconds, minutes:seconds, ...);
    None for UNLIMITED, NOT_SET, INVALID or anything else."""
    days = 0
    if "-" in text:
        head, text = text.split("-", 1)
        if not head.isdigit():
            return None
        days = int(head)
    parts = text.split(":")
    if not parts or not all(p.isdigit() for p in parts) or len(parts) > 3:
        return None
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + int(part)
    return days * 86400 + seconds


def squeue_jobs(job_ids):
    """{job id: {state, reason, node, time_left}} for the jobs SLURM still lists."""
    ids = [str(j) for j in job_ids if j]
    if not ids:
        return {}
    code, out, err = slurm_command(["squeue", "-h", "-j", ",".join(ids), "-o", _SQUEUE_FORMAT])
    if code != 0:
        if "invalid job id" in err.lower():
            return {}  # finished and purged
        raise AgentError("slurm_error", "squeue failed: %s" % (last_line(err) or code))
    jobs = {}
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 5:
            continue
        job_id, state, reason, node, left = parts
        jobs[job_id] = {
            "state": state,
            "reason": "" if reason == "None" else reason,
            "node": node or None,
            "time_left": parse_duration(left),
        }
    return jobs


def slurm_job_by_name(name):
    """The id of this user's newest job called ``name``, or None."""
    code, out, _ = slurm_command(["squeue", "-h", "-u", str(os.getuid()), "-n", name, "-o", "%i"])
    ids = [line.strip() for line in out.splitlines() if line.strip().isdigit()]
    return ids[-1] if code == 0 and ids else None


def scancel(job_id, wait=GONE_WAIT):
    """Cancel a job unless it ended already, then wait (bounded) until it is gone."""
    jobs = squeue_jobs([job_id])
    if str(job_id) not in jobs or jobs[str(job_id)]["state"] in SLURM_ENDED:
        return
    slurm_command(["scancel", str(job_id)])
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        jobs = squeue_jobs([job_id])
        if str(job_id) not in jobs or jobs[str(job_id)]["state"] in SLURM_ENDED:
            return
        time.sleep(0.1)


def slurm_info(args):
    """Is SLURM usable from here: version, srun's path, partitions, and whether srun
    accepts ``args`` (AgentError ``slurm_args`` if not)."""
    _, out, err = slurm_command(["sinfo", "--version"])
    version = out.strip() or last_line(err)
    code, out, err = slurm_command(["sinfo", "-h", "-o", "%P|%a|%D|%T"])
    if code != 0:
        raise AgentError("slurm_error", "sinfo failed: %s" % (last_line(err) or code))
    partitions = []
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4:
            partitions.append(dict(zip(("partition", "avail", "nodes", "state"), parts)))
    test = None
    if args is not None:
        srun = ["srun", "--test-only"] + [str(a) for a in args] + ["--ntasks=1", "true"]
        code, out, err = slurm_command(srun)
        test = last_line(err) or last_line(out)
        if code != 0:
            raise AgentError(
                "slurm_args", "srun rejects the SLURM arguments %r: %s" % (" ".join(args), test)
            )
    return {
        "version": version,
        "srun": shutil.which("srun"),
        "partitions": partitions,
        "test": test,
    }


#: salloc's command on the login node: hold the allocation until stdin (a pipe from the
#: agent) ends, then until the kernel's step ended (its node side cleans up on its own
#: stdin's end: its run dir, with the key), at most 10 s
HOLDER = """
import os, subprocess, sys, time
sys.stdin.buffer.read()
end = time.monotonic() + 10
while time.monotonic() < end:
    try:
        out = subprocess.run(["squeue", "-h", "-s", "-j", os.environ["SLURM_JOB_ID"],
            "-o", "%i"], capture_output=True, timeout=5).stdout.decode().split()
    except Exception:
        break
    if not [s for s in out if s.split(".")[-1].isdigit()]:
        break
    time.sleep(0.2)
"""

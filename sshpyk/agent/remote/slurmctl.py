"""SLURM's client commands as the agent uses them (sinfo, srun --test-only, squeue,
scancel), each bounded by SLURM_COMMAND_TIMEOUT, and the parsing of their output.
They block: the agent calls them from worker threads and launcher threads only."""

import os
import re
import shutil
import subprocess
import sys
import threading
import time

from .paths import remove_tree
from .procgroup import TERM_WAIT, pid_alive, stop_group
from .protocol import AgentError, Kind

#: seconds between squeue polls while a job is pending
SLURM_POLL = 2.0
#: bound on every SLURM client command (slurmctld may be slow or down)
SLURM_COMMAND_TIMEOUT = 15.0
#: after scancel, how long to wait for the job to leave the queue
SLURM_GONE_WAIT = 15.0
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


def last_line(text):
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def slurm_command(argv, timeout=SLURM_COMMAND_TIMEOUT):
    """Run a SLURM client command: (exit code, stdout, stderr); AgentError if missing."""
    path = shutil.which(argv[0])
    if path is None:
        raise AgentError(
            Kind.SLURM_MISSING,
            "%s not found on the PATH of the login node (is SLURM installed? load it in "
            "the pre-command, e.g. 'module load slurm')" % argv[0],
        )
    try:
        done = subprocess.run(
            [path] + [str(a) for a in argv[1:]],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise AgentError(
            Kind.SLURM_ERROR, "%s did not answer within %gs" % (argv[0], timeout)
        ) from None
    except OSError as exc:
        raise AgentError(Kind.SLURM_ERROR, "cannot run %s: %s" % (argv[0], exc)) from None
    return (
        done.returncode,
        done.stdout.decode("utf-8", "replace"),
        done.stderr.decode("utf-8", "replace"),
    )


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
        raise AgentError(Kind.SLURM_ERROR, "squeue failed: %s" % (last_line(err) or code))
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


def scancel(job_id, wait=SLURM_GONE_WAIT):
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


def slurm_states(kernels):
    """Add the SLURM state of each SLURM kernel found by ``scan_kernels`` (one squeue)."""
    mine = [k for k in kernels if k.get("launcher") == "slurm"]
    if not mine:
        return kernels
    try:
        jobs = squeue_jobs([k.get("job_id") for k in mine])
    except AgentError as exc:
        jobs = None
        error = exc.message
    for k in mine:
        if jobs is None:
            k["slurm_state"], k["slurm_reason"] = "UNKNOWN", error
        elif not k.get("job_id"):
            k["slurm_state"], k["slurm_reason"] = "SUBMITTING" if k.get("alive") else "GONE", ""
        else:
            job = jobs.get(str(k["job_id"]))
            k["slurm_state"] = job["state"] if job else "GONE"
            k["slurm_reason"] = job["reason"] if job else ""
            k["time_left"] = job["time_left"] if job else None  # seconds; None: no limit
            if job and job["node"]:
                k["node"] = job["node"]
    return kernels


def slurm_info(args):
    """Is SLURM usable from here: version, srun's path, partitions, and whether srun
    accepts ``args`` (AgentError ``slurm_args`` if not)."""
    _, out, err = slurm_command(["sinfo", "--version"])
    version = out.strip() or last_line(err)
    code, out, err = slurm_command(["sinfo", "-h", "-o", "%P|%a|%D|%T"])
    if code != 0:
        raise AgentError(Kind.SLURM_ERROR, "sinfo failed: %s" % (last_line(err) or code))
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
                Kind.SLURM_ARGS, "srun rejects the SLURM arguments %r: %s" % (" ".join(args), test)
            )
    return {
        "version": version,
        "srun": shutil.which("srun"),
        "partitions": partitions,
        "test": test,
    }


def terminate_kernel_job(info):
    """For `sshpyk kill`: SIGTERM to the processes of a SLURM kernel's job, then wait
    (bounded) for its srun to exit. Not to srun, which would SIGKILL the step at once:
    the node side handles SIGTERM by stopping the kernel and removing its run dir."""
    job_id = info.get("job_id")
    pid = int(info.get("pid") or 0)
    if not job_id or pid <= 1:
        return
    try:
        slurm_command(["scancel", "--signal=TERM", str(job_id)])
    except AgentError:
        return
    deadline = time.monotonic() + TERM_WAIT + 5
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def cancel_kernel_job(info):
    """For `sshpyk kill`: scancel the job of a SLURM kernel found by ``scan_kernels``,
    and remove its relay sockets' directory if they were not in its run dir."""
    socket_dir = info.get("socket_dir")
    if socket_dir and os.path.basename(str(socket_dir)).startswith("sshpyk-"):
        remove_tree(str(socket_dir))  # only a private dir of ours
    try:
        job_id = info.get("job_id")
        if not job_id and info.get("job_name"):
            job_id = slurm_job_by_name(str(info["job_name"]))
        if job_id:
            scancel(job_id)
    except AgentError:
        pass


#: seconds a stopped kernel's allocation waits for its restart before it is released
HOLD_TIMEOUT = 60.0
_held: dict = {}
_held_lock = threading.Lock()


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


class Allocation:
    """A SLURM allocation held by the agent: ``salloc`` whose command (on the login
    node) waits for the end of its stdin, a pipe from the agent: the allocation ends
    when released (scancel), when its time limit ends it, or when the agent is gone
    (even SIGKILLed: the pipe closes, salloc relinquishes). Each kernel start in it is
    a job step (``srun --jobid``), so a restart does not queue again."""

    def __init__(self, proc):
        self.proc = proc
        self.job_id = None
        self.timer = None
        self.released = False

    @classmethod
    def request(cls, slurm_args, job_name, cwd, env):
        command = (
            ["salloc", "--job-name=" + job_name]
            + [str(a) for a in slurm_args]
            + [sys.executable, "-c", HOLDER]
        )
        salloc = shutil.which("salloc")
        if salloc is None:
            slurm_command(["salloc"])  # raises the clear "not found" error
        command[0] = salloc
        try:
            proc = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                cwd=cwd,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise AgentError(Kind.LAUNCH_FAILED, "cannot start %s: %s" % (salloc, exc)) from None
        return cls(proc)

    def alive(self):
        """Still granted: salloc runs and squeue says RUNNING (a bounded squeue)."""
        if self.released or self.proc.poll() is not None or not self.job_id:
            return False
        try:
            job = squeue_jobs([self.job_id]).get(str(self.job_id))
        except AgentError:
            return False
        return job is not None and job["state"] == "RUNNING"

    def release(self):
        """End the allocation (idempotent; bounded): scancel, then salloc's group."""
        if self.timer is not None:
            self.timer.cancel()
        if self.released:
            return
        self.released = True
        try:
            if self.job_id is not None:
                scancel(self.job_id)
        except AgentError:
            pass
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        stop_group(self.proc.pid, self.proc, term_wait=5.0, kill_wait=2.0)


def hold(kid, allocation):
    """Keep ``allocation`` for the next launch of ``kid``, at most HOLD_TIMEOUT s."""
    allocation.timer = threading.Timer(HOLD_TIMEOUT, lambda: _expire(kid, allocation))
    allocation.timer.daemon = True
    with _held_lock:
        previous = _held.pop(kid, None)
        _held[kid] = allocation
    if previous is not None and previous is not allocation:
        previous.release()
    allocation.timer.start()


def _expire(kid, allocation):
    with _held_lock:
        if _held.get(kid) is allocation:
            del _held[kid]
    allocation.release()


def take_held(kid):
    """The allocation held for ``kid`` (now the caller's), or None."""
    with _held_lock:
        allocation = _held.pop(kid, None)
    if allocation is not None and allocation.timer is not None:
        allocation.timer.cancel()
    return allocation

"""The Grid Engine launcher, login host side (Son of Grid Engine, and the Grid Engines
that share its commands): each kernel holds a job (``qsub``: a placeholder that runs
until it is deleted, kept across the kernel's restarts: batchjobs.Allocation) and runs
as a task of it on its execution host (``qrsh -inherit``, the tight integration of a
parallel environment), where the same modules run in node mode (node.py). What every
scheduler shares is batch.py's and batchjobs.py's.

Why a holding job and ``qrsh -inherit``, and not ``qrsh`` alone: a task's stdin and
stdout reach the node side (the code, the HMAC key and the relay secret travel there,
never stored by Grid Engine; the control lines come and go), and a restart is a new
task in the same job, so it never queues again. ``qrsh -inherit`` needs the job to be
a parallel job whose environment has ``control_slaves TRUE`` (``-pe <pe> N`` in
``--sge-args``). Grid Engine kills the whole job when a task ends by a signal; the
node side ends its task by exiting, and a checkpoint environment with ``when r``
(``-ckpt``) keeps the job through a task killed anyway.

The holder (HOLDER, on the login host) submits the job, says its id, then waits for
its stdin, a pipe from the agent, to end: when the agent is gone (even SIGKILLed) or
releases the job, it deletes it (qdel, again while it is still listed, bounded).
"""

import os
import pwd
import re
import shlex
import shutil
import sys
import time
import xml.etree.ElementTree as ET

from .batch import BatchKernel
from .batchjobs import (
    COMMAND_TIMEOUT,
    GONE_WAIT,
    Allocation,
    last_line,
    scheduler_command,
    spawn_holder,
)
from .launcher import register
from .protocol import AgentError

#: what to do when Grid Engine's commands are missing
INSTALL_HINT = "set it up in the pre-command, e.g. '. $SGE_ROOT/default/common/settings.sh'"
#: the holding job's command on the execution host: it only holds the slots
PLACEHOLDER = ["sleep", "2147483647"]
#: how often the allocation's wait asks qstat
ALLOCATE_POLL = 0.5

#: the holder: qsub (its argv after the code), the job id on stderr, then hold until
#: stdin ends, then qdel until the job is no longer listed (at most GONE_WAIT s)
HOLDER = r"""
import subprocess, sys, time
done = subprocess.run(sys.argv[1:], stdin=subprocess.DEVNULL, capture_output=True,
                      timeout=30)
sys.stderr.write(done.stderr.decode("utf-8", "replace"))
job = done.stdout.decode().strip().split(".")[0]
if done.returncode != 0 or not job.isdigit():
    sys.stderr.flush()
    sys.exit(done.returncode or 1)
sys.stderr.write("sshpyk: submitted job %s\n" % job)
sys.stderr.flush()
sys.stdin.buffer.read()
end = time.monotonic() + GONE_WAIT
while time.monotonic() < end:
    try:
        subprocess.run(["qdel", job], capture_output=True, timeout=10)
        out = subprocess.run(["qstat", "-u", "*"], capture_output=True, timeout=10).stdout
    except Exception:
        break
    if not [l for l in out.decode().splitlines() if l.split()[:1] == [job]]:
        break
    time.sleep(1)
""".replace("GONE_WAIT", repr(GONE_WAIT))
_SUBMITTED_RE = re.compile(r"sshpyk: submitted job (\d+)")


def sge_command(argv, timeout=COMMAND_TIMEOUT):
    """Run a Grid Engine command: (exit code, stdout, stderr); AgentError
    ``sge_missing`` if it is not found, ``sge_error`` if it does not run."""
    return scheduler_command("sge", "Grid Engine", INSTALL_HINT, argv, timeout)


def job_state(code):
    """The state of a job from qstat's letters (qw, hqw, r, t, dr, Eqw, s, ...)."""
    if "E" in code:
        return "ERROR"
    if "d" in code:
        return "DELETING"
    if "s" in code or "S" in code or "T" in code:
        return "SUSPENDED"
    if "r" in code or "t" in code:
        return "RUNNING"
    return "PENDING"


def _epoch(text):
    try:
        return time.mktime(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S"))
    except (TypeError, ValueError, OverflowError):
        return None


def parse_qstat(xml_text, now=None):
    """{job id: {state, reason, node, time_left, name, owner}} from ``qstat -u * -r
    -xml``; time_left from h_rt and the start time (None: no limit, or not running)."""
    now = time.time() if now is None else now
    jobs = {}
    for job in ET.fromstring(xml_text).iter("job_list"):
        job_id = (job.findtext("JB_job_number") or "").strip()
        if not job_id or job_id in jobs:
            continue  # a parallel job's other queue instances
        code = (job.findtext("state") or "").strip()
        state = job_state(code)
        queue = job.findtext("queue_name") or ""
        left = None
        started = _epoch(job.findtext("JAT_start_time"))
        for request in job.iter("hard_request"):
            if request.get("name") == "h_rt" and started is not None:
                try:
                    left = max(0.0, float(request.text) - (now - started))
                except (TypeError, ValueError):
                    left = None
        jobs[job_id] = {
            "state": state,
            "reason": code if code not in ("qw", "r") else "",
            "node": queue.split("@", 1)[1] if "@" in queue else None,
            "time_left": round(left) if left is not None else None,
            "name": job.findtext("JB_name") or "",
            "owner": job.findtext("JB_owner") or "",
        }
    return jobs


def qstat_jobs():
    code, out, err = sge_command(["qstat", "-u", "*", "-r", "-xml"])
    if code != 0:
        raise AgentError("sge_error", "qstat failed: %s" % (last_line(err) or code))
    try:
        return parse_qstat(out)
    except ET.ParseError as exc:
        raise AgentError("sge_error", "qstat's XML cannot be read: %s" % exc) from None


def parallel_environment(args):
    """The parallel environment ``-pe NAME SLOTS`` of ``args``, or None."""
    for index, arg in enumerate(args):
        if arg == "-pe" and index + 1 < len(args):
            return args[index + 1]
    return None


def check_args(args):
    """AgentError ``sge_args`` unless ``args`` name a parallel environment whose tasks
    the job controls (``qrsh -inherit`` needs it)."""
    pe = parallel_environment(args)
    if pe is None:
        raise AgentError(
            "sge_args",
            "the Grid Engine arguments need a parallel environment for the kernel's task, "
            "e.g. -pe smp 1 (one whose control_slaves is TRUE: see `qconf -spl`)",
        )
    code, out, err = sge_command(["qconf", "-sp", pe])
    if code != 0:
        raise AgentError(
            "sge_args", "no parallel environment %r: %s" % (pe, last_line(err) or last_line(out))
        )
    for line in out.splitlines():
        parts = line.split()
        if parts[:1] == ["control_slaves"] and parts[1:2] != ["TRUE"]:
            raise AgentError(
                "sge_args",
                "the parallel environment %r does not let its jobs start tasks "
                "(control_slaves FALSE): pick one with control_slaves TRUE" % pe,
            )


def sge_info(args):
    """Is Grid Engine usable from here: version, qsub's path, the queues, and whether
    qsub takes ``args`` (``qsub -w v``: verified, nothing submitted; AgentError
    ``sge_args`` if not)."""
    _, out, err = sge_command(["qstat", "-help"])
    version = (out or err).strip().splitlines()[0] if (out or err).strip() else ""
    code, out, err = sge_command(["qstat", "-g", "c"])
    if code != 0:
        raise AgentError("sge_error", "qstat failed: %s" % (last_line(err) or code))
    queues = []
    for line in out.splitlines()[2:]:
        parts = line.split()
        if len(parts) >= 6:
            queues.append(
                {"queue": parts[0], "used": parts[2], "available": parts[4], "total": parts[5]}
            )
    test = None
    if args is not None:
        check_args(args)
        verify = ["qsub", "-w", "v", "-terse"] + [str(a) for a in args] + ["-b", "y", "true"]
        code, out, err = sge_command(verify)
        test = last_line(out) or last_line(err)
        if code != 0 or "no suitable queues" in (out + err):
            raise AgentError(
                "sge_args",
                "qsub rejects the Grid Engine arguments %r: %s"
                % (" ".join(args), last_line(err) or last_line(out)),
            )
    return {"version": version, "qsub": shutil.which("qsub"), "queues": queues, "test": test}


@register
class SgeKernel(BatchKernel):
    """A kernel run as a task (``qrsh -inherit``) of a Grid Engine job held for it."""

    name = "sge"
    scheduler = "Grid Engine"
    status_command = "qstat -f"
    step_program = "qrsh"
    step_greeting = "sshpyk-task"

    def submit(self, args, env):
        """The holder, which runs qsub (``-w e``: a job that can never run is refused
        now) and holds the job until its stdin ends."""
        check_args(args)
        qsub = self.program("qsub")
        command = [sys.executable, "-c", HOLDER, qsub, "-terse", "-w", "e"]
        command += ["-N", self.job_name, "-o", "/dev/null", "-e", "/dev/null", "-cwd"]
        command += args + ["-b", "y"] + PLACEHOLDER
        return Allocation(spawn_holder(command, env, self.cwd), type(self))

    def await_allocation(self, log):
        """The holder's stderr (qsub's words, then the job id), then qstat until the job
        runs; a refused submission is an ``sge_args`` error."""
        allocation = self.allocation
        said = []
        for line in iter(allocation.proc.stderr.readline, b""):
            log.write(line)
            log.flush()
            text = line.decode("utf-8", "replace")
            match = _SUBMITTED_RE.search(text)
            if match:
                allocation.job_id = self.job_id = match.group(1)
                self.write_info()
                break
            said.append(text.strip())
        if allocation.job_id is None:
            words = [s for s in said if s] or ["no job id"]
            args = self.request.get("sge_args") or []
            self.node_error = (
                "sge_args",
                "qsub rejects the Grid Engine arguments %r: %s" % (" ".join(args), words[-1]),
            )
            return False
        while not self.finished.is_set() and allocation.proc.poll() is None:
            try:
                job = self.jobs([allocation.job_id]).get(str(allocation.job_id))
            except AgentError:
                job = {"state": "PENDING", "node": None}
            if job is None or job["state"] in ("ERROR", "DELETING"):
                break  # deleted, or it cannot run
            if job["state"] == "RUNNING" and job["node"]:
                allocation.node = job["node"]  # its queue instance's host: the task's
                return True
            self.finished.wait(ALLOCATE_POLL)
        allocation.release()  # the holder ends with its stdin
        return False

    def step_command(self, program):
        """``qrsh -inherit`` to the job's host: a task of the job, its stdio ours. The
        command reaches a shell there (as rsh's does): quoted, after the greeting (stdin
        that reaches qrsh before its task runs can stall the task: measured)."""
        host = self.allocation.node or ""
        command = "echo %s; exec %s" % (self.step_greeting, " ".join(map(shlex.quote, program)))
        return [self.step_path, "-inherit", "-cwd", host, command]

    def step_env(self):
        """What makes qrsh -inherit a task of the held job."""
        return {"JOB_ID": str(self.allocation.job_id), "SGE_TASK_ID": "undefined"}

    @classmethod
    def command(cls, argv, timeout=COMMAND_TIMEOUT):
        return sge_command(argv, timeout)

    @classmethod
    def jobs(cls, job_ids):
        wanted = set(str(j) for j in job_ids if j)
        if not wanted:
            return {}
        return dict((k, v) for k, v in qstat_jobs().items() if k in wanted)

    @classmethod
    def job_by_name(cls, name):
        me = pwd.getpwuid(os.getuid()).pw_name
        ids = [k for k, v in qstat_jobs().items() if v["name"] == name and v["owner"] == me]
        return max(ids, key=int) if ids else None

    @classmethod
    def cancel(cls, job_id, wait=GONE_WAIT):
        """qdel (again while the job is still listed: it may stay in ``dr``), until it
        is no longer listed (bounded)."""
        deadline = time.monotonic() + wait
        asked = 0.0
        while True:
            if str(job_id) not in cls.jobs([job_id]):
                return
            if time.monotonic() >= deadline:
                return
            if time.monotonic() - asked >= 2.0:
                sge_command(["qdel", str(job_id)])
                asked = time.monotonic()
            time.sleep(0.2)

    @classmethod
    def probe(cls, args):
        """For ``probe``: is Grid Engine usable here (see sge_info)."""
        return sge_info(args)

    @classmethod
    def node_facts(cls):
        """Grid Engine's environment of the task on the execution host."""
        env = os.environ
        return {
            "node": env.get("HOSTNAME") or None,
            "job_id": env.get("JOB_ID"),
            "step_id": env.get("SGE_TASK_ID") if env.get("SGE_TASK_ID") != "undefined" else None,
            "launch_addr": None,
        }

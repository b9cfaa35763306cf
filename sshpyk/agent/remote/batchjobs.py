"""A batch scheduler's jobs as the agent holds, queries and cancels them, shared by
every scheduler's launcher (batch.py and one module per scheduler): the bounded
command runner and its error kinds, the allocation a kernel holds across its
restarts, and what ``ps``/``kill`` do with the records of batch kernels. They block:
the agent calls them from worker threads and launcher threads only.

Error kinds: a scheduler's are ``<name>_missing`` (its commands are not found),
``<name>_error`` (one failed), ``<name>_args`` (it refuses the job arguments),
``<name>_queue_timeout`` and ``<name>_failed`` (the job ended before the kernel ran);
the local launcher maps them to the classes of the tree (kernels/batch.py).
"""

import os
import shutil
import subprocess
import threading
import time

from .paths import as_int, remove_tree
from .procgroup import TERM_WAIT, pid_alive, stop_group
from .protocol import AgentError, Kind

#: seconds between queue polls while a job is pending
POLL = 2.0
#: bound on every scheduler command (its controller may be slow or down)
COMMAND_TIMEOUT = 15.0
#: after a cancel, how long to wait for the job to leave the queue
GONE_WAIT = 15.0
#: seconds a stopped kernel's allocation waits for its restart before it is released
HOLD_TIMEOUT = 60.0


def last_line(text):
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def scheduler_command(name, scheduler, hint, argv, timeout=COMMAND_TIMEOUT):
    """Run a command of batch launcher ``name``'s scheduler (``scheduler``: its name in
    messages; ``hint``: what to do when it is missing): (exit code, stdout, stderr);
    AgentError ``<name>_missing`` if it is not found, ``<name>_error`` if it cannot
    run or does not answer within ``timeout``."""
    path = shutil.which(argv[0])
    if path is None:
        raise AgentError(
            name + "_missing",
            "%s not found on the PATH of the login node (is %s installed? %s)"
            % (argv[0], scheduler, hint),
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
            name + "_error", "%s did not answer within %gs" % (argv[0], timeout)
        ) from None
    except OSError as exc:
        raise AgentError(name + "_error", "cannot run %s: %s" % (argv[0], exc)) from None
    return (
        done.returncode,
        done.stdout.decode("utf-8", "replace"),
        done.stderr.decode("utf-8", "replace"),
    )


class Allocation:
    """A job held by the agent for one kernel: each start of the kernel is a step in it,
    so a restart does not queue again. ``proc`` is the process on the login host that
    holds it, its stdin a pipe from the agent: when the agent is gone (even
    SIGKILLed) the pipe closes and the job ends. ``scheduler``: the BatchKernel
    subclass whose commands read and cancel it."""

    def __init__(self, proc, scheduler):
        self.proc = proc
        self.scheduler = scheduler
        self.job_id = None
        #: the host its resources are on, once known (a scheduler that needs it)
        self.node = None
        self.timer = None
        self.released = False

    def alive(self):
        """Still granted: its holder runs and the scheduler says RUNNING (bounded)."""
        if self.released or self.proc.poll() is not None or not self.job_id:
            return False
        try:
            job = self.scheduler.jobs([self.job_id]).get(str(self.job_id))
        except AgentError:
            return False
        return job is not None and job["state"] == "RUNNING"

    def release(self):
        """End the job (idempotent; bounded): cancel it, then the holder's group."""
        if self.timer is not None:
            self.timer.cancel()
        if self.released:
            return
        self.released = True
        try:
            if self.job_id is not None:
                self.scheduler.cancel(self.job_id)
        except AgentError:
            pass
        try:
            self.proc.stdin.close()
        except (OSError, AttributeError):
            pass
        stop_group(self.proc.pid, self.proc, term_wait=5.0, kill_wait=2.0)


def spawn_holder(command, env, cwd):
    """Start an allocation's holder (stdin a pipe from the agent, stderr a pipe), in a
    session of its own; AgentError if it cannot start."""
    try:
        return subprocess.Popen(
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
        raise AgentError(Kind.LAUNCH_FAILED, "cannot start %s: %s" % (command[0], exc)) from None


_held = {}  # type: dict
_held_lock = threading.Lock()


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


def annotate_jobs(cls, records):
    """For ``ps``: the state of the jobs of ``cls``'s kernels among ``records`` (one
    query of its scheduler): ``<name>_state``, ``<name>_reason``, time_left, node."""
    mine = [k for k in records if k.get("launcher") == cls.name]
    if not mine:
        return records
    state, reason = cls.name + "_state", cls.name + "_reason"
    try:
        jobs = cls.jobs([k.get("job_id") for k in mine])
    except AgentError as exc:
        jobs = None
        error = exc.message
    for k in mine:
        if jobs is None:
            k[state], k[reason] = "UNKNOWN", error
        elif not k.get("job_id"):
            k[state], k[reason] = "SUBMITTING" if k.get("alive") else "GONE", ""
        else:
            job = jobs.get(str(k["job_id"]))
            k[state] = job["state"] if job else "GONE"
            k[reason] = job["reason"] if job else ""
            k["time_left"] = job["time_left"] if job else None  # seconds; None: no limit
            if job and job["node"]:
                k["node"] = job["node"]
    return records


def kill_job_record(cls, info, verified_pid, kill_group):
    """For ``kill`` and the sweep, a record of ``cls``'s: TERM the job's processes,
    stop the step's group (``kill_group``: the launcher contract's default), cancel the
    job (it may outlive a SIGKILLed step). Job ids are only acted on from a record of
    the agent's own uid: as root, a cancel could not tell whose job another user's
    record names."""
    uid = as_int(info.get("uid"), os.getuid())
    if uid != os.getuid():
        errors = []
        if info.get("job_id") or info.get("job_name"):
            errors.append(
                "%s job %s of uid %d not cancelled (cancel it as that user)"
                % (cls.scheduler, info.get("job_id") or info.get("job_name"), uid)
            )
        return errors + kill_group(cls, info, verified_pid)
    if verified_pid > 1 and info.get("job_id"):
        try:
            asked = cls.terminate_job(info)  # first gracefully
        except AgentError:
            asked = False
        # then wait (bounded) for the step to end: the node side cleans up on TERM
        deadline = time.monotonic() + TERM_WAIT + 5
        while asked and pid_alive(verified_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    errors = kill_group(cls, info, verified_pid)
    socket_dir = info.get("socket_dir")
    if socket_dir and os.path.basename(str(socket_dir)).startswith("sshpyk-"):
        remove_tree(str(socket_dir))  # only a private dir of ours
    try:
        job_id = info.get("job_id")
        if not job_id and info.get("job_name"):
            job_id = cls.job_by_name(str(info["job_name"]))
        if job_id:
            cls.cancel(job_id)
    except AgentError:
        pass
    return errors

"""Process groups: every kernel runs in a session (so a process group) of its own, and
is stopped the one way :func:`stop_group` does: TERM, a bounded wait, KILL. Also what
can be told of a process by its pid (alive, owner, whether it is a given kernel), and
:func:`run_bounded`: a short command, bounded in time and output, whatever it does."""

import os
import selectors
import signal
import subprocess
import threading
import time

#: set once this process cleans up on its way out (the agent, the node side): a SIGTERM
#: then no longer interrupts it (see main.run). A scheduler may signal a step more than
#: once when it ends it (time limit, cancel): a second TERM must not cut the first one's
#: cleanup.
CLEANING = threading.Event()

#: seconds a group leader has between SIGTERM and SIGKILL
TERM_WAIT = 2.0
#: seconds to wait for a group leader after SIGKILL
KILL_WAIT = 2.0
_POLL = 0.01
#: seconds run_bounded waits for a command it killed (one in D state, e.g. on a wedged
#: device, cannot die: it is abandoned then)
ABANDON_WAIT = 1.0
#: bytes of stdout and of stderr run_bounded keeps at most (more: the command failed)
MAX_STDOUT = 1 << 20
MAX_STDERR = 64 << 10
#: what run_bounded left behind (their Popen), reaped by its next calls
_ABANDONED = []  # type: list
_ABANDONED_LOCK = threading.Lock()


def pid_alive(pid):
    """True if ``pid`` runs and is not a zombie (PID 1 may reap slowly)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(") ", 1)[1][:1] != "Z"
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True


def process_owner(pid):
    """The real uid of process ``pid`` (from /proc), -1 if there is no such process,
    None where /proc is not available (macOS)."""
    try:
        with open("/proc/%d/status" % pid, "rb") as f:
            for line in f.read(65536).splitlines():
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return -1 if os.path.isdir("/proc/self") else None
    except (OSError, ValueError, IndexError):
        pass
    return None if not os.path.isdir("/proc/self") else -1


def pid_runs_as(pid, uid):
    """True if ``pid`` runs and belongs to ``uid`` (where that can be told)."""
    return pid > 1 and pid_alive(pid) and process_owner(pid) in (uid, None)


def signal_group(pgid, signum):
    """Send ``signum`` to the process group ``pgid``; False if there is none (or it is
    not ours to signal)."""
    try:
        os.killpg(pgid, signum)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def wait_exit(proc, seconds):
    """Wait (bounded) for the child ``proc``; its exit code, or None if it still runs."""
    try:
        return proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return None


def stop_group(pid, proc=None, term_wait=TERM_WAIT, kill_wait=KILL_WAIT):
    """Stop the process group ``pid``: SIGTERM, wait up to ``term_wait`` for its leader
    to exit, else SIGKILL and wait up to ``kill_wait``; once the leader is gone, SIGKILL
    what it left in its group. ``proc``: the leader's Popen when it is our child (it is
    reaped then), else it is watched through its pid. None when it is gone, else why it
    may still run (one line). Blocks up to ``term_wait + kill_wait``: never call it on
    the agent's loop."""

    def alive():
        return proc.poll() is None if proc is not None else pid_alive(pid)

    for signum, seconds in ((signal.SIGTERM, term_wait), (signal.SIGKILL, kill_wait)):
        if alive():
            try:
                os.killpg(pid, signum)
            except ProcessLookupError:
                return None
            except PermissionError as exc:
                return "cannot signal process group %d: %s" % (pid, exc.strerror)
            if proc is not None:
                wait_exit(proc, seconds)
            else:
                deadline = time.monotonic() + seconds
                while pid_alive(pid) and time.monotonic() < deadline:
                    time.sleep(_POLL)
        if not alive():
            signal_group(pid, signal.SIGKILL)  # children it left in its group
            return None
    return "pid %d still runs after SIGKILL" % pid


def run_bounded(argv, timeout, env=None, limits=(MAX_STDOUT, MAX_STDERR)):
    """(stdout, None) of ``argv`` (text) run in a session of its own (cwd /: nothing of
    the agent's directory on its path), or (None, why it failed: one line). Bounded:
    after ``timeout`` seconds, or once it writes more than ``limits`` (bytes of stdout,
    of stderr), its group is killed and waited for ABANDON_WAIT seconds at most (a
    process that cannot die is left behind: the caller is not)."""
    if timeout <= 0:
        return None, "timeout"
    with _ABANDONED_LOCK:
        _ABANDONED[:] = [p for p in _ABANDONED if p.poll() is None]
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd="/",
            env=env,
            start_new_session=True,
        )
    except OSError as exc:
        return None, "cannot run: %s" % (exc.strerror or exc)
    deadline = time.monotonic() + timeout
    try:
        out, err, problem = _read_bounded(proc, deadline, limits)
        if problem is None and wait_exit(proc, max(0.0, deadline - time.monotonic())) is None:
            problem = "timeout"
    finally:
        proc.stdout.close()
        proc.stderr.close()
    if problem is not None:
        if stop_group(proc.pid, proc, term_wait=0.0, kill_wait=ABANDON_WAIT) is not None:
            with _ABANDONED_LOCK:
                _ABANDONED.append(proc)  # reaped later, when it can die
        return None, problem
    if proc.returncode != 0:
        last = err.decode("utf-8", "replace").strip().splitlines()[-1:]
        return None, "exit code %d%s" % (proc.returncode, (": " + last[0][:200]) if last else "")
    return out.decode("utf-8", "replace"), None


def _read_bounded(proc, deadline, limits):
    """(stdout, stderr, None) of ``proc`` once both end, or (.., .., why not)."""
    streams = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    caps = {proc.stdout: limits[0], proc.stderr: limits[1]}
    with selectors.DefaultSelector() as selector:
        for stream in streams:
            selector.register(stream, selectors.EVENT_READ)
        while selector.get_map():  # ends at both EOFs, the deadline or too much output
            left = deadline - time.monotonic()
            if left <= 0:
                return b"", b"", "timeout"
            for key, _ in selector.select(left):
                data = os.read(key.fd, 65536)
                if not data:
                    selector.unregister(key.fileobj)
                    continue
                buffer = streams[key.fileobj]
                buffer += data
                if len(buffer) > caps[key.fileobj]:
                    name = "stdout" if key.fileobj is proc.stdout else "stderr"
                    return b"", b"", "more than %d bytes on %s" % (caps[key.fileobj], name)
    return bytes(streams[proc.stdout]), bytes(streams[proc.stderr]), None


def read_environ(pid, tries=20):
    """The environment entries of ``pid``, or None if they cannot be read.

    Right after an exec the kernel has installed the new program but not yet its
    environment (/proc/PID/environ reads empty for a moment, although Popen has
    returned): an empty read is retried briefly (at most ``tries`` x 5 ms), then
    counts as unreadable."""
    for _ in range(tries):
        try:
            with open("/proc/%d/environ" % pid, "rb") as f:
                data = f.read(4 << 20)
        except OSError:
            return None
        if data:
            return data.split(b"\0")
        time.sleep(0.005)
    return None


def verify_kernel_pid(pid, run_dir, owner, command_line_mark=None):
    """None if ``pid`` is verifiably the kernel (or a launcher's process, e.g. a job
    step's client) of ``run_dir``, else why not (one line). Its process must belong to
    ``owner`` (the run dir's owner) and, where its environment is readable, carry
    SSHPYK_RUN_DIR=run_dir
    (every launcher sets it); or else, for records written before a step got it, carry
    ``command_line_mark`` (e.g. ``--job-name=...``) as an argument. Without /proc
    (macOS) the run dir checks are all there is."""
    if pid <= 1:
        return "no kernel pid recorded"
    uid = process_owner(pid)
    if uid is None:
        return None if pid_alive(pid) else "pid %d is gone" % pid
    if uid == -1:
        return "pid %d is gone" % pid
    if uid != owner:
        return "pid %d belongs to uid %d, not to the run dir's owner %d" % (pid, uid, owner)
    environ = read_environ(pid)
    if environ is None:
        return None  # unreadable: the owner check is what there is
    want = os.path.realpath(run_dir)
    for entry in environ:
        if entry.startswith(b"SSHPYK_RUN_DIR="):
            value = os.fsdecode(entry[len(b"SSHPYK_RUN_DIR=") :])
            if os.path.realpath(value) == want:
                return None
    if command_line_mark:
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                argv = f.read(1 << 20).split(b"\0")
            if os.fsencode(command_line_mark) in argv:
                return None
        except OSError:
            pass
    return "pid %d is not the kernel of %s (no SSHPYK_RUN_DIR for it)" % (pid, run_dir)

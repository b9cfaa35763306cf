"""The remote side of sshpyk: a stdlib-only agent fed to the remote Python.

This file is never imported locally. ``sshpyk.remote`` sends its source over an
SSH exec channel's stdin to ``python -c <loader>``; nothing is installed or left
on the remote host. One agent runs per (SSH connection, remote python,
pre-command) and supervises every kernel started through it, so starting a
kernel on an open connection costs no new SSH session, shell or interpreter.

It speaks protocol version ``PROTOCOL`` as JSON lines. local -> agent (stdin),
the first line opens the conversation, either starting an agent or relaying to a
running one through its control socket (reattach after a dropped connection)::

    {"v": 1, "op": "hello", "grace": 60.0, "run_root": null}
    {"v": 1, "op": "attach", "socket": "/tmp/sshpyk-agent-.../agent.sock"}

then any of (``kid`` is the kernel id, ``rid`` a request id)::

    {"op": "ping"}                                  # heartbeat from the local side
    {"op": "inspect", "rid": 1, "kernel_name": "python3"}
    {"op": "launch", "kid": ..., "kernel_name": ..., "key": ..., "signature_scheme": ...,
     "transport": "auto|ipc|tcp", "env": {...}, "cwd": ...,
     "launcher": "direct|slurm", "slurm_args": [...], "slurm_queue_timeout": 600.0,
     "slurm_walltime_warning": 300.0, "slurm_status_interval": 30.0}
    {"op": "signal", "kid": ..., "signum": 2}       # to the kernel's process group
    {"op": "stop", "kid": ...}                      # kill the group, remove its run dir
    {"op": "state", "rid": 1}                       # every kernel: pid, ready, exit code
    {"op": "connection_info", "rid": 1, "kid": ...} # for a local side that reattaches
    {"op": "ps", "rid": 1, "run_root": null, "all_users": false}  # sshpyk kernels here
    {"op": "kill", "rid": 1, "kernel_id": ...|null, "orphans": false, "run_root": null,
     "all_users": false}                            # all_users: root only
    {"op": "shutdown", "rid": 1, "keep_persistent": false}  # the local side leaves
    {"op": "load", "rid": 1, "name": "slurm", "source": ...}  # the SLURM launcher, once
    {"op": "slurm_info", "rid": 1, "args": [...]}   # is SLURM usable here? (srun --test-only)

agent -> local (stdout), every line carries ``"v"``::

    {"event": "hello", "pid", "python", "python_version", "jupyter_client"}
    {"event": "info", "rid", "kernelspec": {...}}
    {"event": "started", "kid", "pid", "pgid", "run_dir", "transport", "endpoints"}
    {"event": "slurm", "kid", "job_id", "state", ...}  # queue state, node, walltime warning
    {"event": "ready", "kid"}                       # all five sockets are bound
    {"event": "exited", "kid", "code", "stderr_tail"}
    {"event": "stopped", "kid"}                     # process group dead, run dir gone
    {"event": "state"|"connection_info", "rid", ...}
    {"event": "ps", "rid", "kernels": [{..., "uid", "user", "alive", "agent_alive",
     "attached", "agent_socket", "last_contact", "run_dir"}]}
    {"event": "killed", "rid", "kernels": [{..., "killed": true|false, "error": null|"..."}]}
    {"event": "bye", "rid", "kept"}                 # answer to shutdown
    {"event": "error", "kid"|"rid", "kind", "message"}
    # kinds include "unsafe_path" (a run root or agent socket another user could steer)
    # and "not_permitted" (all_users without root)

Each kernel runs in its own session (so its own process group) with
``JPY_PARENT_PID`` set to the agent, so it also exits if the agent is SIGKILLed.
Several local sides may be attached at once (an owner and ``sshpyk attach``);
events go to all of them. When no local side has been heard for ``grace``
seconds (a dropped link, a crashed client) the agent kills every non-persistent
kernel's process group and removes its run directory; a kernel that exits on its
own is reaped at once. The HMAC key only travels over stdin and into a 0600 file
in a 0700 directory.

Shared hosts: another user must not be able to steer this agent. A run root must be
the user's (or root's) and writable by nobody else, or root's and sticky (/tmp), with no
ancestor another user can change (``run_root_problem``); otherwise the agent refuses it
(``unsafe_path``), or skips a default root. Everything read back from a run root (run
dirs with ``sshpyk.json``, agent dirs with ``agent.json``) is only believed from a 0700
dir, not a symlink, of the expected owner, through O_NOFOLLOW (``read_trusted``); a
kernel pid from such a record is only signalled if the process is that kernel
(``verify_kernel_pid``: its owner and its SSHPYK_RUN_DIR); an agent is alive when its
socket's peer credentials (SO_PEERCRED) are the recorded pid of our uid, and only our
uid may attach through that socket. Whenever an agent starts, and at ``ps`` and
``kill``, the stale sweep (``sweep``) removes this user's dirs of dead agents and of
dead kernels of dead agents, which a SIGKILLed agent leaves behind.

With ``launcher: slurm`` the agent runs on the login node and submits each kernel
as a SLURM job with ``srun``. That code is ``bootstrap_slurm.py``, sent by the local
side (``load``) before the first SLURM request and compiled into this namespace only
then, so direct kernels never pay for it. This source plus that one, fed to the
remote python on the compute node through srun's stdin, run there in *node mode*
(first line ``{"op": "node", ...}``): it writes the connection file in a private run
dir on the node, starts the kernel (tcp, on the node's address) and relays signal
and stop requests from its stdin; its events reach the agent on srun's stdout. See
``SlurmKernel`` there for why srun rather than sbatch.

Remote Python >= 3.8; nothing beyond the standard library, except the remote
environment's ``jupyter_core``/``jupyter_client``, used to find kernelspecs.
"""

import importlib.util
import json
import os
import queue
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time

PROTOCOL = 1
CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
# sun_path holds 108 bytes including the NUL; leave room for "-N".
MAX_IPC_PREFIX = 100
STDERR_TAIL_BYTES = 4000
TERM_WAIT = 2.0


class BootstrapError(Exception):
    def __init__(self, kind, message):
        Exception.__init__(self, message)
        self.kind = kind
        self.message = message


class Output:
    """Where events go: every attached controller (the SSH channel's stdout, sockets)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.writers = [self._stdout]  # until the agent runs: errors go to stdout

    @staticmethod
    def _stdout(data):
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()

    def send(self, data, only=None):
        with self.lock:
            for write in [only] if only else list(self.writers):
                try:
                    write(data)
                except (OSError, ValueError):
                    pass  # that controller is gone; its reader notices


OUTPUT = Output()


def emit(event, _only=None, **fields):
    fields["v"] = PROTOCOL
    fields["event"] = event
    OUTPUT.send((json.dumps(fields) + "\n").encode("utf-8"), _only)


def require_jupyter_client():
    if importlib.util.find_spec("jupyter_client") is None:
        raise BootstrapError(
            "jupyter_client_missing",
            "jupyter_client is not installed for %s" % sys.executable,
        )


def jupyter_client_version():
    if importlib.util.find_spec("jupyter_client") is None:
        return None
    try:
        from importlib.metadata import version

        return version("jupyter_client")
    except Exception:
        return "unknown"


def native_python_spec():
    if importlib.util.find_spec("ipykernel") is None:
        return None
    return {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
        "interrupt_mode": "signal",
        "env": {},
        "metadata": {"debugger": True},
    }


def find_kernelspec(name):
    """Resolve a kernelspec like jupyter_client's KernelSpecManager does.

    Walks jupyter_core's kernel search path directly (importing jupyter_client
    costs ~0.25 s, which would be paid on every kernel start); falls back to
    KernelSpecManager for anything the fast path does not find.
    """
    require_jupyter_client()
    wanted = name.lower()
    try:
        from jupyter_core.paths import jupyter_path

        dirs = jupyter_path("kernels")
    except Exception:
        dirs = []
    for kernel_dir in dirs:
        if not os.path.isdir(kernel_dir):
            continue
        for entry in sorted(os.listdir(kernel_dir)):
            path = os.path.join(kernel_dir, entry)
            spec_file = os.path.join(path, "kernel.json")
            if entry.lower() == wanted and os.path.isfile(spec_file):
                with open(spec_file, encoding="utf-8") as f:
                    spec = json.load(f)
                spec["resource_dir"] = path
                return spec
    if wanted == "python3":
        spec = native_python_spec()
        if spec is not None:
            spec["resource_dir"] = "(ipykernel built-in)"
            return spec
    try:
        from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    except Exception as exc:
        raise BootstrapError(
            "jupyter_client_missing", "cannot import jupyter_client: %s" % exc
        ) from None
    try:
        ks = KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel:
        raise BootstrapError(
            "kernelspec_not_found",
            "no kernelspec named %r for %s (available: %s)"
            % (name, sys.executable, ", ".join(sorted(available_kernels(dirs))) or "none"),
        ) from None
    spec = ks.to_dict()
    spec["resource_dir"] = ks.resource_dir
    return spec


def available_kernels(dirs):
    names = set()
    for kernel_dir in dirs:
        if os.path.isdir(kernel_dir):
            for entry in os.listdir(kernel_dir):
                if os.path.isfile(os.path.join(kernel_dir, entry, "kernel.json")):
                    names.add(entry.lower())
    if native_python_spec() is not None:
        names.add("python3")
    return names


def kernel_argv(spec, connection_file):
    argv = list(spec.get("argv") or [])
    if not argv:
        raise BootstrapError("launch_failed", "the remote kernelspec has an empty argv")
    major = "python%d" % sys.version_info[0]
    minor = "python%d.%d" % sys.version_info[:2]
    if argv[0] in ("python", major, minor):
        argv[0] = sys.executable  # what jupyter_client does for local kernels
    subst = {
        "{connection_file}": connection_file,
        "{resource_dir}": spec.get("resource_dir", ""),
        "{prefix}": sys.prefix,
    }
    out = []
    for arg in argv:
        for k, v in subst.items():
            arg = arg.replace(k, v)
        out.append(arg)
    return out


# -- shared directories: what another user of this host cannot steer ------------------
#
# Run dirs and agent dirs live in shared places (/tmp). Nothing read from there is
# trusted unless it passes these checks; an entry that fails them is ignored, never
# acted on. See ``private_dir_problem``, ``read_trusted`` and ``run_root_problem``.

#: bound on a record read from a run dir or agent dir (sshpyk.json, agent.json)
MAX_RECORD_BYTES = 1 << 20
#: a run dir without its record (a kernel being set up, or debris) is removed by the
#: stale sweep only when older than this and no other agent of the user runs
UNRECORDED_STALE = 3600.0
#: how long a liveness probe of an agent's control socket may take
PROBE_TIMEOUT = 0.5
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def as_int(value, default=0):
    """An int from a record field, ``default`` for anything else (a record may be junk)."""
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return default


def user_name(uid):
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError, OverflowError):
        return None


def private_dir_problem(st, owner):
    """None if ``st`` (an lstat or fstat result) is a private directory: a directory,
    not a symlink, mode exactly 0700, owned by ``owner`` (any uid if ``owner`` is None);
    else what is wrong with it."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if owner is not None and st.st_uid != owner:
        return "belongs to uid %d, not %d" % (st.st_uid, owner)
    if stat.S_IMODE(st.st_mode) != 0o700:
        return "has mode %03o, not 700" % stat.S_IMODE(st.st_mode)
    return None


def read_trusted(dir_path, name, owner):
    """``(data, uid)``: the content of file ``name`` in ``dir_path`` and the uid owning
    both, or None unless ``dir_path`` is a private dir of ``owner`` (see
    ``private_dir_problem``; None: of any uid) and ``name`` a regular file of the same
    owner, at most MAX_RECORD_BYTES long.

    The dir is opened once (O_NOFOLLOW, then fstat, same inode as the lstat) and the
    file relative to it (O_NOFOLLOW: no symlink; O_NONBLOCK: a FIFO cannot hang us), so
    a path swapped between check and use is never read."""
    try:
        st = os.lstat(dir_path)
    except OSError:
        return None
    if private_dir_problem(st, owner):
        return None
    try:
        dfd = os.open(dir_path, os.O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
    except OSError:
        return None
    try:
        dst = os.fstat(dfd)
        if (dst.st_dev, dst.st_ino) != (st.st_dev, st.st_ino) or private_dir_problem(dst, owner):
            return None
        fd = os.open(name, os.O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, dir_fd=dfd)
    except (OSError, NotImplementedError):
        os.close(dfd)
        return None
    try:
        fst = os.fstat(fd)
        if (
            not stat.S_ISREG(fst.st_mode)
            or fst.st_uid != dst.st_uid
            or fst.st_size > MAX_RECORD_BYTES
        ):
            return None
        chunks, size = [], 0
        while size <= MAX_RECORD_BYTES:
            chunk = os.read(fd, MAX_RECORD_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_RECORD_BYTES:
            return None
        return b"".join(chunks), dst.st_uid
    except OSError:
        return None
    finally:
        os.close(fd)
        os.close(dfd)


def trusted_json(dir_path, name, owner):
    """``(dict, uid)`` of the JSON record ``name`` in a trusted dir, see read_trusted."""
    found = read_trusted(dir_path, name, owner)
    if found is None:
        return None
    try:
        value = json.loads(found[0].decode("utf-8"))
    except ValueError:
        return None
    return (value, found[1]) if isinstance(value, dict) else None


def run_root_problem(path, uid=None):
    """``(real path, None)`` if ``path`` is safe to hold run dirs, else ``(path, why)``
    with a one-line reason and what to do.

    Safe: owned by the user (or root) and not writable by group or others, or owned by
    root with the sticky bit set (like /tmp: nobody may rename or remove another user's
    entries). A symlink, anywhere in the path, is resolved once: the real path must pass
    the same check and is the one used from then on, so a link changed later does not
    matter. Every ancestor of the real path must be the user's or root's and not
    writable by others unless sticky, else the root itself could be swapped."""
    uid = os.getuid() if uid is None else uid
    real = os.path.realpath(path)
    try:
        st = os.lstat(real)
    except OSError as exc:
        return path, "run root %s cannot be used: %s" % (path, exc.strerror or exc)
    shown = path if real == path else "%s (%s)" % (path, real)
    if not stat.S_ISDIR(st.st_mode):
        return path, "run root %s is not a directory" % shown
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid == 0 and mode & stat.S_ISVTX:
        pass
    elif st.st_uid not in (uid, 0):
        return path, (
            "run root %s belongs to uid %d: use a directory of your own (mkdir -m 700 DIR)"
            % (shown, st.st_uid)
        )
    elif mode & 0o022:
        return path, (
            "run root %s is group- or world-writable: use a directory only you can write "
            "(chmod 700 %s)" % (shown, real)
        )
    parent = os.path.dirname(real)
    for _ in range(real.count(os.sep) + 1):
        try:
            pst = os.lstat(parent)
        except OSError as exc:
            return path, "run root %s: cannot check %s: %s" % (shown, parent, exc.strerror)
        pmode = stat.S_IMODE(pst.st_mode)
        if pst.st_uid not in (uid, 0) or (pmode & 0o022 and not pmode & stat.S_ISVTX):
            return path, (
                "run root %s is inside %s, which another user can change: use a directory "
                "only you and root can write" % (shown, parent)
            )
        if os.path.dirname(parent) == parent:
            break
        parent = os.path.dirname(parent)
    return real, None


def checked_run_root(path, create=False):
    """The real path of a run root that passes run_root_problem (with ``create``, a
    missing one is made 0700 first); else BootstrapError ``unsafe_path``."""
    path = os.path.abspath(os.path.expanduser(path))
    if create and not os.path.lexists(path):
        missing = []
        head = path
        while head and not os.path.lexists(head) and len(missing) < 64:
            missing.append(head)
            head = os.path.dirname(head)
        for directory in reversed(missing):
            try:
                os.mkdir(directory, 0o700)
            except FileExistsError:
                pass
            except OSError as exc:
                raise BootstrapError(
                    "unsafe_path", "cannot create run root %s: %s" % (path, exc.strerror)
                ) from None
    real, problem = run_root_problem(path)
    if problem:
        raise BootstrapError("unsafe_path", problem)
    return real


def default_run_roots(extra=None):
    """Where run dirs and agent dirs are looked for: ``extra`` (a request's or the
    hello's run root: BootstrapError ``unsafe_path`` if it exists and is not safe, skipped
    if it does not exist), then XDG_RUNTIME_DIR and the temp dir if they are safe."""
    roots = []
    if extra and os.path.lexists(os.path.abspath(os.path.expanduser(extra))):
        roots.append(checked_run_root(extra))
    for root in [os.environ.get("XDG_RUNTIME_DIR"), tempfile.gettempdir()]:
        if root and os.path.isdir(root):
            real, problem = run_root_problem(root)
            if problem is None and real not in roots:
                roots.append(real)
    return roots


def private_run_dir(run_root, kernel_id):
    """A new 0700 dir ``sshpyk-<kid8>-XXXX`` (tempfile.mkdtemp) in ``run_root`` (checked,
    made if missing: BootstrapError ``unsafe_path`` if unsafe) or else in the first safe,
    writable default root."""
    if run_root:
        roots = [checked_run_root(run_root, create=True)]
    else:
        roots = [r for r in default_run_roots() if os.access(r, os.W_OK)]
    last = "no safe run root (XDG_RUNTIME_DIR, %s)" % tempfile.gettempdir()
    for root in roots:
        try:
            path = tempfile.mkdtemp(prefix="sshpyk-%s-" % (kernel_id or "k")[:8], dir=root)
            os.chmod(path, 0o700)
            problem = private_dir_problem(os.lstat(path), os.getuid())
            if problem is None:
                return path
            last = "%s %s" % (path, problem)
        except OSError as exc:
            last = exc
    raise BootstrapError("launch_failed", "cannot create a private run directory: %s" % last)


def pick_transport(requested, spec, run_dir):
    joined = " ".join(spec.get("argv") or [])
    prefix_ok = len(os.path.join(run_dir, "k")) <= MAX_IPC_PREFIX
    if requested == "ipc":
        if not prefix_ok:
            raise BootstrapError(
                "launch_failed", "run directory %r is too long for unix sockets" % run_dir
            )
        return "ipc"
    if requested == "tcp":
        return "tcp"
    return "ipc" if ("ipykernel" in joined and prefix_ok) else "tcp"


def free_tcp_ports(count, host="127.0.0.1"):
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def write_connection_file(run_dir, transport, request, host="127.0.0.1"):
    info = {
        "transport": transport,
        "signature_scheme": request.get("signature_scheme", "hmac-sha256"),
        "key": request["key"],
        "kernel_name": request["kernel_name"],
    }
    endpoints = {}
    if transport == "ipc":
        info["ip"] = os.path.join(run_dir, "k")
        for n, channel in enumerate(CHANNELS, start=1):
            info[channel + "_port"] = n
            endpoints[channel] = "%s-%d" % (info["ip"], n)
    else:
        info["ip"] = host
        for channel, port in zip(CHANNELS, free_tcp_ports(len(CHANNELS), host)):
            info[channel + "_port"] = port
            endpoints[channel] = port
    path = os.path.join(run_dir, "kernel.json")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # the key is in here
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    return path, endpoints


def endpoints_bound(transport, endpoints, host="127.0.0.1", bound=None):
    """True once every socket accepts connections (a unix socket file exists
    between bind() and listen(), so existence is not enough).

    ``bound`` (a set, kept by the caller between polls) remembers the sockets that
    answered: each is probed once, so a kernel that accepts slowly never sees a
    pile of probes fill its listen backlog."""
    bound = set() if bound is None else bound
    for name, target in endpoints.items():
        if name in bound:
            continue
        if transport == "ipc":
            if not os.path.exists(target):
                return False
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address = target
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = (host, target)
        s.settimeout(0.2)
        try:
            if s.connect_ex(address) != 0:
                return False
        finally:
            s.close()
        bound.add(name)
    return True


def tail(path, limit=STDERR_TAIL_BYTES):
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def spawn_kernel(argv, extra_env, kid, run_dir, cwd, where=""):
    """Start a kernel in its own session (so its own process group), output to
    run_dir/kernel.log, JPY_PARENT_PID = this process. Returns (Popen, log path)."""
    env = dict(os.environ)
    env.update(extra_env)
    env["JPY_PARENT_PID"] = str(os.getpid())
    env["SSHPYK_KERNEL_ID"] = kid
    env["SSHPYK_RUN_DIR"] = run_dir
    cwd = os.path.expanduser(cwd or "~")
    if not os.path.isdir(cwd):
        raise BootstrapError(
            "launch_failed", "working directory %r does not exist%s" % (cwd, where)
        )
    log_path = os.path.join(run_dir, "kernel.log")
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise BootstrapError(
                "launch_failed", "cannot start %s%s: %s" % (argv[0], where, exc)
            ) from None
    return proc, log_path


class Kernel:
    """One kernel supervised by the agent."""

    launcher = "direct"
    #: the agent's loop probes the sockets until ready (a SLURM kernel's node does that)
    polls_ready = True

    def __init__(self, agent, request):
        self.agent = agent
        self.kid = request["kid"]
        self.request = request
        self.proc = None
        self.run_dir = None
        self.log_path = None
        self.transport = None
        self.endpoints = {}
        self.ready = False
        self.exit_code = None
        self.persistent = bool(request.get("persistent"))
        self.conn_file = None
        self.cleaned = False
        self.bound = set()  # sockets seen accepting, see endpoints_bound
        self.info = {}

    def state(self):
        return {
            "kid": self.kid,
            "pid": self.proc.pid if self.proc else None,
            "run_dir": self.run_dir,
            "transport": self.transport,
            "endpoints": self.endpoints,
            "ready": self.ready,
            "exit_code": self.exit_code,
            "persistent": self.persistent,
        }

    def connection_info(self):
        """The remote connection file (with the key), for a local side that reattaches."""
        with open(self.conn_file, encoding="utf-8") as f:
            return json.load(f)

    def launch(self):
        request = self.request
        spec = find_kernelspec(request["kernel_name"])
        self.run_dir = private_run_dir(self.agent.run_root, self.kid)
        self.transport = pick_transport(request.get("transport", "auto"), spec, self.run_dir)
        conn_file, self.endpoints = write_connection_file(self.run_dir, self.transport, request)
        self.conn_file = conn_file
        argv = kernel_argv(spec, conn_file)
        env = dict(spec.get("env") or {})
        env.update(request.get("env") or {})
        self.proc, self.log_path = spawn_kernel(
            argv, env, self.kid, self.run_dir, request.get("cwd")
        )
        self.describe(argv)
        threading.Thread(target=self._wait, daemon=True).start()
        emit(
            "started",
            kid=self.kid,
            pid=self.proc.pid,
            pgid=self.proc.pid,
            run_dir=self.run_dir,
            transport=self.transport,
            endpoints=self.endpoints,
            argv=argv,
            resource_dir=spec.get("resource_dir"),
            language=spec.get("language"),
        )

    def describe(self, argv, **extra):
        """Record what `sshpyk ps` shows of this kernel (never the key)."""
        self.info = {
            "kernel_id": self.kid,
            "kernel_name": self.request["kernel_name"],
            "pid": self.proc.pid,
            "agent_pid": os.getpid(),
            "started": time.time(),
            "transport": self.transport,
            "persistent": self.persistent,
            "argv": argv,
        }
        self.info.update(extra)
        self.write_info()

    def write_info(self):
        """sshpyk.json in the run dir, replaced atomically (`ps` may read it any time)."""
        if not self.run_dir:
            return
        path = os.path.join(self.run_dir, "sshpyk.json")
        try:
            with open(path + ".tmp", "w") as f:
                json.dump(self.info, f)
            os.replace(path + ".tmp", path)
        except OSError:
            pass  # the run dir is being removed

    def _wait(self):
        code = self.proc.wait()
        self.agent.events.put(("exit", (self.kid, code)))

    def check_ready(self):
        if (
            not self.ready
            and self.exit_code is None
            and endpoints_bound(self.transport, self.endpoints, bound=self.bound)
        ):
            self.ready = True
            emit("ready", kid=self.kid)

    def on_exit(self, code):
        self.exit_code = code
        if not self.ready:
            emit(
                "error",
                kid=self.kid,
                kind="kernel_exited",
                message="the kernel exited with code %s during start" % code,
                code=code,
                stderr_tail=tail(self.log_path),
            )
        else:
            emit("exited", kid=self.kid, code=code, stderr_tail=tail(self.log_path))
        # Nothing of a dead kernel is worth keeping: reap what it left running (its
        # process group) and remove its run dir (with the key) now, not at "stop".
        self.cleanup()

    def signal(self, signum):
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signum)
            except (ProcessLookupError, PermissionError):
                pass

    def cleanup(self):
        """Kill the process group (TERM, then KILL), remove the run dir. Idempotent."""
        if self.proc is not None and not self.cleaned:
            self.cleaned = True  # the group id may be reused later: signal it once only
            if self.proc.poll() is None:
                self.signal(signal.SIGTERM)
                deadline = time.monotonic() + TERM_WAIT
                while self.proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.01)
            # Children the kernel spawned may outlive it: kill the whole group.
            self.signal(signal.SIGKILL)
            try:
                self.proc.wait(timeout=2.0)
            except Exception:
                pass
        if self.run_dir:
            remove_tree(self.run_dir)
            self.run_dir = None


class Controller:
    """A local side talking to the agent: the SSH channel's stdio, or a reattached socket."""

    def __init__(self, agent, reader, writer, closer):
        self.agent = agent
        self.reader = reader
        self.writer = writer
        self.closer = closer
        self.heard = False  # has it sent a message yet (see Agent.attach)

    def start(self):
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        while True:
            try:
                line = self.reader.readline()
            except (OSError, ValueError):
                line = b""
            if not line:
                self.agent.events.put(("eof", self))
                return
            try:
                msg = json.loads(line.decode("utf-8"))
            except ValueError:
                continue
            if isinstance(msg, dict):
                self.agent.events.put(("msg", (self, msg)))

    def close(self):
        try:
            self.closer()
        except OSError:
            pass


def stdio_controller(agent):
    def close():
        try:
            os.close(1)
        except OSError:
            pass

    return Controller(agent, sys.stdin.buffer, Output._stdout, close)


def socket_controller(agent, conn):
    rfile = conn.makefile("rb")

    def write(data):
        conn.sendall(data)

    def close():
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        rfile.close()  # the file holds a reference: the fd stays open until both close
        conn.close()

    return Controller(agent, rfile, write, close)


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


def verify_kernel_pid(pid, run_dir, owner, info=None):
    """None if ``pid`` is verifiably the kernel (or, for SLURM, the srun) of ``run_dir``,
    else why not (one line). Its process must belong to ``owner`` (the run dir's owner)
    and, where its environment is readable, carry SSHPYK_RUN_DIR=run_dir (spawn_kernel
    sets it); a SLURM kernel's srun may instead carry ``--job-name=<the record's job
    name>`` on its command line. Without /proc (macOS) the run dir checks are all there is."""
    if pid <= 1:
        return "no kernel pid recorded"
    uid = process_owner(pid)
    if uid is None:
        return None if pid_alive(pid) else "pid %d is gone" % pid
    if uid == -1:
        return "pid %d is gone" % pid
    if uid != owner:
        return "pid %d belongs to uid %d, not to the run dir's owner %d" % (pid, uid, owner)
    try:
        with open("/proc/%d/environ" % pid, "rb") as f:
            environ = f.read(4 << 20).split(b"\0")
    except OSError:
        return None  # unreadable: the owner check is what there is
    want = os.path.realpath(run_dir)
    for entry in environ:
        if entry.startswith(b"SSHPYK_RUN_DIR="):
            value = os.fsdecode(entry[len(b"SSHPYK_RUN_DIR=") :])
            if os.path.realpath(value) == want:
                return None
    job_name = (info or {}).get("job_name") if (info or {}).get("launcher") == "slurm" else None
    if job_name:
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                argv = f.read(1 << 20).split(b"\0")
            if os.fsencode("--job-name=%s" % job_name) in argv:
                return None
        except OSError:
            pass
    return "pid %d is not the kernel of %s (no SSHPYK_RUN_DIR for it)" % (pid, run_dir)


def peer_credentials(sock):
    """``(pid or None, uid)`` of the process at the other end of a connected unix
    socket, as the kernel saw it (SO_PEERCRED on Linux; LOCAL_PEERCRED and LOCAL_PEERPID
    on macOS); None where that is not available."""
    try:
        if hasattr(socket, "SO_PEERCRED"):
            size = struct.calcsize("3i")
            pid, uid, _gid = struct.unpack(
                "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, size)
            )
            return pid, uid
        if sys.platform == "darwin":
            # struct xucred {u_int cr_version; uid_t cr_uid; ...} (SOL_LOCAL 0, LOCAL_PEERCRED 1)
            data = sock.getsockopt(0, 0x001, 76)
            uid = struct.unpack_from("=Ii", data)[1]
            try:
                pid = struct.unpack("=i", sock.getsockopt(0, 0x002, 4))[0]  # LOCAL_PEERPID
            except OSError:
                pid = None
            return pid, uid
    except (OSError, struct.error):
        pass
    return None


def probe_agent(socket_path, pid, uid):
    """Whether the agent ``pid`` of ``uid`` serves ``socket_path``: True or False from
    the socket's peer credentials (connection refused: False), None if that cannot be
    told (no peer credentials, or a hung agent's listen backlog is full)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(PROBE_TIMEOUT)
    try:
        s.connect(socket_path)
        creds = peer_credentials(s)
    except (socket.timeout, BlockingIOError, InterruptedError):
        return None
    except OSError:
        return False  # refused, or no socket: nobody listens there
    finally:
        s.close()
    if creds is None:
        return None
    peer_pid, peer_uid = creds
    return peer_uid == uid and (peer_pid is None or peer_pid == pid)


def pid_runs_as(pid, uid):
    """True if ``pid`` runs and belongs to ``uid`` (where that can be told)."""
    return pid > 1 and pid_alive(pid) and process_owner(pid) in (uid, None)


def scan(roots, owner):
    """The sshpyk dirs of ``owner`` (None: of every user) under ``roots`` that pass the
    checks of read_trusted: ``(kernels, agents, unrecorded)``. ``kernels``: the records
    of run dirs (sshpyk.json) with run_dir, uid, user, alive; ``agents``: ``(uid, pid)``
    -> the record of an agent dir with dir, socket, contact, alive (see probe_agent);
    ``unrecorded``: ``(path, lstat)`` of private dirs of ``owner`` without a valid
    record (being set up, or debris). Anything else under ``roots`` is ignored."""
    kernels, agents, unrecorded = [], {}, []
    for root in roots:
        try:
            entries = sorted(os.listdir(root))
        except OSError:
            continue
        for entry in entries:
            if not entry.startswith("sshpyk-"):
                continue
            path = os.path.join(root, entry)
            is_agent = entry.startswith("sshpyk-agent-")
            record = trusted_json(path, "agent.json" if is_agent else "sshpyk.json", owner)
            if record is None:
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if private_dir_problem(st, owner) is None:
                    unrecorded.append((path, st))
                continue
            info, uid = record
            if is_agent:
                pid = as_int(info.get("pid"))
                agent = {
                    "pid": pid,
                    "uid": uid,
                    "dir": path,
                    "socket": os.path.join(path, "agent.sock"),
                    "contact": mtime(os.path.join(path, "contact")),
                }
                alive = probe_agent(agent["socket"], pid, uid) if pid > 1 else False
                agent["alive"] = pid_runs_as(pid, uid) if alive is None else alive
                agents[(uid, pid)] = agent
                continue
            info["run_dir"] = path
            info["uid"] = uid
            info["user"] = user_name(uid)
            pid = as_int(info.get("pid"))
            info["alive"] = pid_alive(pid) and verify_kernel_pid(pid, path, uid, info) is None
            kernels.append(info)
    for info in kernels:
        agent = agents.get((info["uid"], as_int(info.get("agent_pid"))))
        info["agent_alive"] = bool(agent and agent["alive"])
        info["last_contact"] = agent.get("contact") if agent else None
        info["attached"] = info["agent_alive"] and attached(agent)
        info["agent_socket"] = agent["socket"] if info["agent_alive"] else None
    return kernels, agents, unrecorded


def scan_kernels(roots, owner=-1):
    """Every sshpyk kernel run dir of ``owner`` (default: this user; None: every user)
    under ``roots`` that passes the checks, with liveness. See scan."""
    return scan(roots, os.getuid() if owner == -1 else owner)[0]


#: a local side pings at least every 5 s: silence for three pings means it is gone
ATTACHED_WITHIN = 15.0


def attached(agent_info):
    """Whether a local side was heard recently (not whether the grace period is over:
    a kernel waiting out its grace already counts as an orphan for `sshpyk kill`)."""
    contact = agent_info.get("contact")
    return contact is not None and time.time() - contact <= ATTACHED_WITHIN


def mtime(path):
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return None


def remove_tree(path, owner=None):
    """Remove a run dir or agent dir of ``owner`` (default: this user) with
    shutil.rmtree (which never follows symlinks). None once it is gone, else why it is
    not (one line). A dir that fails private_dir_problem is left alone."""
    owner = os.getuid() if owner is None else owner
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return "cannot check %s: %s" % (path, exc.strerror)
    problem = private_dir_problem(st, owner)
    if problem:
        return "not removing %s: it %s" % (path, problem)
    errors = []

    def failed(_func, where, exc):
        errors.append("%s: %s" % (where, getattr(exc, "strerror", None) or exc))

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=failed)
    else:
        shutil.rmtree(path, onerror=lambda f, where, info: failed(f, where, info[1]))
    if os.path.lexists(path):
        return "cannot remove %s: %s" % (path, errors[0] if errors else "it is still there")
    return None


def kill_group(pid):
    """TERM the process group ``pid``, KILL it if the leader outlives TERM_WAIT, and
    KILL what is left of the group. None, or why it may still run."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, signum)
        except ProcessLookupError:
            return None
        except PermissionError as exc:
            return "cannot signal process group %d: %s" % (pid, exc.strerror)
        deadline = time.monotonic() + TERM_WAIT
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not pid_alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)  # children it left in its group
            except OSError:
                pass
            return None
    return "pid %d still runs after SIGKILL" % pid


def kill_run_dir(info):
    """For `sshpyk kill` and the stale sweep: kill the kernel of a run dir found by
    scan_kernels (its process group; a SLURM kernel's job too) and remove the dir.
    Returns None, or why the kernel may still run or the dir is still there (one line).

    The pid is only signalled if verify_kernel_pid accepts it, else the dir is left.
    SLURM job ids are only acted on from a dir of the agent's own uid: as root,
    scancel could not tell whose job another user's record names."""
    run_dir = info["run_dir"]
    uid = as_int(info.get("uid"), os.getuid())
    pid = as_int(info.get("pid"))
    errors = []
    slurm = info.get("launcher") == "slurm" and "slurm" in EXTENSIONS
    if slurm and uid != os.getuid():
        slurm = False
        if info.get("job_id") or info.get("job_name"):
            errors.append(
                "SLURM job %s of uid %d not cancelled (scancel it as that user)"
                % (info.get("job_id") or info.get("job_name"), uid)
            )
    running = pid > 1 and pid_alive(pid)
    problem = verify_kernel_pid(pid, run_dir, uid, info) if running else None
    if slurm and running and problem is None:
        # first gracefully, so that the node side removes its run dir (the key) too
        extension("terminate_kernel_job")(info)
    if problem:
        errors.append("%s: not signalled" % problem)
    elif running:
        error = kill_group(pid)
        if error:
            errors.append(error)
    if slurm:
        # srun (pid) cancels its job on TERM; the job may outlive it (a SIGKILLed srun)
        extension("cancel_kernel_job")(info)
    if not problem:
        error = remove_tree(run_dir, uid)
        if error:
            errors.append(error)
    return "; ".join(errors) or None


def sweep(found, keep=(), slurm=None):
    """The stale sweep: remove this user's debris among ``found`` (what scan returned):
    agent dirs whose agent is dead (its socket refuses connections, or its peer is not
    the recorded pid of this uid), run dirs whose kernel is dead (or its pid is no
    longer that kernel) and whose agent is dead too, and, when no other agent of this
    user runs, dirs without a record older than UNRECORDED_STALE (a kernel being set up
    by a live agent has no record yet). SLURM run dirs only when the SLURM launcher is
    loaded (kill_run_dir then cancels the job; without it the record is the only trace
    of a job that may outlive its srun). Never another uid's dirs, never this agent's own,
    never the dirs in ``keep``. Returns the set of removed dirs."""
    kernels, agents, unrecorded = found
    uid, me = os.getuid(), os.getpid()
    slurm = ("slurm" in EXTENSIONS) if slurm is None else slurm
    keep = set(keep)
    removed = set()
    others_alive = False
    for agent in agents.values():
        if agent["uid"] != uid or agent["pid"] == me or agent["dir"] in keep:
            continue
        if agent["alive"]:
            others_alive = True
        elif remove_tree(agent["dir"], uid) is None:
            removed.add(agent["dir"])
    for info in kernels:
        if info["uid"] != uid or info["alive"] or info["run_dir"] in keep:
            continue
        agent_pid = as_int(info.get("agent_pid"))
        if agent_pid == me or info["agent_alive"] or pid_runs_as(agent_pid, uid):
            continue
        if info.get("launcher") != "slurm":
            # nothing to signal: the kernel is dead, or its pid is not the kernel any more
            error = remove_tree(info["run_dir"], uid)
        elif slurm:
            error = kill_run_dir(info)  # scancels a job that may have outlived srun
        else:
            continue
        if error is None:
            removed.add(info["run_dir"])
    if not others_alive:
        now = time.time()
        for path, st in unrecorded:
            if st.st_uid != uid or path in keep or now - st.st_mtime < UNRECORDED_STALE:
                continue
            if remove_tree(path, uid) is None:
                removed.add(path)
    return removed


def request_owner(msg):
    """Whose dirs a ps or kill request may see: this user's, or (``all_users``, root
    only) everybody's (None)."""
    if not msg.get("all_users"):
        return os.getuid()
    if os.getuid() != 0:
        raise BootstrapError(
            "not_permitted",
            "all_users needs root on the remote host (the agent runs as uid %d)" % os.getuid(),
        )
    return None


#: set once the agent cleans up on its way out: a SIGTERM then no longer interrupts it
CLEANING = threading.Event()

#: extensions loaded into this namespace (name -> True); see load_extension
EXTENSIONS = {}  # type: dict[str, bool]


def load_extension(name, source):
    """Compile an extension's source (``bootstrap_<name>.py``) into this namespace.

    It defines its classes and functions next to ours, so they use ours directly;
    ``extension()`` fetches them. Loading twice is a no-op."""
    if name not in EXTENSIONS:
        if name != "slurm":
            raise BootstrapError("protocol", "unknown extension %r" % name)
        namespace = globals()
        namespace["SSHPYK_" + name.upper()] = source  # for the compute node, see srun
        exec(compile(source, "sshpyk-" + name, "exec"), namespace)
        EXTENSIONS[name] = True


def extension(name):
    """A function or class of a loaded extension (the SLURM launcher)."""
    if "slurm" not in EXTENSIONS:
        raise BootstrapError("protocol", "the SLURM launcher is not loaded in this agent")
    return globals()[name]


class Agent:
    def __init__(self, hello):
        self.events = queue.Queue()
        self.kernels = {}
        self.stopping = []
        self.run_root = hello.get("run_root")
        self.grace = float(hello.get("grace") or 0)
        self.controllers = set()
        self.last_contact = time.monotonic()
        self.agent_dir = None
        self.socket_path = None
        self.listener = None
        self.detached = False  # the local side left on purpose, keeping persistent kernels

    # -- control socket, for reattaching after the SSH connection was lost ---------
    def open_socket(self):
        # The first root where the socket path fits in sun_path (~104 bytes on macOS);
        # `ps` scans the same roots, so the agent is found wherever it went.
        for root in default_run_roots(self.run_root):
            if len(os.path.join(root, "sshpyk-agent-12345678", "agent.sock")) < 104:
                break
        else:
            return  # no short enough place: reattach is impossible, the rest works
        try:
            self.agent_dir = private_run_dir(root, "agent")
        except BootstrapError:
            return
        path = os.path.join(self.agent_dir, "agent.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener = listener  # closed by cleanup, whatever fails below
        listener.bind(path)
        listener.listen(4)
        self.socket_path = path
        record = {"pid": os.getpid(), "started": time.time(), "grace": self.grace, "socket": path}
        # written last, atomically: a dir with agent.json has a listening socket
        tmp = os.path.join(self.agent_dir, "agent.json.tmp")
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, os.path.join(self.agent_dir, "agent.json"))
        self.touch()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            creds = peer_credentials(conn)
            if creds is not None and creds[1] != os.getuid():
                conn.close()  # only this user may attach (the dir is 0700 as well)
                continue
            self.events.put(("attach", socket_controller(self, conn)))

    def touch(self):
        if self.agent_dir:
            try:
                with open(os.path.join(self.agent_dir, "contact"), "w"):
                    pass
            except OSError:
                pass

    # -- the loop -------------------------------------------------------------------
    def hello(self, writer):
        emit(
            "hello",
            _only=writer,
            pid=os.getpid(),
            python=sys.executable,
            python_version="%d.%d.%d" % sys.version_info[:3],
            jupyter_client=jupyter_client_version(),
            socket=self.socket_path,
            kernels=len(self.kernels),
        )

    def attach(self, controller):
        """Add a local side. Several may be attached (an owner and `sshpyk attach`).

        It counts as heard from (grace, contact) at its first message only: a liveness
        probe (`ps` connecting to the socket, see probe_agent) must not extend the
        grace period of an agent whose local side is gone."""
        self.hello(controller.writer)
        with OUTPUT.lock:
            OUTPUT.writers.append(controller.writer)
        self.controllers.add(controller)
        controller.start()

    def detach(self, controller):
        self.controllers.discard(controller)
        with OUTPUT.lock:
            if controller.writer in OUTPUT.writers:
                OUTPUT.writers.remove(controller.writer)
        controller.close()

    def run(self):
        if self.run_root:
            self.run_root = checked_run_root(self.run_root, create=True)
        self.open_socket()
        threading.Thread(target=self._startup_sweep, daemon=True).start()
        with OUTPUT.lock:
            OUTPUT.writers = []
        stdio = stdio_controller(self)
        stdio.heard = True  # the hello was its first message
        self.attach(stdio)
        self.touch()
        while True:
            starting = [
                k
                for k in self.kernels.values()
                if k.polls_ready and not k.ready and k.exit_code is None
            ]
            try:
                kind, value = self.events.get(timeout=0.01 if starting else 1.0)
            except queue.Empty:
                kind, value = None, None
            now = time.monotonic()
            if kind == "attach":
                self.attach(value)
            elif kind == "eof":
                # a local side left or its link dropped: a reattach may follow (grace)
                self.detach(value)
            elif kind == "msg":
                controller, msg = value
                if controller in self.controllers:
                    if not controller.heard:
                        controller.heard = True
                        self.touch()
                    self.last_contact = now
                    self.detached = False
                    if msg.get("op") == "ping":
                        self.touch()
                    if self.handle(msg) == "exit":
                        return
            elif kind == "exit":
                kid, code = value
                kernel = self.kernels.get(kid)
                if kernel is not None and kernel.exit_code is None:
                    kernel.on_exit(code)
            elif kind == "node":
                kid, event = value
                kernel = self.kernels.get(kid)
                if kernel is not None:
                    kernel.on_node_event(event)
            elif kind == "fail":
                self.fail_start(*value)
            for kernel in starting:
                kernel.check_ready()
            if not self.detached and self.grace and now - self.last_contact > self.grace:
                # the local side is gone: stop what it does not want kept
                self.stop_kernels(keep_persistent=True)
                self.detached = True
            if not self.controllers and all(k.exit_code is not None for k in self.kernels.values()):
                return  # nobody to serve and nothing alive to keep

    def handle(self, msg):
        op = msg.get("op")
        kid = msg.get("kid")
        try:
            if op == "launch":
                if kid in self.kernels:
                    raise BootstrapError("protocol", "kernel %s already exists" % kid)
                if msg.get("launcher", "direct") not in ("direct", "slurm"):
                    raise BootstrapError("protocol", "unknown launcher %r" % msg["launcher"])
                cls = extension("SlurmKernel") if msg.get("launcher") == "slurm" else Kernel
                kernel = self.kernels[kid] = cls(self, msg)
                kernel.launch()
            elif op == "signal":
                if kid in self.kernels:
                    self.kernels[kid].signal(int(msg["signum"]))
            elif op == "stop":
                # Off the loop: TERM may take TERM_WAIT seconds; other kernels go on.
                kernel = self.kernels.pop(kid, None)
                thread = threading.Thread(target=self._stop, args=(kid, kernel), daemon=True)
                self.stopping.append(thread)
                thread.start()
            elif op == "state":
                emit(
                    "state", rid=msg.get("rid"), kernels=[k.state() for k in self.kernels.values()]
                )
            elif op == "connection_info":
                kernel = self.kernels.get(kid)
                if kernel is None:
                    raise BootstrapError("not_found", "no kernel %s in this agent" % kid)
                emit("connection_info", rid=msg.get("rid"), info=kernel.connection_info())
            elif op == "inspect":
                inspect(msg)
            elif op == "ps":
                owner = request_owner(msg)
                roots = default_run_roots(msg.get("run_root") or self.run_root)
                found = scan(roots, owner)
                removed = sweep(found, keep=self.own_dirs())
                kernels = [k for k in found[0] if k["run_dir"] not in removed]
                if "slurm" in EXTENSIONS:
                    kernels = extension("slurm_states")(kernels)
                emit("ps", rid=msg.get("rid"), kernels=kernels)
            elif op == "load":
                load_extension(msg.get("name"), msg.get("source") or "")
                emit("loaded", rid=msg.get("rid"), name=msg.get("name"))
            elif op == "slurm_info":
                extension("slurm_info")(msg)
            elif op == "kill":
                self.kill(msg)
            elif op == "shutdown":
                # the local side closes on purpose: keep persistent kernels only if asked
                self.stop_kernels(keep_persistent=bool(msg.get("keep_persistent")))
                self.detached = True
                # "bye" tells the local side whether to wait for this agent to exit
                emit("bye", rid=msg.get("rid"), kept=len(self.kernels))
                if not self.kernels:
                    return "exit"
            elif op != "ping":
                raise BootstrapError("protocol", "unknown op %r" % op)
        except BootstrapError as exc:
            self._failed(msg, exc.kind, exc.message)
        except Exception as exc:  # report, and keep serving the other kernels
            self._failed(msg, "internal", "%s: %s" % (type(exc).__name__, exc))
        return None

    def kill(self, msg):
        """Kill the kernels a ``kill`` request names (``kernel_id``: an id or a unique
        prefix; ``orphans``: all without a live local side), of this user or, with
        ``all_users`` (root only), of everybody. Each entry of the answer says whether
        it was ``killed`` and, if not or not wholly, the ``error``. Then the stale sweep."""
        owner = request_owner(msg)
        roots = default_run_roots(msg.get("run_root") or self.run_root)
        wanted = msg.get("kernel_id")
        found = scan(roots, owner)
        killed = []
        for info in found[0]:
            if wanted and not str(info.get("kernel_id", "")).startswith(str(wanted)):
                continue
            if not wanted and (info["attached"] or not msg.get("orphans")):
                continue
            mine = self.kernels.get(info.get("kernel_id"))
            if (
                mine is not None
                and info["uid"] == os.getuid()
                and mine.run_dir
                and os.path.realpath(mine.run_dir) == os.path.realpath(info["run_dir"])
            ):
                del self.kernels[mine.kid]
                pid = mine.proc.pid if mine.proc is not None else 0
                mine.cleanup()
                error = None
                if pid > 1 and pid_alive(pid):
                    error = "pid %d still runs" % pid
                elif os.path.lexists(info["run_dir"]):
                    error = "cannot remove %s" % info["run_dir"]
            else:
                error = kill_run_dir(info)
            info["killed"] = error is None
            info["error"] = error
            killed.append(info)
        if wanted and not killed:
            raise BootstrapError("not_found", "no sshpyk kernel %s on this host" % wanted)
        handled = {k["run_dir"] for k in killed}
        sweep(found, keep=self.own_dirs() | handled)
        emit("killed", rid=msg.get("rid"), kernels=killed)

    def own_dirs(self):
        """This agent's dirs: its own and its kernels' run dirs (the sweep leaves them)."""
        dirs = {k.run_dir for k in self.kernels.values() if k.run_dir}
        if self.agent_dir:
            dirs.add(self.agent_dir)
        return dirs

    def _startup_sweep(self):
        """The stale sweep when an agent starts (off the loop: it does not delay hello)."""
        try:
            sweep(scan(default_run_roots(self.run_root), os.getuid()), keep=self.own_dirs())
        except Exception:
            pass  # debris stays for the next sweep; it must not disturb this agent

    def stop_kernels(self, keep_persistent):
        for kid, kernel in list(self.kernels.items()):
            if keep_persistent and kernel.persistent:
                continue
            del self.kernels[kid]
            kernel.cleanup()

    def fail_start(self, kid, kind, message):
        """A kernel cannot start (e.g. its SLURM job waited too long): clean up, then tell."""
        kernel = self.kernels.get(kid)
        if kernel is None or kernel.ready or kernel.exit_code is not None:
            return
        if getattr(kernel, "running_since", None) is not None:
            return  # it started meanwhile
        del self.kernels[kid]
        kernel.exit_code = -1

        def fail():
            kernel.cleanup()
            emit("error", kid=kid, kind=kind, message=message, stderr_tail=tail(kernel.log_path))

        thread = threading.Thread(target=fail, daemon=True)
        self.stopping.append(thread)
        thread.start()

    def _stop(self, kid, kernel):
        if kernel is not None:
            kernel.cleanup()
        emit("stopped", kid=kid)

    def _failed(self, msg, kind, message):
        kid = msg.get("kid")
        if msg.get("op") == "launch" and kid in self.kernels:
            self.kernels.pop(kid).cleanup()
        emit("error", kid=kid, rid=msg.get("rid"), kind=kind, message=message)

    def cleanup(self):
        """On every way out of main(): the agent dir goes first (nobody can attach to an
        agent that is leaving), then every kernel, each whatever the others do."""
        CLEANING.set()  # SIGTERM no longer interrupts (see the __main__ block)
        try:
            if self.listener is not None:
                self.listener.close()
        finally:
            if self.agent_dir:
                remove_tree(self.agent_dir)
            for kernel in list(self.kernels.values()):
                try:
                    kernel.cleanup()
                except Exception:
                    pass
            self.kernels.clear()
            for thread in self.stopping:
                thread.join(TERM_WAIT + 5)


def inspect(msg):
    spec = find_kernelspec(msg["kernel_name"])
    emit(
        "info",
        rid=msg.get("rid"),
        kernelspec={
            k: spec.get(k)
            for k in ("argv", "display_name", "language", "interrupt_mode", "resource_dir")
        },
    )


def relay(path):
    """Attach mode: pipe this channel's stdio to a running agent's control socket.

    Only to an agent of this user: the socket's dir must be a private dir of ours and
    the peer (SO_PEERCRED) our uid and, if its agent.json says, that pid; else an error
    ``unsafe_path``."""
    uid = os.getuid()
    path = str(path)
    directory = os.path.dirname(path)
    record = trusted_json(directory, "agent.json", uid)
    try:
        st = os.lstat(directory)
        problem = private_dir_problem(st, uid)
    except OSError:
        problem = None  # gone: the connect below says so
    if problem:
        emit(
            "error",
            kind="unsafe_path",
            message="not attaching to %s: its directory %s" % (path, problem),
        )
        return 1
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError as exc:
        emit("error", kind="agent_gone", message="no agent listens on %s: %s" % (path, exc))
        return 1
    creds = peer_credentials(conn)
    want_pid = as_int(record[0].get("pid")) if record else 0
    if creds is not None and (
        creds[1] != uid or (want_pid > 1 and creds[0] is not None and creds[0] != want_pid)
    ):
        conn.close()
        emit(
            "error",
            kind="unsafe_path",
            message="not attaching to %s: it is served by pid %s of uid %d, not by your agent"
            % (path, creds[0], creds[1]),
        )
        return 1
    done = threading.Event()

    def upstream():
        stdin = sys.stdin.buffer
        while True:
            data = stdin.read1(65536) if hasattr(stdin, "read1") else stdin.read(1)
            if not data:
                break
            conn.sendall(data)
        try:
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        done.set()

    def downstream():
        out = sys.stdout.buffer
        while True:
            data = conn.recv(65536)
            if not data:
                break
            out.write(data)
            out.flush()
        done.set()

    for target in (upstream, downstream):
        threading.Thread(target=target, daemon=True).start()
    done.wait()
    return 0


def main():
    line = sys.stdin.buffer.readline()
    try:
        hello = json.loads(line.decode("utf-8"))
    except ValueError:
        emit("error", kind="protocol", message="the first line was not a JSON request")
        return 2
    if hello.get("v") != PROTOCOL or hello.get("op") not in ("hello", "attach", "node"):
        emit(
            "error",
            kind="protocol",
            message="protocol version %r not supported (remote speaks %d)"
            % (hello.get("v"), PROTOCOL),
        )
        return 2
    if hello.get("op") == "attach":
        return relay(hello["socket"])
    if hello.get("op") == "node":
        try:
            load_extension("slurm", globals().get("SSHPYK_SLURM") or "")
            return extension("run_node")(hello)
        except BootstrapError as exc:
            emit("error", kind=exc.kind, message=exc.message)
            return 1
    agent = Agent(hello)
    try:
        agent.run()
        return 0
    except BootstrapError as exc:
        emit("error", kind=exc.kind, message=exc.message)
        return 1
    finally:
        agent.cleanup()


if __name__ == "__main__":
    # SIGTERM unwinds through main()'s finally, which cleans up every kernel. SIGHUP is
    # ignored: a lost connection is noticed through EOF and heartbeats, and the agent
    # keeps the kernels for the grace period so that the local side can reattach.
    # A SIGTERM during that cleanup is ignored: unwinding out of it would leave the
    # agent dir or kernels behind.
    signal.signal(signal.SIGTERM, lambda *_: None if CLEANING.is_set() else sys.exit(143))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        status = main()
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    # Daemon threads may still block in reads; a normal interpreter exit would then
    # abort on the stdin buffer lock. Everything is flushed and cleaned.
    try:
        sys.stdout.flush()
    finally:
        os._exit(status)

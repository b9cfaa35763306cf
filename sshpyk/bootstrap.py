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
    {"op": "ps", "rid": 1, "run_root": null}        # all sshpyk kernels of this user here
    {"op": "kill", "rid": 1, "kernel_id": ...|null, "orphans": false}
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
    {"event": "state"|"connection_info"|"ps"|"killed", "rid", ...}
    {"event": "bye", "rid", "kept"}                 # answer to shutdown
    {"event": "error", "kid"|"rid", "kind", "message"}

Each kernel runs in its own session (so its own process group) with
``JPY_PARENT_PID`` set to the agent, so it also exits if the agent is SIGKILLed.
Several local sides may be attached at once (an owner and ``sshpyk attach``);
events go to all of them. When no local side has been heard for ``grace``
seconds (a dropped link, a crashed client) the agent kills every non-persistent
kernel's process group and removes its run directory; a kernel that exits on its
own is reaped at once. The HMAC key only travels over stdin and into a 0600 file
in a 0700 directory.

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


def private_run_dir(run_root, kernel_id):
    roots = [run_root] if run_root else []
    if not run_root:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        if xdg and os.path.isdir(xdg) and os.access(xdg, os.W_OK):
            roots.append(xdg)
        roots.append(tempfile.gettempdir())
    last = None
    for root in roots:
        try:
            if run_root:
                os.makedirs(root, mode=0o700, exist_ok=True)
            path = tempfile.mkdtemp(prefix="sshpyk-%s-" % (kernel_id or "k")[:8], dir=root)
            os.chmod(path, 0o700)
            return path
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
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None


class Controller:
    """A local side talking to the agent: the SSH channel's stdio, or a reattached socket."""

    def __init__(self, agent, reader, writer, closer):
        self.agent = agent
        self.reader = reader
        self.writer = writer
        self.closer = closer

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


def default_run_roots(extra=None):
    roots = []
    for root in [extra, os.environ.get("XDG_RUNTIME_DIR"), tempfile.gettempdir()]:
        if root and os.path.isdir(root) and root not in roots:
            roots.append(root)
    return roots


def scan_kernels(roots):
    """Every sshpyk kernel run dir of this user under ``roots``, with liveness."""
    found = []
    agents = {}
    for root in roots:
        try:
            entries = os.listdir(root)
        except OSError:
            continue
        for entry in entries:
            path = os.path.join(root, entry)
            if not entry.startswith("sshpyk-"):
                continue
            if entry.startswith("sshpyk-agent-"):
                info = read_json(os.path.join(path, "agent.json"))
                if info:
                    info["contact"] = mtime(os.path.join(path, "contact"))
                    agents[info.get("pid")] = info
                continue
            info = read_json(os.path.join(path, "sshpyk.json"))
            if info is None:
                continue
            info["run_dir"] = path
            info["alive"] = pid_alive(int(info.get("pid") or 0))
            found.append(info)
    for info in found:
        agent = agents.get(info.get("agent_pid"))
        info["agent_alive"] = bool(agent) and pid_alive(int(info.get("agent_pid") or 0))
        info["last_contact"] = agent.get("contact") if agent else None
        info["attached"] = bool(agent) and info["agent_alive"] and attached(agent)
        info["agent_socket"] = agent.get("socket") if agent and info["agent_alive"] else None
    return found


#: a local side pings at least every 5 s: silence for three pings means it is gone
ATTACHED_WITHIN = 15.0


def attached(agent_info):
    """Whether a local side was heard recently (not whether the grace period is over:
    a kernel waiting out its grace already counts as an orphan for `sshpyk kill`)."""
    contact = agent_info.get("contact")
    return contact is not None and time.time() - contact <= ATTACHED_WITHIN


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
        return value if isinstance(value, dict) else None
    except (OSError, ValueError):
        return None


def mtime(path):
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def kill_run_dir(info):
    if info.get("launcher") == "slurm" and info.get("alive") and "slurm" in EXTENSIONS:
        # first gracefully, so that the node side removes its run dir (the key) too
        extension("terminate_kernel_job")(info)
    pid = int(info.get("pid") or 0)
    if pid > 1 and info.get("alive"):
        for signum in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pid, signum)
            except (ProcessLookupError, PermissionError):
                break
            deadline = time.monotonic() + TERM_WAIT
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if not pid_alive(pid):
                break
    if info.get("launcher") == "slurm" and "slurm" in EXTENSIONS:
        # srun (pid) cancels its job on TERM; the job may outlive it (a SIGKILLed srun)
        extension("cancel_kernel_job")(info)
    shutil.rmtree(info["run_dir"], ignore_errors=True)


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
        listener.bind(path)
        listener.listen(4)
        self.listener, self.socket_path = listener, path
        with open(os.path.join(self.agent_dir, "agent.json"), "w") as f:
            json.dump(
                {"pid": os.getpid(), "started": time.time(), "grace": self.grace, "socket": path},
                f,
            )
        self.touch()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
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
        """Add a local side. Several may be attached (an owner and `sshpyk attach`)."""
        self.hello(controller.writer)
        with OUTPUT.lock:
            OUTPUT.writers.append(controller.writer)
        self.controllers.add(controller)
        self.last_contact = time.monotonic()
        self.detached = False
        self.touch()
        controller.start()

    def detach(self, controller):
        self.controllers.discard(controller)
        with OUTPUT.lock:
            if controller.writer in OUTPUT.writers:
                OUTPUT.writers.remove(controller.writer)
        controller.close()

    def run(self):
        self.open_socket()
        with OUTPUT.lock:
            OUTPUT.writers = []
        self.attach(stdio_controller(self))
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
                    self.last_contact = now
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
                roots = default_run_roots(msg.get("run_root") or self.run_root)
                kernels = scan_kernels(roots)
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
        roots = default_run_roots(msg.get("run_root") or self.run_root)
        wanted = msg.get("kernel_id")
        killed = []
        for info in scan_kernels(roots):
            if wanted and not str(info.get("kernel_id", "")).startswith(wanted):
                continue
            if not wanted and (info["attached"] or not msg.get("orphans")):
                continue
            mine = self.kernels.pop(info.get("kernel_id"), None)
            if mine is not None:
                mine.cleanup()
            else:
                kill_run_dir(info)
            killed.append(info)
        if wanted and not killed:
            raise BootstrapError("not_found", "no sshpyk kernel %s on this host" % wanted)
        emit("killed", rid=msg.get("rid"), kernels=killed)

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
        for kernel in list(self.kernels.values()):
            kernel.cleanup()
        self.kernels.clear()
        for thread in self.stopping:
            thread.join(TERM_WAIT + 5)
        if self.listener is not None:
            self.listener.close()
        if self.agent_dir:
            shutil.rmtree(self.agent_dir, ignore_errors=True)


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
    """Attach mode: pipe this channel's stdio to a running agent's control socket."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError as exc:
        emit("error", kind="agent_gone", message="no agent listens on %s: %s" % (path, exc))
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
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
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

"""The direct launcher: the kernel is a process next to the agent, in a session (so a
process group) of its own, with ``JPY_PARENT_PID`` set to the agent, so it also exits if
the agent is SIGKILLed. Also the helpers every launcher uses to start a kernel process
(its connection file, its sockets, its log)."""

import json
import os
import socket
import subprocess

from .kernelspecs import find_kernelspec, kernel_argv
from .launcher import Launcher, register
from .paths import private_run_dir
from .procgroup import signal_group, stop_group
from .protocol import CHANNELS, AgentError, Event, Kind

# sun_path holds 108 bytes including the NUL; leave room for "-N".
MAX_IPC_PREFIX = 100
STDERR_TAIL_BYTES = 4000


def pick_transport(requested, spec, run_dir):
    joined = " ".join(spec.get("argv") or [])
    prefix_ok = len(os.path.join(run_dir, "k")) <= MAX_IPC_PREFIX
    if requested == "ipc":
        if not prefix_ok:
            raise AgentError(
                Kind.LAUNCH_FAILED, "run directory %r is too long for unix sockets" % run_dir
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
        raise AgentError(Kind.LAUNCH_FAILED, "working directory %r does not exist%s" % (cwd, where))
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
            raise AgentError(
                Kind.LAUNCH_FAILED, "cannot start %s%s: %s" % (argv[0], where, exc)
            ) from None
    return proc, log_path


@register
class DirectKernel(Launcher):
    """A kernel started by the agent itself (``launcher: direct``)."""

    name = "direct"
    holds_spares = True
    scans_ports = True
    runs_here = True

    def __init__(self, agent, request):
        Launcher.__init__(self, agent, request)
        self.conn_file = None
        self.bound = set()  # sockets seen accepting, see endpoints_bound

    def connection_info(self):
        """The remote connection file (with the key), for a local side that reattaches."""
        with open(self.conn_file, encoding="utf-8") as f:
            return json.load(f)

    def launch(self):
        request = self.request
        spec = find_kernelspec(request["kernel_name"])
        self.run_dir = private_run_dir(self.agent.run_root, self.kid)
        self.transport = pick_transport(request.get("transport", "auto"), spec, self.run_dir)
        self.conn_file, self.endpoints = write_connection_file(
            self.run_dir, self.transport, request
        )
        argv = kernel_argv(spec, self.conn_file)
        env = dict(spec.get("env") or {})
        env.update(request.get("env") or {})
        self.proc, self.log_path = spawn_kernel(
            argv, env, self.kid, self.run_dir, request.get("cwd")
        )
        self.describe(argv)
        self.emit_started(argv, spec, self.endpoints)

    def poll_exit(self):
        """The kernel's exit code once it ended (the agent's loop reaps: no waiter
        thread per kernel)."""
        return self.proc.poll() if self.proc is not None else None

    def check_ready(self):
        if (
            not self.ready
            and self.exit_code is None
            and endpoints_bound(self.transport, self.endpoints, bound=self.bound)
        ):
            self.ready = True
            self.emit(Event.READY)

    def on_exit(self, code):
        self.exit_code = code
        stderr_tail = tail(self.log_path)
        # Nothing of a dead kernel is worth keeping: reap what it left running (its
        # process group) and remove its run dir (with the key) now, not at "stop", and
        # before telling. The leader is gone, so this does not wait.
        self.cleanup()
        self.report_exit(code, stderr_tail)

    def signal(self, signum):
        if self.proc is not None:
            signal_group(self.proc.pid, signum)

    def _cleanup(self):
        """Kill the process group (TERM, then KILL), remove the run dir."""
        if self.proc is not None:
            stop_group(self.proc.pid, self.proc)
        self.remove_run_dir()

"""The remote side of sshpyk: a stdlib-only supervisor fed to the remote Python.

This file is never imported locally. ``sshpyk.remote`` sends its source over
the SSH channel's stdin to ``python -c <loader>``; nothing is installed or left
on the remote host. It speaks protocol version ``PROTOCOL`` as JSON lines:

local -> remote (stdin), first line is the request::

    {"v": 1, "op": "inspect", "kernel_name": "python3"}
    {"v": 1, "op": "launch", "kernel_name": ..., "key": ..., "signature_scheme": ...,
     "transport": "auto|ipc|tcp", "env": {...}, "cwd": ..., "run_root": ...,
     "grace": 60.0, "kernel_id": ...}

then, for a launch, any number of::

    {"op": "ping"}                     # heartbeat from the local side
    {"op": "signal", "signum": 2}      # delivered to the kernel's process group
    {"op": "stop"}                     # kill the process group, clean up, exit

remote -> local (stdout)::

    {"v": 1, "event": "info", ...}          # answer to inspect
    {"v": 1, "event": "started", "pid", "pgid", "run_dir", "transport", "endpoints"}
    {"v": 1, "event": "ready"}              # all five sockets are bound
    {"v": 1, "event": "exited", "code": N, "stderr_tail": "..."}
    {"v": 1, "event": "error", "kind": "...", "message": "..."}

The kernel runs in its own session (so its own process group) with
``JPY_PARENT_PID`` set to this supervisor, so it also exits if the supervisor is
SIGKILLed. When the local side is gone (stdin EOF, or no line for ``grace``
seconds) the supervisor kills the whole process group and removes the private
run directory. The HMAC key only travels over stdin and into a 0600 file inside
a 0700 directory.

Remote Python >= 3.8; no syntax or module beyond the standard library, except
for ``jupyter_core``/``jupyter_client`` of the remote environment, used to find
kernelspecs.
"""

import importlib.util
import json
import os
import queue
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time

PROTOCOL = 1
CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
# sun_path holds 108 bytes including the NUL; leave room for "-N".
MAX_IPC_PREFIX = 100
STDERR_TAIL_BYTES = 4000


class BootstrapError(Exception):
    def __init__(self, kind, message):
        Exception.__init__(self, message)
        self.kind = kind
        self.message = message


_out_lock = threading.Lock()


def emit(event, **fields):
    fields["v"] = PROTOCOL
    fields["event"] = event
    line = json.dumps(fields) + "\n"
    with _out_lock:
        try:
            sys.stdout.write(line)
            sys.stdout.flush()
        except (OSError, ValueError):
            pass  # the local side is gone; the supervisor loop notices via stdin


def jupyter_client_version():
    if importlib.util.find_spec("jupyter_client") is None:
        raise BootstrapError(
            "jupyter_client_missing",
            "jupyter_client is not installed for %s" % sys.executable,
        )
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
    jupyter_client_version()
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
        raise BootstrapError("jupyter_client_missing", "cannot import jupyter_client: %s" % exc)
    try:
        ks = KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel:
        raise BootstrapError(
            "kernelspec_not_found",
            "no kernelspec named %r for %s (available: %s)"
            % (name, sys.executable, ", ".join(sorted(available_kernels(dirs))) or "none"),
        )
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


def free_tcp_ports(count):
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def write_connection_file(run_dir, transport, request):
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
        info["ip"] = "127.0.0.1"
        for channel, port in zip(CHANNELS, free_tcp_ports(len(CHANNELS)), strict=False):
            info[channel + "_port"] = port
            endpoints[channel] = port
    path = os.path.join(run_dir, "kernel.json")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    return path, endpoints


def endpoints_bound(transport, endpoints):
    for target in endpoints.values():
        if transport == "ipc":
            if not os.path.exists(target):
                return False
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(0.2)
            try:
                if s.connect_ex(("127.0.0.1", target)) != 0:
                    return False
            finally:
                s.close()
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


class Supervisor:
    def __init__(self, request):
        self.request = request
        self.events = queue.Queue()
        self.proc = None
        self.run_dir = None
        self.log_path = None
        self.grace = float(request.get("grace") or 0)

    def launch(self):
        request = self.request
        spec = find_kernelspec(request["kernel_name"])
        self.run_dir = private_run_dir(request.get("run_root"), request.get("kernel_id"))
        transport = pick_transport(request.get("transport", "auto"), spec, self.run_dir)
        conn_file, endpoints = write_connection_file(self.run_dir, transport, request)
        argv = kernel_argv(spec, conn_file)
        env = dict(os.environ)
        env.update(spec.get("env") or {})
        env.update(request.get("env") or {})
        env["JPY_PARENT_PID"] = str(os.getpid())
        env["SSHPYK_RUN_DIR"] = self.run_dir
        if request.get("kernel_id"):
            env["SSHPYK_KERNEL_ID"] = request["kernel_id"]
        cwd = request.get("cwd") or os.path.expanduser("~")
        cwd = os.path.expanduser(cwd)
        if not os.path.isdir(cwd):
            raise BootstrapError(
                "launch_failed", "remote working directory %r does not exist" % cwd
            )
        self.log_path = os.path.join(self.run_dir, "kernel.log")
        import subprocess

        log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(
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
            raise BootstrapError("launch_failed", "cannot start %s: %s" % (argv[0], exc))
        finally:
            log.close()
        emit(
            "started",
            pid=self.proc.pid,
            pgid=self.proc.pid,
            run_dir=self.run_dir,
            transport=transport,
            endpoints=endpoints,
            argv=argv,
            resource_dir=spec.get("resource_dir"),
            language=spec.get("language"),
            supervisor_pid=os.getpid(),
        )
        return transport, endpoints

    def _read_stdin(self):
        stdin = sys.stdin.buffer
        while True:
            try:
                line = stdin.readline()
            except (OSError, ValueError):
                line = b""
            if not line:
                self.events.put(("eof", None))
                return
            try:
                msg = json.loads(line.decode("utf-8"))
            except ValueError:
                continue
            self.events.put(("msg", msg))

    def _wait_kernel(self):
        code = self.proc.wait()
        self.events.put(("exit", code))

    def run(self):
        transport, endpoints = self.launch()
        for target in (self._read_stdin, self._wait_kernel):
            threading.Thread(target=target, daemon=True).start()
        ready = False
        last_contact = time.monotonic()
        while True:
            timeout = 0.01 if not ready else 1.0
            try:
                kind, value = self.events.get(timeout=timeout)
            except queue.Empty:
                kind, value = None, None
            now = time.monotonic()
            if kind == "exit":
                if not ready:
                    emit(
                        "error",
                        kind="kernel_exited",
                        message="the kernel exited with code %s during start" % value,
                        code=value,
                        stderr_tail=tail(self.log_path),
                    )
                else:
                    emit("exited", code=value, stderr_tail=tail(self.log_path))
                self.cleanup()
                return
            if kind == "eof":
                self.cleanup()
                return
            if kind == "msg":
                last_contact = now
                op = value.get("op")
                if op == "signal":
                    self.signal(int(value["signum"]))
                elif op == "stop":
                    self.cleanup()
                    return
            if not ready and endpoints_bound(transport, endpoints):
                ready = True
                emit("ready")
            if self.grace and now - last_contact > self.grace:
                self.cleanup()
                return

    def signal(self, signum):
        try:
            os.killpg(self.proc.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def cleanup(self):
        if self.proc is not None:
            if self.proc.poll() is None:
                self.signal(signal.SIGTERM)
                deadline = time.monotonic() + 2.0
                while self.proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.02)
            # Children the kernel spawned may outlive it: kill the whole group.
            self.signal(signal.SIGKILL)
            try:
                self.proc.wait(timeout=2.0)
            except Exception:
                pass
        if self.run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None


def inspect(request):
    info = {
        "python": sys.executable,
        "python_version": "%d.%d.%d" % sys.version_info[:3],
        "jupyter_client": None,
        "kernelspec": None,
    }
    info["jupyter_client"] = jupyter_client_version()
    if request.get("kernel_name"):
        spec = find_kernelspec(request["kernel_name"])
        info["kernelspec"] = {
            k: spec.get(k)
            for k in ("argv", "display_name", "language", "interrupt_mode", "resource_dir")
        }
    emit("info", **info)


def main():
    line = sys.stdin.buffer.readline()
    try:
        request = json.loads(line.decode("utf-8"))
    except ValueError:
        emit("error", kind="protocol", message="the first line was not a JSON request")
        return 2
    if request.get("v") != PROTOCOL:
        emit(
            "error",
            kind="protocol",
            message="protocol version %r not supported (remote speaks %d)"
            % (request.get("v"), PROTOCOL),
        )
        return 2
    supervisor = None
    try:
        if request.get("op") == "inspect":
            inspect(request)
            return 0
        if request.get("op") == "launch":
            supervisor = Supervisor(request)
            supervisor.run()
            return 0
        raise BootstrapError("protocol", "unknown op %r" % request.get("op"))
    except BootstrapError as exc:
        emit("error", kind=exc.kind, message=exc.message)
        return 1
    except Exception as exc:  # report instead of dying silently
        emit("error", kind="internal", message="%s: %s" % (type(exc).__name__, exc))
        return 1
    finally:
        if supervisor is not None:
            supervisor.cleanup()


if __name__ == "__main__":
    # SIGTERM/SIGHUP unwind through main()'s finally, which cleans up the kernel.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    try:
        status = main()
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    # Daemon threads may still block in stdin.readline(); a normal interpreter exit
    # would then abort on the stdin buffer lock. Everything is flushed and cleaned.
    try:
        sys.stdout.flush()
    finally:
        os._exit(status)

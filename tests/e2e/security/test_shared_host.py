"""A shared remote host: a second, unprivileged local user (the attacker, see
support/second_user.py) attacks the victim's sshpyk on the same machine; every attack fails.

The victim logs in as root through the throwaway sshd (the remote is this host). The
attacker can write to the shared temp dir (/tmp, a default run root), run processes
and listen on unix sockets, nothing more. Attacks replayed:

* planted run dirs (``sshpyk-*/sshpyk.json``) naming the victim's processes, plain or
  SLURM-looking: ``ps`` does not list them, ``kill`` does not touch them;
* a planted agent record (``sshpyk-agent-*/agent.json``) carrying the victim agent's
  pid and a socket of the attacker's, served by a fake agent: ``ps`` and ``attach``
  keep using the real agent;
* a remote kernel id with ``../`` in it: it never becomes a local path;
* run roots another user can write to: refused before anything starts;
* the provisioner's local forwards: private unix sockets, no TCP listener;
* the pre-command's text in other users' ``ps``;
* ``attach --connection-file`` over a symlink, a 0644 file, a new parent dir;
* a SIGKILLed agent's dirs and keys, cleaned up by the next agent;
* root's ``kill`` acting on another user's well-formed kernel record;
* a ``--remote-python`` starting with ``-``.

Entries are planted in the real /tmp (a default run root) with unique names and
removed afterwards; assertions only concern our own entries and processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import sshpyk as sshpyk_pkg
from sshpyk import SSHSession
from sshpyk.kernels.kernel import KernelOptions
from sshpyk.kernelspec import kernels_dir

from support.cli import SSHPYK, KernelOwner, add_args, assert_one_line_error, sshpyk
from support.errors import one_line
from support.kernels import run_cell, start_manager, stop_manager
from support.second_user import SecondUser
from support.waiting import pid_alive, remote_processes, wait_until

pytestmark = pytest.mark.timeout(180)

PY = sys.executable
TMP = Path(tempfile.gettempdir())
CHANNELS = ("shell", "iopub", "stdin", "control", "hb")


# -- helpers ---------------------------------------------------------------------------


def host(sshd: Any, *extra: str) -> list[str]:
    """ALIAS and the options every ps/kill/attach here needs."""
    return [sshd.alias, "--ssh-config", str(sshd.ssh_config), "--remote-python", PY, *extra]


def ps_kernels(sshd: Any, *extra: str) -> list[dict[str, Any]]:
    result = sshpyk("ps", "--json", *host(sshd, *extra))
    assert result.exit_code == 0, (result.output, result.exception)
    (answer,) = json.loads(result.stdout)["hosts"]
    assert answer["error"] is None, answer
    return list(answer["kernels"])


def find(kernels: list[dict[str, Any]], kernel_id: str) -> dict[str, Any]:
    (kernel,) = [k for k in kernels if k.get("kernel_id") == kernel_id]
    return kernel


def mentions(kernels: list[dict[str, Any]], *needles: object) -> list[dict[str, Any]]:
    """The entries whose JSON mentions any of ``needles``."""
    return [k for k in kernels if any(str(n) in json.dumps(k) for n in needles)]


def dead_pid() -> int:
    """A pid that no process has (one that just exited and was reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait(10)
    return proc.pid


def token() -> str:
    return secrets.token_hex(4)


@contextlib.contextmanager
def root_sleep() -> Iterator[subprocess.Popen[bytes]]:
    """A victim (root) process leading its own process group, like a kernel does."""
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


@contextlib.contextmanager
def attacker_sleep(user: SecondUser) -> Iterator[subprocess.Popen[str]]:
    proc = user.popen(["sleep", "300"], start_new_session=True)
    try:
        yield proc
    finally:
        user.stop(proc)


PLANT = """
import json, os, sys
path, mode, files = sys.argv[1], int(sys.argv[2], 8), json.loads(sys.argv[3])
os.mkdir(path, 0o700)
for name, data in files.items():
    fd = os.open(os.path.join(path, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(data if isinstance(data, str) else json.dumps(data))
os.chmod(path, mode)
"""


@contextlib.contextmanager
def planted(
    user: SecondUser, name: str, files: dict[str, Any], mode: int = 0o700
) -> Iterator[Path]:
    """``/tmp/NAME/`` with ``files``, created by the attacker (its files, its dir)."""
    path = TMP / name
    try:
        user.run_python(PLANT, str(path), oct(mode), json.dumps(files))
        assert path.stat().st_uid == user.uid
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def kernel_record(kernel_id: str, pid: int, agent_pid: int, **extra: Any) -> dict[str, Any]:
    """What an agent writes to a run dir's sshpyk.json."""
    return {
        "kernel_id": kernel_id,
        "kernel_name": "python3",
        "pid": pid,
        "agent_pid": agent_pid,
        "started": time.time() - 600,
        "transport": "tcp",
        "persistent": False,
        "attached": False,
        "argv": ["python3", "-m", "ipykernel_launcher", "-f", "kernel.json"],
        **extra,
    }


FAKE_AGENT = r"""
import json, os, socket, sys, threading, time
path, log, agent_pid, kid, kernel_pid, key = sys.argv[1:]

def note(text):
    with open(log, "a") as f:
        f.write(text + "\n")

server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
os.chmod(path, 0o777)
server.listen(8)

def serve(conn):
    note("connect")
    f = conn.makefile("rwb")

    def send(**event):
        event["v"] = 1
        f.write((json.dumps(event) + "\n").encode())
        f.flush()

    try:
        send(event="hello", pid=int(agent_pid), python=sys.executable, python_version="3.11.0",
             jupyter_client="8.6.0", socket=path, kernels=1)
        for line in f:
            msg = json.loads(line)
            op, rid = msg.get("op"), msg.get("rid")
            note("op " + str(op))
            if op == "state":
                send(event="state", rid=rid, kernels=[{
                    "kid": kid, "pid": int(kernel_pid), "run_dir": "/tmp/attacker",
                    "transport": "tcp", "endpoints": {c: 9 for c in
                    ("shell", "iopub", "stdin", "control", "hb")}, "ready": True,
                    "exit_code": None, "persistent": True}])
            elif op == "connection_info":
                info = {"transport": "tcp", "ip": "127.0.0.1", "key": key,
                        "signature_scheme": "hmac-sha256", "kernel_name": "python3"}
                for n, c in enumerate(("shell", "iopub", "stdin", "control", "hb")):
                    info[c + "_port"] = 9
                send(event="connection_info", rid=rid, info=info)
            elif op == "ps":
                send(event="ps", rid=rid, kernels=[])
            elif rid is not None:
                send(event=str(op), rid=rid, kernels=[])
    except (OSError, ValueError):
        pass

print("ready", flush=True)
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


class FakeAgent:
    """The attacker's sshpyk-lookalike agent behind a planted ``sshpyk-agent-*`` dir."""

    def __init__(self, user: SecondUser, agent_pid: int, kid: str, kernel_pid: int) -> None:
        self.user = user
        self.dir = TMP / f"sshpyk-agent-{token()}"
        self.socket = str(self.dir / "agent.sock")
        self.log = self.dir / "log"
        self.key = f"attacker-key-{token()}"
        self.proc: subprocess.Popen[str] | None = None
        user.run_python(PLANT, str(self.dir), "0o755", json.dumps({"log": ""}))
        self.proc = user.popen_python(
            FAKE_AGENT,
            self.socket,
            str(self.log),
            str(agent_pid),
            kid,
            str(kernel_pid),
            self.key,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 20)
        assert ready and self.proc.stdout.readline().strip() == "ready", "fake agent down"
        record = {"pid": agent_pid, "started": time.time(), "grace": 60.0, "socket": self.socket}
        user.run_python(
            "import json, os, sys; d = sys.argv[1]\n"
            "open(os.path.join(d, 'agent.json'), 'w').write(sys.argv[2])\n"
            "open(os.path.join(d, 'contact'), 'w').close()",
            str(self.dir),
            json.dumps(record),
        )

    def connections(self) -> list[str]:
        try:
            return self.log.read_text().split("\n")[:-1]
        except OSError:
            return []

    def close(self) -> None:
        if self.proc is not None:
            self.user.stop(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def fake_agent(user: SecondUser, agent_pid: int, kid: str, kernel_pid: int) -> Iterator[FakeAgent]:
    fake = None
    try:
        fake = FakeAgent(user, agent_pid, kid, kernel_pid)
        yield fake
    finally:
        if fake is not None:
            fake.close()
        else:  # planted halfway
            for path in TMP.glob("sshpyk-agent-*"):
                with contextlib.suppress(OSError):
                    if path.stat().st_uid == user.uid:
                        shutil.rmtree(path, ignore_errors=True)


class Attach:
    """``sshpyk attach`` in a subprocess, until it prints its connection file or exits."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*SSHPYK, "attach", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.stderr = ""
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with contextlib.suppress(OSError, ValueError):
            for line in self.proc.stdout:
                self._queue.put(line)
        self._queue.put(None)

    def wait_attached(self, timeout: float = 60.0) -> bool:
        """True once it printed ``Connection file:``; False if it exited first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"sshpyk attach neither attached nor exited: {self.lines}"
                ) from None
            if line is None:
                break
            self.lines.append(line)
            if line.startswith("Connection file:"):
                return True
        self.proc.wait(20)
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()
        return False

    @property
    def connection_file(self) -> Path:
        line = next(x for x in self.lines if x.startswith("Connection file:"))
        return Path(line.split(":", 1)[1].strip())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._pump.join(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def assert_one_line_error(self) -> str:
        assert self.proc.returncode not in (0, None), self.proc.returncode
        lines = self.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), self.stderr
        assert "Traceback" not in self.stderr
        return lines[0]


@contextlib.contextmanager
def attached(*args: str) -> Iterator[Attach]:
    attach = Attach(*args)
    try:
        yield attach
    finally:
        attach.close()


@pytest.fixture
def owner(sshd, run_root) -> Iterator[KernelOwner]:
    """A real victim kernel, held by another local process, in the test's run root."""
    owner = KernelOwner(sshd, run_root)
    yield owner
    owner.stop()


@pytest.fixture
def short_root() -> Iterator[Path]:
    """A private (0700) run root short enough for the agent's socket dir to go there too
    (a long one sends it to /tmp, next to the attacker's planted entries)."""
    path = Path(tempfile.mkdtemp(prefix="r-", dir=TMP))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def real_key(kernel: dict[str, Any]) -> str:
    """The victim kernel's HMAC key, from its remote connection file (remote = here)."""
    return str(json.loads((Path(kernel["run_dir"]) / "kernel.json").read_text())["key"])


# -- 1, 3: planted run dirs naming a victim process -------------------------------------


@pytest.mark.parametrize(
    "mode, launcher",
    [(0o755, "direct"), (0o700, "direct"), (0o700, "slurm")],
    ids=["dir-0755", "dir-0700", "slurm-0700"],
)
def test_planted_run_dir_naming_a_victim_process_is_ignored(
    sshd, attacker: SecondUser, mode: int, launcher: str
) -> None:
    kid = str(uuid.uuid4())
    extra: dict[str, Any] = {}
    if launcher == "slurm":
        extra = {
            "launcher": "slurm",
            "job_id": str(40000 + secrets.randbelow(9999)),
            "job_name": f"sshpyk-{kid[:8]}",
            "node": "node1",
            "host": "10.0.0.1",
        }
    with root_sleep() as victim:
        record = kernel_record(kid, victim.pid, dead_pid(), **extra)
        with planted(attacker, f"sshpyk-{kid[:8]}-{token()}", {"sshpyk.json": record}, mode) as d:
            listed = mentions(ps_kernels(sshd), kid, d)
            assert listed == [], f"ps lists the attacker's planted entry: {listed}"

            result = sshpyk("kill", *host(sshd), "--orphans", "--yes")
            assert f"Killed kernel {kid}" not in result.output, result.output
            assert "cancelled SLURM job" not in result.output, result.output
            assert pid_alive(victim.pid), f"kill --orphans killed root's pid {victim.pid}"

            result = sshpyk("kill", *host(sshd), kid, "--yes")
            assert result.exit_code != 0 and f"Killed kernel {kid}" not in result.output
            time.sleep(0.3)
            assert pid_alive(victim.pid), f"kill {kid} killed root's pid {victim.pid}"


# -- 2: a planted agent record pointing at the attacker's socket ------------------------


def test_planted_agent_socket_is_never_used(
    sshd, short_root, attacker: SecondUser, tmp_path
) -> None:
    owner = KernelOwner(sshd, short_root)
    try:
        _agent_socket_attack(sshd, short_root, owner, attacker, tmp_path)
    finally:
        owner.stop()


def _agent_socket_attack(sshd, run_root, owner, attacker: SecondUser, tmp_path) -> None:
    kernel = find(ps_kernels(sshd, "--run-root", str(run_root)), owner.kernel_id)
    agent_pid, socket_path, key = int(kernel["agent_pid"]), kernel["agent_socket"], real_key(kernel)
    st = os.stat(socket_path)
    assert stat.S_ISSOCK(st.st_mode) and st.st_uid == os.getuid(), kernel
    with fake_agent(attacker, agent_pid, owner.kernel_id, owner.pid) as fake:
        kernel = find(ps_kernels(sshd, "--run-root", str(run_root)), owner.kernel_id)
        assert kernel["agent_socket"] == socket_path, (
            f"ps shows the attacker's socket {kernel['agent_socket']} for the victim's agent"
        )
        conn_file = tmp_path / "attached.json"
        with attached(
            *host(sshd, "--run-root", str(run_root)),
            owner.kernel_id,
            "--connection-file",
            str(conn_file),
        ) as attach:
            assert attach.wait_attached(), attach.stderr
            info = json.loads(conn_file.read_text())
            assert info["key"] != fake.key, "attach used the attacker's agent (and its key)"
            assert info["key"] == key
            if info["transport"] == "tcp":  # attach's documented default: loopback only
                assert info["ip"] == "127.0.0.1", info
        # a connection to the fake may have been made (a peer-credential check after
        # connect() refuses it), but no request was answered by it
        assert not [x for x in fake.connections() if x.startswith("op ")], fake.connections()


# -- 5: kernel ids from the remote never become local paths ------------------------------


def test_attach_refuses_a_kernel_id_with_path_parts(sshd, tmp_path) -> None:
    runtime = Path(os.environ["JUPYTER_RUNTIME_DIR"])

    def outside() -> set[Path]:
        return {p for p in tmp_path.rglob("*") if runtime not in (p, *p.parents)}

    before = outside()
    started = time.monotonic()
    result = sshpyk("attach", *host(sshd), "abc/../../x")
    assert time.monotonic() - started < 30
    assert_one_line_error(result)
    assert outside() == before
    assert not (tmp_path / "x.json").exists()


def test_remote_kernel_id_never_becomes_a_local_path(sshd, attacker: SecondUser) -> None:
    """The attacker plants a kernel whose id climbs out of the runtime dir, with a fake
    agent serving it, and waits for the victim to `sshpyk attach` it by prefix."""
    prefix = f"abc{token()}"
    target = TMP / f"pwned-{token()}"
    kid = prefix + "/" + "../" * 24 + str(target).lstrip("/")
    with attacker_sleep(attacker) as sleeper:
        record = kernel_record(kid, sleeper.pid, sleeper.pid)
        try:
            with (
                fake_agent(attacker, sleeper.pid, kid, sleeper.pid),
                planted(attacker, f"sshpyk-{prefix}", {"sshpyk.json": record}),
                attached(*host(sshd), prefix) as attach,
            ):
                if attach.wait_attached():
                    runtime = Path(os.environ["JUPYTER_RUNTIME_DIR"]).resolve()
                    written = attach.connection_file.resolve()
                    assert not Path(f"{target}.json").exists(), "written outside the runtime dir"
                    assert runtime in written.parents, written
                else:
                    attach.assert_one_line_error()
                assert not Path(f"{target}.json").exists()
        finally:
            Path(f"{target}.json").unlink(missing_ok=True)


def test_kernel_id_validation_function() -> None:
    """The local check every id from the remote passes before it names a local file."""
    from sshpyk.localfs import check_kernel_id

    for good in (str(uuid.uuid4()), "abc", "3f2a"):
        assert check_kernel_id(good) == good
    bad = ["abc/../../x", "../x", "a/b", "", ".", "..", "a\x00b", "x" * 300, "-rf", " abc"]
    for kernel_id in [*bad, "abc\n", "a\\b", 123, None]:
        with pytest.raises(sshpyk_pkg.UnsafePathError) as info:
            check_kernel_id(kernel_id)
        one_line(info.value)


# -- 4: run roots other users can write to -----------------------------------------------


@pytest.fixture
def shared_base() -> Iterator[Path]:
    """A root-owned 0755 dir in /tmp for run roots of various owners and modes."""
    base = Path(tempfile.mkdtemp(prefix="shared-host-", dir=TMP))
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def start_in(sshd, root: Path) -> BaseException | None:
    """Start a kernel with run root ``root``: the error, or None (it started; closed)."""
    async with await SSHSession.connect(sshd.alias, ssh_config=sshd.ssh_config) as session:
        options = KernelOptions(python=PY, run_root=str(root), start_timeout=30)
        try:
            kernel = await asyncio.wait_for(session.start_kernel(options=options), 45)
        except sshpyk_pkg.SSHPykError as exc:
            return exc
        await kernel.close()
        return None


def _make_root(base: Path, attacker: SecondUser, kind: str) -> Path:
    path = base / kind
    path.mkdir()
    modes = {
        "other-user-0777": (attacker.uid, attacker.gid, 0o777),
        "other-user-0755": (attacker.uid, attacker.gid, 0o755),
        "root-0777-no-sticky": (0, 0, 0o777),
        "root-0770-attacker-group": (0, attacker.gid, 0o770),
        "root-1777-sticky": (0, 0, 0o1777),
    }
    uid, gid, mode = modes[kind]
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    return path


@pytest.mark.parametrize(
    "kind",
    ["other-user-0777", "other-user-0755", "root-0777-no-sticky", "root-0770-attacker-group"],
)
async def test_unsafe_run_root_is_refused(sshd, attacker: SecondUser, shared_base, kind) -> None:
    root = _make_root(shared_base, attacker, kind)
    started = time.monotonic()
    error = await start_in(sshd, root)
    elapsed = time.monotonic() - started
    assert error is not None, f"a kernel started in the unsafe run root {root} ({kind})"
    assert elapsed < 15, elapsed
    message = one_line(error)
    assert str(root) in message, message
    assert wait_until(lambda: not list(root.glob("sshpyk-*")), 10), list(root.iterdir())
    assert remote_processes(str(root)) == []


@pytest.mark.parametrize("kind", ["root-1777-sticky", "own-0700"])
async def test_safe_run_root_is_accepted(sshd, attacker: SecondUser, shared_base, kind) -> None:
    if kind == "own-0700":
        root = shared_base / "own"
        root.mkdir(mode=0o700)
    else:
        root = _make_root(shared_base, attacker, kind)
    error = await start_in(sshd, root)
    assert error is None, f"{kind} refused: {error}"
    assert wait_until(lambda: not list(root.glob("sshpyk-*")), 10), list(root.iterdir())


# -- 6: the provisioner's local forwards ---------------------------------------------------


def listening_tcp_of_this_process() -> set[int]:
    """Inodes of the TCP sockets this process listens on (v4 and v6)."""
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[3] == "0A":
                    listening.add(int(fields[9]))
    mine = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("socket:["):
                mine.add(int(link[8:-1]))
    return listening & mine


CONNECT = """
import errno, json, socket, sys
out = {}
for path in sys.argv[1:]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(path)
        out[path] = "connected"
    except OSError as exc:
        out[path] = errno.errorcode.get(exc.errno, str(exc.errno))
    finally:
        s.close()
print(json.dumps(out))
"""


async def test_provisioner_forwards_are_private_unix_sockets(
    make_kernelspec, attacker: SecondUser
) -> None:
    make_kernelspec("ssh_private_fwd")
    before = listening_tcp_of_this_process()
    km, kc = await start_manager("ssh_private_fwd")
    try:
        opened = listening_tcp_of_this_process() - before
        conn = json.loads(Path(km.connection_file).read_text())
        assert conn["transport"] == "ipc", conn
        assert opened == set(), f"TCP listeners opened for the kernel: {opened}"
        sock_dir = Path(conn["ip"]).parent
        st = sock_dir.stat()
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid(), (
            sock_dir,
            oct(st.st_mode),
            st.st_uid,
        )
        paths = [f"{conn['ip']}-{conn[f'{c}_port']}" for c in CHANNELS]
        assert all(stat.S_ISSOCK(os.stat(p).st_mode) for p in paths), paths
        result = await asyncio.to_thread(attacker.run_python, CONNECT, *paths)
        outcomes = json.loads(result.stdout)
        assert set(outcomes.values()) <= {"EACCES", "EPERM", "ENOENT"}, outcomes
        content, out = await run_cell(kc, "print(6 * 7)")
        assert content["status"] == "ok" and out.strip() == "42"
    finally:
        await stop_manager(km, kc)


# -- 7: the pre-command in other users' ps ------------------------------------------------


def _scan_cmdlines(needles: list[bytes], stop: threading.Event, hits: dict[bytes, list]) -> None:
    while not stop.is_set():
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            for needle in needles:
                if needle in cmdline:
                    hits[needle].append((int(entry), cmdline))
        time.sleep(0.02)


async def test_pre_command_is_not_in_any_command_line(sshd, run_root) -> None:
    secret = f"s3cr3t-{secrets.token_hex(8)}"
    nap = f"2.{1000 + secrets.randbelow(9000)}"  # a unique sleep: the pre-command phase
    pre = f"export SSHPYK_SECRET_TOKEN={secret}; sleep {nap}"
    needles = [secret.encode(), f"sleep\0{nap}\0".encode()]
    hits: dict[bytes, list] = {n: [] for n in needles}
    stop = threading.Event()
    scanner = threading.Thread(target=_scan_cmdlines, args=(needles, stop, hits), daemon=True)
    scanner.start()
    try:
        async with await SSHSession.connect(sshd.alias, ssh_config=sshd.ssh_config) as session:
            options = KernelOptions(python=PY, run_root=str(run_root), pre_command=pre)
            kernel = await asyncio.wait_for(session.start_kernel(options=options), 60)
            async with kernel:
                assert kernel.process is not None
                environ = Path(f"/proc/{kernel.process.pid}/environ").read_bytes()
                assert f"SSHPYK_SECRET_TOKEN={secret}".encode() in environ.split(b"\0")
    finally:
        stop.set()
        scanner.join(10)
    assert hits[needles[1]], "the pre-command's sleep was never seen: nothing was checked"
    leaks = {pid: cmd.replace(b"\0", b" ").decode() for pid, cmd in hits[needles[0]]}
    assert leaks == {}, f"the pre-command is in command lines: {leaks}"


# -- 8: attach --connection-file ----------------------------------------------------------


def test_attach_does_not_write_through_a_symlink(sshd, run_root, owner, tmp_path) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("precious\n")
    link = tmp_path / "conn.json"
    link.symlink_to(precious)
    args = (*host(sshd, "--run-root", str(run_root)), owner.kernel_id)
    with attached(*args, "--connection-file", str(link)) as attach:
        if attach.wait_attached():
            assert precious.read_text() == "precious\n", "attach wrote through the symlink"
            assert not link.is_symlink()
            assert stat.S_IMODE(link.stat().st_mode) == 0o600
            assert json.loads(link.read_text())["key"]
        else:
            attach.assert_one_line_error()
    assert precious.read_text() == "precious\n", "attach wrote through the symlink"


def test_attach_does_not_leave_the_key_in_a_0644_file(sshd, run_root, owner, tmp_path) -> None:
    path = tmp_path / "conn.json"
    path.write_text("{}")
    os.chmod(path, 0o644)
    args = (*host(sshd, "--run-root", str(run_root)), owner.kernel_id)
    with attached(*args, "--connection-file", str(path)) as attach:
        if attach.wait_attached():
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == 0o600, f"the key went into a {oct(mode)} file"
            assert json.loads(path.read_text())["key"]
        else:
            attach.assert_one_line_error()
            assert path.read_text() == "{}"


def test_attach_creates_a_private_parent_dir(sshd, run_root, owner, tmp_path) -> None:
    path = tmp_path / "newdir" / "conn.json"
    args = (*host(sshd, "--run-root", str(run_root)), owner.kernel_id)
    with attached(*args, "--connection-file", str(path)) as attach:
        assert attach.wait_attached(), attach.stderr
        mode = stat.S_IMODE(path.parent.stat().st_mode)
        assert mode == 0o700, f"new parent dir {path.parent} is {oct(mode)}"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


# -- 9: a SIGKILLed agent leaves nothing behind --------------------------------------------


@pytest.mark.slow
def test_killed_agent_leaves_no_dirs_or_keys(sshd, run_root, owner) -> None:
    kernel = find(ps_kernels(sshd, "--run-root", str(run_root)), owner.kernel_id)
    agent_pid = int(kernel["agent_pid"])
    run_dir = Path(kernel["run_dir"])
    agent_dir = Path(kernel["agent_socket"]).parent
    assert (run_dir / "kernel.json").exists() and agent_dir.name.startswith("sshpyk-agent-")
    os.kill(agent_pid, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(owner.pid), 30), "the kernel outlived its agent"

    def clean() -> bool:
        return not agent_dir.exists() and not (run_dir / "kernel.json").exists()

    ps_kernels(sshd, "--run-root", str(run_root))  # the next agent on this host
    if not wait_until(clean, 10, step=0.2):
        ps_kernels(sshd, "--run-root", str(run_root))
    assert wait_until(clean, 10, step=0.2), (
        f"left behind: {sorted(str(p) for p in run_root.rglob('*'))}"
    )


# -- 10: root's kill and other users' kernels ---------------------------------------------


def test_root_kill_spares_another_users_kernel(sshd, attacker: SecondUser) -> None:
    kid = str(uuid.uuid4())
    with attacker_sleep(attacker) as sleeper:
        files = {
            "sshpyk.json": kernel_record(kid, sleeper.pid, dead_pid()),
            "kernel.json": {"key": f"k-{token()}", "transport": "tcp", "ip": "127.0.0.1"},
            "kernel.log": "",
        }
        with planted(attacker, f"sshpyk-{kid[:8]}-{token()}", files) as d:
            assert stat.S_IMODE(d.stat().st_mode) == 0o700
            assert mentions(ps_kernels(sshd), kid) == [], "ps lists another user's kernel"

            result = sshpyk("kill", *host(sshd), "--orphans", "--yes")
            assert f"Killed kernel {kid}" not in result.output, result.output
            assert pid_alive(sleeper.pid), "root's kill --orphans killed another user's kernel"

            result = sshpyk("kill", *host(sshd), kid, "--yes")
            assert f"Killed kernel {kid}" not in result.output, result.output
            assert pid_alive(sleeper.pid), "root's kill by id killed another user's kernel"
            assert_one_line_error(result)

            result = sshpyk("kill", *host(sshd), kid, "--yes", "--all-users")
            assert result.exit_code != 2, f"--all-users is not accepted: {result.output}"
            if f"Killed kernel {kid}" in result.stdout:
                assert wait_until(lambda: not pid_alive(sleeper.pid), 10)
            else:
                assert result.exit_code != 0 and result.stderr.strip(), result.output


@pytest.mark.slow
def test_a_kill_that_fails_says_so(sshd, run_root, owner) -> None:
    """The run dir cannot be removed (a read-only bind mount): not reported as done."""
    kernel = find(ps_kernels(sshd, "--run-root", str(run_root)), owner.kernel_id)
    run_dir = str(kernel["run_dir"])
    mounted = subprocess.run(
        f"mount --bind {run_dir} {run_dir} && mount -o remount,ro,bind {run_dir}",
        shell=True,
        capture_output=True,
        text=True,
        timeout=20,
    )
    if mounted.returncode != 0:
        subprocess.run(["umount", "-l", run_dir], capture_output=True, timeout=20)
        pytest.skip(f"cannot make a read-only bind mount here: {mounted.stderr.strip()}")
    try:
        result = sshpyk("kill", *host(sshd, "--run-root", str(run_root)), owner.kernel_id, "--yes")
        assert result.exit_code != 0, f"a failed kill exited 0: {result.output}"
        assert owner.kernel_id in result.stderr, f"nothing about it on stderr: {result.output}"
        assert f"Killed kernel {owner.kernel_id}" not in result.stdout, result.output
        assert f"removed {run_dir}" not in result.stdout, result.output
    finally:
        subprocess.run(["umount", "-l", run_dir], capture_output=True, timeout=20)
        shutil.rmtree(run_dir, ignore_errors=True)


# -- 11: a remote python that is an option -------------------------------------------------


@pytest.mark.parametrize("check", [True, False], ids=["checked", "no-check"])
def test_add_refuses_a_remote_python_starting_with_a_dash(sshd, check: bool) -> None:
    extra = [] if check else ["--no-check"]
    started = time.monotonic()
    result = sshpyk(*add_args(sshd, "ssh_dash", *extra, remote_python="-c"))
    assert time.monotonic() - started < 10
    assert_one_line_error(result, "'-c'")
    assert not (Path(kernels_dir()) / "ssh_dash").exists()

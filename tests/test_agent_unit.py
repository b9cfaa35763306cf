"""Unit tests of the agent's shared-host defences (sshpyk/bootstrap.py), no SSH.

bootstrap.py is loaded as a module of its own (it only runs main() as __main__): run
root checks, the trusted-record reader, scan_kernels with planted dirs, kernel pid
verification, kill reports and the stale sweep. Planting a dir of another uid needs
root (os.chown); those cases are skipped otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SOURCE = Path(__file__).resolve().parent.parent / "sshpyk" / "bootstrap.py"
NOBODY = 65534
IS_ROOT = os.getuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="planting another uid's files needs root")
needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")

#: a stand-in agent: listens on the unix socket argv[1] until killed
LISTENER = (
    "import socket,sys,time;s=socket.socket(socket.AF_UNIX);s.bind(sys.argv[1]);"
    "s.listen(16);print('ok',flush=True);time.sleep(30)"
)


def load_bootstrap() -> Any:
    spec = importlib.util.spec_from_file_location("sshpyk_bootstrap_under_test", SOURCE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bs = load_bootstrap()


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    """What the agent emits, parsed (instead of its stdout)."""
    got: list[dict[str, Any]] = []
    saved = bs.OUTPUT.writers
    bs.OUTPUT.writers = [lambda data: got.append(json.loads(data.decode()))]
    try:
        yield got
    finally:
        bs.OUTPUT.writers = saved


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts: killed and reaped whatever happens."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "r"
    path.mkdir(mode=0o700)
    return path


def private_dir(parent: Path, name: str, mode: int = 0o700) -> Path:
    path = parent / name
    path.mkdir()
    os.chmod(path, mode)
    return path


def write_record(directory: Path, name: str, record: dict[str, Any]) -> None:
    (directory / name).write_text(json.dumps(record))


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait(5)
    return proc.pid


def sleeper(procs: list[subprocess.Popen[bytes]], env: dict[str, str] | None = None) -> int:
    proc = subprocess.Popen(["sleep", "30"], env=env, start_new_session=True)
    procs.append(proc)
    return proc.pid


def kernel(procs: list[subprocess.Popen[bytes]], run_dir: Path) -> int:
    """A stand-in kernel started the way the agent starts one (spawn_kernel)."""
    proc, _log = bs.spawn_kernel(["sleep", "30"], {}, "k" * 8, str(run_dir), str(run_dir))
    procs.append(proc)
    return int(proc.pid)


def listener(procs: list[subprocess.Popen[bytes]], path: Path) -> int:
    """A process of ours listening on ``path`` (an agent stand-in); its pid."""
    proc = subprocess.Popen([sys.executable, "-c", LISTENER, str(path)], stdout=subprocess.PIPE)
    procs.append(proc)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 5)
    assert ready and proc.stdout.readline() == b"ok\n"
    return proc.pid


def wait_gone(pid: int, seconds: float = 3.0) -> bool:
    deadline = time.monotonic() + seconds
    while bs.pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not bs.pid_alive(pid)


# -- run roots -------------------------------------------------------------------------


def test_run_root_own_0700_ok(root: Path) -> None:
    assert bs.run_root_problem(str(root)) == (os.path.realpath(root), None)


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o720])
def test_run_root_writable_by_others_refused(root: Path, mode: int) -> None:
    os.chmod(root, mode)
    _path, problem = bs.run_root_problem(str(root))
    assert problem and "group- or world-writable" in problem and "chmod 700" in problem
    assert "\n" not in problem
    with pytest.raises(bs.BootstrapError) as err:
        bs.private_run_dir(str(root), "k")
    assert err.value.kind == "unsafe_path"
    assert list(root.iterdir()) == []


def test_run_root_root_owned_sticky_ok(tmp_path: Path) -> None:
    if IS_ROOT:
        sticky = tmp_path / "sticky"
        sticky.mkdir()
        os.chmod(sticky, 0o1777)
        assert bs.run_root_problem(str(sticky))[1] is None
        os.chmod(sticky, 0o777)  # the same without the sticky bit
        assert bs.run_root_problem(str(sticky))[1] is not None
    st = os.lstat("/tmp")
    if st.st_uid == 0 and st.st_mode & 0o1000:
        assert bs.run_root_problem("/tmp")[1] is None


def test_run_root_symlink_resolved_and_checked(root: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(root)
    assert bs.run_root_problem(str(link)) == (os.path.realpath(root), None)
    assert bs.checked_run_root(str(link)) == os.path.realpath(root)
    os.chmod(root, 0o777)
    _path, problem = bs.run_root_problem(str(link))
    assert problem and str(link) in problem


def test_run_root_in_a_writable_parent_refused(tmp_path: Path) -> None:
    parent = tmp_path / "open"
    parent.mkdir()
    os.chmod(parent, 0o777)
    (parent / "r").mkdir(mode=0o700)
    _path, problem = bs.run_root_problem(str(parent / "r"))
    assert problem and "another user can change" in problem


@needs_root
def test_run_root_of_another_uid_refused(root: Path) -> None:
    os.chown(root, NOBODY, NOBODY)
    _path, problem = bs.run_root_problem(str(root))
    assert problem and f"belongs to uid {NOBODY}" in problem


def test_missing_run_root_is_created_0700(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    assert bs.checked_run_root(str(target), create=True) == os.path.realpath(target)
    for path in (tmp_path / "a", target):
        assert os.lstat(path).st_mode & 0o777 == 0o700
    run_dir = Path(bs.private_run_dir(str(target), "abcdefgh-1234"))
    assert run_dir.parent == target and run_dir.name.startswith("sshpyk-abcdefgh-")
    assert os.lstat(run_dir).st_mode & 0o777 == 0o700


def test_agent_refuses_an_unsafe_run_root(root: Path, events: list[dict[str, Any]]) -> None:
    os.chmod(root, 0o777)
    agent = bs.Agent({"op": "hello", "grace": 0, "run_root": str(root)})
    try:
        with pytest.raises(bs.BootstrapError) as err:
            agent.run()
    finally:
        agent.cleanup()
    assert err.value.kind == "unsafe_path"
    assert agent.agent_dir is None and list(root.iterdir()) == []
    agent.handle({"op": "ps", "rid": 7, "run_root": str(root)})
    assert events[-1]["event"] == "error" and events[-1]["kind"] == "unsafe_path"
    assert events[-1]["rid"] == 7


# -- trusted records ---------------------------------------------------------------------


def test_read_trusted_accepts_a_private_record(root: Path) -> None:
    d = private_dir(root, "sshpyk-x")
    write_record(d, "sshpyk.json", {"pid": 5})
    assert bs.trusted_json(str(d), "sshpyk.json", os.getuid()) == ({"pid": 5}, os.getuid())


def test_read_trusted_refuses_symlinks_and_open_dirs(root: Path) -> None:
    d = private_dir(root, "sshpyk-x")
    write_record(d, "elsewhere.json", {"pid": 5})
    (d / "sshpyk.json").symlink_to(d / "elsewhere.json")
    assert bs.read_trusted(str(d), "sshpyk.json", os.getuid()) is None
    good = private_dir(root, "sshpyk-good")
    write_record(good, "sshpyk.json", {"pid": 5})
    (root / "sshpyk-link").symlink_to(good)
    assert bs.read_trusted(str(root / "sshpyk-link"), "sshpyk.json", os.getuid()) is None
    os.chmod(good, 0o750)
    assert bs.read_trusted(str(good), "sshpyk.json", os.getuid()) is None


def test_read_trusted_refuses_fifos_and_huge_files(root: Path) -> None:
    d = private_dir(root, "sshpyk-x")
    os.mkfifo(d / "sshpyk.json")
    started = time.monotonic()
    assert bs.read_trusted(str(d), "sshpyk.json", os.getuid()) is None
    assert time.monotonic() - started < 1.0  # O_NONBLOCK: no writer, no hang
    (d / "agent.json").write_bytes(b" " * (bs.MAX_RECORD_BYTES + 1))
    assert bs.read_trusted(str(d), "agent.json", os.getuid()) is None


@needs_root
def test_read_trusted_refuses_a_file_of_another_uid(root: Path) -> None:
    d = private_dir(root, "sshpyk-x")
    write_record(d, "sshpyk.json", {"pid": 5})
    os.chown(d / "sshpyk.json", NOBODY, NOBODY)
    assert bs.read_trusted(str(d), "sshpyk.json", os.getuid()) is None
    assert bs.read_trusted(str(d), "sshpyk.json", None) is None  # file owner != dir owner
    os.chown(d, NOBODY, NOBODY)
    assert bs.read_trusted(str(d), "sshpyk.json", None)[1] == NOBODY  # all_users
    assert bs.read_trusted(str(d), "sshpyk.json", os.getuid()) is None


# -- scan_kernels -------------------------------------------------------------------------


def test_scan_ignores_planted_dirs(root: Path, procs: list[Any]) -> None:
    victim = sleeper(procs)
    good = private_dir(root, "sshpyk-good-1")
    write_record(good, "sshpyk.json", {"kernel_id": "good", "pid": dead_pid()})
    loose = private_dir(root, "sshpyk-loose-1", 0o755)
    write_record(loose, "sshpyk.json", {"kernel_id": "loose", "pid": victim})
    (root / "sshpyk-link-1").symlink_to(good)
    fake_agent = private_dir(root, "sshpyk-agent-fake", 0o711)
    write_record(fake_agent, "agent.json", {"pid": os.getpid(), "socket": "/tmp/x.sock"})
    foreign = None
    if IS_ROOT:
        foreign = private_dir(root, "sshpyk-foreign-1")
        write_record(foreign, "sshpyk.json", {"kernel_id": "foreign", "pid": victim})
        os.chown(foreign / "sshpyk.json", NOBODY, NOBODY)
        os.chown(foreign, NOBODY, NOBODY)
    found = bs.scan_kernels([str(root)])
    assert [k["kernel_id"] for k in found] == ["good"]
    (entry,) = found
    assert entry["uid"] == os.getuid() and entry["run_dir"] == str(good)
    assert entry["alive"] is False and entry["agent_alive"] is False
    assert entry["agent_socket"] is None
    _kernels, agents, _unrecorded = bs.scan([str(root)], os.getuid())
    assert agents == {}
    if foreign is not None:
        everybody = bs.scan_kernels([str(root)], None)
        assert sorted(k["kernel_id"] for k in everybody) == ["foreign", "good"]
        (other,) = [k for k in everybody if k["kernel_id"] == "foreign"]
        # the victim's sleep is not nobody's: not believed alive, never to be signalled
        assert other["uid"] == NOBODY and other["alive"] is False


def test_scan_believes_an_agent_only_by_its_socket(root: Path, procs: list[Any]) -> None:
    d = private_dir(root, "sshpyk-agent-a")
    pid = listener(procs, d / "agent.sock")
    write_record(d, "agent.json", {"pid": pid, "socket": "/elsewhere/agent.sock"})
    (d / "contact").touch()
    k = private_dir(root, "sshpyk-kern-1")
    write_record(k, "sshpyk.json", {"kernel_id": "k1", "pid": 0, "agent_pid": pid})
    (entry,) = bs.scan_kernels([str(root)])
    assert entry["agent_alive"] is True and entry["attached"] is True
    assert entry["agent_socket"] == str(d / "agent.sock")  # never the record's socket
    write_record(d, "agent.json", {"pid": pid + 100000})  # a pid the socket's peer is not
    write_record(k, "sshpyk.json", {"kernel_id": "k1", "pid": 0, "agent_pid": pid + 100000})
    (entry,) = bs.scan_kernels([str(root)])
    assert entry["agent_alive"] is False and entry["agent_socket"] is None


def test_peer_credentials_and_probe(root: Path) -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        creds = bs.peer_credentials(a)
    if creds is None:
        pytest.skip("no peer credentials on this platform")
    assert creds[1] == os.getuid() and creds[0] in (os.getpid(), None)
    path = root / "s.sock"
    s = socket.socket(socket.AF_UNIX)
    with s:
        s.bind(str(path))
        s.listen(4)
        assert bs.probe_agent(str(path), os.getpid(), os.getuid()) is True
        assert bs.probe_agent(str(path), os.getpid() + 1, os.getuid()) is False
        assert bs.probe_agent(str(path), os.getpid(), os.getuid() + 1) is False
    assert bs.probe_agent(str(root / "none.sock"), os.getpid(), os.getuid()) is False


def test_relay_refuses_foreign_sockets(
    root: Path, tmp_path: Path, events: list[dict[str, Any]]
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o755)
    assert bs.relay(str(shared / "agent.sock")) == 1
    assert events[-1]["kind"] == "unsafe_path" and "mode 755" in events[-1]["message"]
    d = private_dir(root, "sshpyk-agent-b")
    write_record(d, "agent.json", {"pid": dead_pid()})  # not who serves the socket
    s = socket.socket(socket.AF_UNIX)
    with s:
        s.bind(str(d / "agent.sock"))
        s.listen(4)
        assert bs.relay(str(d / "agent.sock")) == 1
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        has_creds = bs.peer_credentials(a) is not None
    if has_creds:
        assert events[-1]["kind"] == "unsafe_path" and "not by your agent" in events[-1]["message"]


# -- pid verification and kill -------------------------------------------------------------


@needs_proc
def test_pid_verification(root: Path, procs: list[Any]) -> None:
    run_dir = private_dir(root, "sshpyk-kern-1")
    other = private_dir(root, "sshpyk-kern-2")
    env = {k: v for k, v in os.environ.items() if k != "SSHPYK_RUN_DIR"}
    stranger = sleeper(procs, env)
    reason = bs.verify_kernel_pid(stranger, str(run_dir), os.getuid())
    assert reason and "not the kernel" in reason
    pid = kernel(procs, run_dir)
    assert bs.verify_kernel_pid(pid, str(run_dir), os.getuid()) is None
    assert "not the kernel" in bs.verify_kernel_pid(pid, str(other), os.getuid())
    assert "belongs to uid" in bs.verify_kernel_pid(pid, str(run_dir), os.getuid() + 1)
    assert "gone" in bs.verify_kernel_pid(dead_pid(), str(run_dir), os.getuid())
    # a SLURM kernel's pid is srun's: known by the job name on its command line
    srun = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)", "--job-name=sshpyk-abc"], env=env
    )
    procs.append(srun)
    slurm = {"launcher": "slurm", "job_name": "sshpyk-abc"}
    wait = time.monotonic() + 3
    while b"--job-name" not in Path(f"/proc/{srun.pid}/cmdline").read_bytes():
        assert time.monotonic() < wait
        time.sleep(0.01)
    assert bs.verify_kernel_pid(srun.pid, str(run_dir), os.getuid(), slurm) is None
    assert bs.verify_kernel_pid(srun.pid, str(run_dir), os.getuid(), {}) is not None


@needs_proc
def test_kill_reports_what_it_did(root: Path, procs: list[Any], events: list[Any]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SSHPYK_RUN_DIR"}
    good = private_dir(root, "sshpyk-good-1")
    pid = kernel(procs, good)
    write_record(good, "sshpyk.json", {"kernel_id": "good", "pid": pid, "agent_pid": 0})
    planted = private_dir(root, "sshpyk-bad-1")
    stranger = sleeper(procs, env)  # a process of ours that is not that kernel
    write_record(planted, "sshpyk.json", {"kernel_id": "bad", "pid": stranger})
    stuck = private_dir(root, "sshpyk-stuck-1")
    write_record(stuck, "sshpyk.json", {"kernel_id": "stuck", "pid": 0})
    agent = bs.Agent({"op": "hello", "grace": 0, "run_root": str(root)})
    real = bs.scan
    try:
        # the stuck dir loses its private mode after the scan: removing it must fail
        def scan_then_open(*args: Any) -> Any:
            found = real(*args)
            os.chmod(stuck, 0o755)
            return found

        bs.scan = scan_then_open
        agent.handle({"op": "kill", "rid": 3, "orphans": True, "run_root": str(root)})
    finally:
        bs.scan = real
        os.chmod(stuck, 0o700)
    event = events[-1]
    assert event["event"] == "killed" and event["rid"] == 3
    by_id = {k["kernel_id"]: k for k in event["kernels"]}
    assert by_id["good"]["killed"] is True and by_id["good"]["error"] is None
    assert wait_gone(pid) and not good.exists()
    assert by_id["bad"]["killed"] is False and "not signalled" in by_id["bad"]["error"]
    assert bs.pid_alive(stranger) and planted.exists()
    assert by_id["stuck"]["killed"] is False and "not removing" in by_id["stuck"]["error"]
    assert stuck.exists()


def test_all_users_needs_root(monkeypatch: pytest.MonkeyPatch, events: list[Any]) -> None:
    assert bs.request_owner({}) == os.getuid()
    if IS_ROOT:
        assert bs.request_owner({"all_users": True}) is None
    monkeypatch.setattr(bs.os, "getuid", lambda: 1000)
    with pytest.raises(bs.BootstrapError) as err:
        bs.request_owner({"all_users": True})
    assert err.value.kind == "not_permitted"


def test_remove_tree_reports(root: Path) -> None:
    d = private_dir(root, "sshpyk-x")
    (d / "sub").mkdir()
    (d / "sub" / "f").write_text("x")
    assert bs.remove_tree(str(d)) is None and not d.exists()
    assert bs.remove_tree(str(d)) is None  # already gone
    loose = private_dir(root, "sshpyk-y", 0o755)
    assert "not removing" in bs.remove_tree(str(loose)) and loose.exists()


# -- the stale sweep --------------------------------------------------------------------------


@needs_proc
def test_sweep_removes_the_dead_only(root: Path, procs: list[Any]) -> None:
    gone = dead_pid()
    dead_agent = private_dir(root, "sshpyk-agent-dead")
    write_record(dead_agent, "agent.json", {"pid": gone})
    live_agent = private_dir(root, "sshpyk-agent-live")
    agent_pid = listener(procs, live_agent / "agent.sock")
    write_record(live_agent, "agent.json", {"pid": agent_pid})
    orphan_dead = private_dir(root, "sshpyk-od-1")  # dead kernel, dead agent
    write_record(orphan_dead, "sshpyk.json", {"pid": gone, "agent_pid": gone})
    (orphan_dead / "kernel.json").write_text("{}")
    kept_by_agent = private_dir(root, "sshpyk-ka-1")  # dead kernel, live agent
    write_record(kept_by_agent, "sshpyk.json", {"pid": gone, "agent_pid": agent_pid})
    running = private_dir(root, "sshpyk-run-1")  # live kernel, dead agent
    write_record(running, "sshpyk.json", {"pid": kernel(procs, running), "agent_pid": gone})
    slurm = private_dir(root, "sshpyk-sl-1")  # no SLURM launcher loaded: left
    write_record(slurm, "sshpyk.json", {"pid": gone, "agent_pid": gone, "launcher": "slurm"})
    loose = private_dir(root, "sshpyk-loose-1", 0o755)
    write_record(loose, "sshpyk.json", {"pid": gone, "agent_pid": gone})
    unrecorded = private_dir(root, "sshpyk-new-1")  # being set up, or debris
    old = time.time() - 2 * bs.UNRECORDED_STALE
    foreign = None
    if IS_ROOT:
        foreign = private_dir(root, "sshpyk-for-1")
        write_record(foreign, "sshpyk.json", {"pid": gone, "agent_pid": gone})
        os.chown(foreign / "sshpyk.json", NOBODY, NOBODY)
        os.chown(foreign, NOBODY, NOBODY)
    removed = bs.sweep(bs.scan([str(root)], None), slurm=False)
    assert removed == {str(dead_agent), str(orphan_dead)}
    for path in (live_agent, kept_by_agent, running, slurm, loose, unrecorded):
        assert path.exists(), path
    if foreign is not None:
        assert foreign.exists()
    # an old dir without a record goes only once no other agent of ours runs
    os.utime(unrecorded, (old, old))
    assert bs.sweep(bs.scan([str(root)], os.getuid())) == set()
    procs[0].kill()
    procs[0].wait(5)
    removed = bs.sweep(bs.scan([str(root)], os.getuid()), slurm=False)
    assert removed == {str(live_agent), str(kept_by_agent), str(unrecorded)}
    assert running.exists() and slurm.exists()


def test_agent_dir_is_removed_on_the_way_out(root: Path) -> None:
    """Whatever ends the agent, cleanup removes its agent dir (item: ordinary-run leak)."""
    agent = bs.Agent({"op": "hello", "grace": 0, "run_root": str(root)})
    agent.run_root = bs.checked_run_root(str(root))
    agent.open_socket()
    try:
        assert agent.agent_dir and os.path.exists(os.path.join(agent.agent_dir, "agent.json"))
        record = bs.trusted_json(agent.agent_dir, "agent.json", os.getuid())
        assert record and record[0]["pid"] == os.getpid()
        assert bs.probe_agent(agent.socket_path, os.getpid(), os.getuid()) is True
        kind, probe = agent.events.get(timeout=5)  # the probe's accepted connection
        assert kind == "attach"
        probe.close()
    finally:
        agent.cleanup()
        bs.CLEANING.clear()
    assert not os.path.exists(agent.agent_dir)

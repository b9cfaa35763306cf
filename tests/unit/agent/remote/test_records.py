"""What the agent finds in run roots (sshpyk/agent/remote/records.py), no SSH: scan
with planted dirs, agents believed by their socket's peer, kernel pid verification,
kill reports, the stale sweep, attach's refusal of foreign sockets (main.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sshpyk.agent.remote import agent, main, paths, procgroup, records
from sshpyk.agent.remote.direct import DirectKernel
from sshpyk.agent.remote.jsonlines import Output
from sshpyk.agent.remote.protocol import AgentError

from support.agent import (
    IS_ROOT,
    NOBODY,
    Events,
    answer,
    dead_pid,
    kernel,
    listener,
    needs_proc,
    private_dir,
    sleeper,
    wait_gone,
    write_record,
)

DIRECT_ONLY = {"direct": DirectKernel}


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
    found = records.scan_kernels([str(root)])
    assert [k["kernel_id"] for k in found] == ["good"]
    (entry,) = found
    assert entry["uid"] == os.getuid() and entry["run_dir"] == str(good)
    assert entry["alive"] is False and entry["agent_alive"] is False
    assert entry["agent_socket"] is None
    _kernels, agents, _unrecorded = records.scan([str(root)], os.getuid())
    assert agents == {}
    if foreign is not None:
        everybody = records.scan_kernels([str(root)], None)
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
    (entry,) = records.scan_kernels([str(root)])
    assert entry["agent_alive"] is True and entry["attached"] is True
    assert entry["agent_socket"] == str(d / "agent.sock")  # never the record's socket
    write_record(d, "agent.json", {"pid": pid + 100000})  # a pid the socket's peer is not
    write_record(k, "sshpyk.json", {"kernel_id": "k1", "pid": 0, "agent_pid": pid + 100000})
    (entry,) = records.scan_kernels([str(root)])
    assert entry["agent_alive"] is False and entry["agent_socket"] is None


def test_probe_believes_the_peer_credentials(root: Path) -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        if paths.peer_credentials(a) is None:
            pytest.skip("no peer credentials on this platform")
    path = root / "s.sock"
    s = socket.socket(socket.AF_UNIX)
    with s:
        s.bind(str(path))
        s.listen(4)
        assert records.probe_agent(str(path), os.getpid(), os.getuid()) is True
        assert records.probe_agent(str(path), os.getpid() + 1, os.getuid()) is False
        assert records.probe_agent(str(path), os.getpid(), os.getuid() + 1) is False
    assert records.probe_agent(str(root / "none.sock"), os.getpid(), os.getuid()) is False


def test_attach_refuses_foreign_sockets(root: Path, tmp_path: Path) -> None:
    events = Events()
    output = Output([events])
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o755)
    assert main.attach(str(shared / "agent.sock"), output) == 1
    assert events[-1]["kind"] == "unsafe_path" and "mode 755" in events[-1]["message"]
    d = private_dir(root, "sshpyk-agent-b")
    write_record(d, "agent.json", {"pid": dead_pid()})  # not who serves the socket
    s = socket.socket(socket.AF_UNIX)
    with s:
        s.bind(str(d / "agent.sock"))
        s.listen(4)
        assert main.attach(str(d / "agent.sock"), output) == 1
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        has_creds = paths.peer_credentials(a) is not None
    if has_creds:
        assert events[-1]["kind"] == "unsafe_path" and "not by your agent" in events[-1]["message"]


# -- pid verification and kill -------------------------------------------------------------


@needs_proc
def test_pid_verification(root: Path, procs: list[Any]) -> None:
    run_dir = private_dir(root, "sshpyk-kern-1")
    other = private_dir(root, "sshpyk-kern-2")
    env = {k: v for k, v in os.environ.items() if k != "SSHPYK_RUN_DIR"}
    stranger = sleeper(procs, env)
    reason = procgroup.verify_kernel_pid(stranger, str(run_dir), os.getuid())
    assert reason and "not the kernel" in reason
    pid = kernel(procs, run_dir)
    assert procgroup.verify_kernel_pid(pid, str(run_dir), os.getuid()) is None
    assert "not the kernel" in procgroup.verify_kernel_pid(pid, str(other), os.getuid())
    assert "belongs to uid" in procgroup.verify_kernel_pid(pid, str(run_dir), os.getuid() + 1)
    assert "gone" in procgroup.verify_kernel_pid(dead_pid(), str(run_dir), os.getuid())
    # a SLURM kernel's pid is srun's: known by the job name on its command line
    srun = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)", "--job-name=sshpyk-abc"], env=env
    )
    procs.append(srun)
    slurm = records.legacy_pid_mark({"launcher": "slurm", "job_name": "sshpyk-abc"})
    wait = time.monotonic() + 3
    while b"--job-name" not in Path(f"/proc/{srun.pid}/cmdline").read_bytes():
        assert time.monotonic() < wait
        time.sleep(0.01)
    assert procgroup.verify_kernel_pid(srun.pid, str(run_dir), os.getuid(), slurm) is None
    assert procgroup.verify_kernel_pid(srun.pid, str(run_dir), os.getuid(), None) is not None


@needs_proc
def test_kill_reports_what_it_did(
    root: Path, procs: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SSHPYK_RUN_DIR"}
    good = private_dir(root, "sshpyk-good-1")
    pid = kernel(procs, good)
    write_record(good, "sshpyk.json", {"kernel_id": "good", "pid": pid, "agent_pid": 0})
    planted = private_dir(root, "sshpyk-bad-1")
    stranger = sleeper(procs, env)  # a process of ours that is not that kernel
    write_record(planted, "sshpyk.json", {"kernel_id": "bad", "pid": stranger})
    stuck = private_dir(root, "sshpyk-stuck-1")
    write_record(stuck, "sshpyk.json", {"kernel_id": "stuck", "pid": 0})
    the_agent = agent.Agent({"op": "hello", "grace": 0, "run_root": str(root)})
    events = Events()
    the_agent.output.add(events)
    real = records.scan

    # the stuck dir loses its private mode after the scan: removing it must fail
    def scan_then_open(*args: Any) -> Any:
        found = real(*args)
        os.chmod(stuck, 0o755)
        return found

    monkeypatch.setattr(agent, "scan", scan_then_open)
    try:
        msg = {"op": "kill", "rid": 3, "orphans": True, "run_root": str(root)}
        event = answer(the_agent, msg, events)
    finally:
        os.chmod(stuck, 0o700)
    assert event["event"] == "killed" and event["rid"] == 3
    by_id = {k["kernel_id"]: k for k in event["kernels"]}
    assert by_id["good"]["killed"] is True and by_id["good"]["error"] is None
    assert wait_gone(pid) and not good.exists()
    assert by_id["bad"]["killed"] is False and "not signalled" in by_id["bad"]["error"]
    assert procgroup.pid_alive(stranger) and planted.exists()
    assert by_id["stuck"]["killed"] is False and "not removing" in by_id["stuck"]["error"]
    assert stuck.exists()


def test_all_users_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    assert records.request_owner({}) == os.getuid()
    if IS_ROOT:
        assert records.request_owner({"all_users": True}) is None
    monkeypatch.setattr(records.os, "getuid", lambda: 1000)
    with pytest.raises(AgentError) as err:
        records.request_owner({"all_users": True})
    assert err.value.kind == "not_permitted"


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
    old = time.time() - 2 * records.UNRECORDED_STALE
    foreign = None
    if IS_ROOT:
        foreign = private_dir(root, "sshpyk-for-1")
        write_record(foreign, "sshpyk.json", {"pid": gone, "agent_pid": gone})
        os.chown(foreign / "sshpyk.json", NOBODY, NOBODY)
        os.chown(foreign, NOBODY, NOBODY)
    removed = records.sweep(records.scan([str(root)], None), launchers=DIRECT_ONLY)
    assert removed == {str(dead_agent), str(orphan_dead)}
    for path in (live_agent, kept_by_agent, running, slurm, loose, unrecorded):
        assert path.exists(), path
    if foreign is not None:
        assert foreign.exists()
    # an old dir without a record goes only once no other agent of ours runs
    os.utime(unrecorded, (old, old))
    assert records.sweep(records.scan([str(root)], os.getuid()), launchers=DIRECT_ONLY) == set()
    procs[0].kill()
    procs[0].wait(5)
    removed = records.sweep(records.scan([str(root)], os.getuid()), launchers=DIRECT_ONLY)
    assert removed == {str(live_agent), str(kept_by_agent), str(unrecorded)}
    assert running.exists() and slurm.exists()

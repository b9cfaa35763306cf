"""The agent's loop (sshpyk/agent/remote/agent.py) and the direct launcher, no SSH:
an Agent in a thread of this process serves one end of a socketpair, this test the
other end, with real JSON lines; its kernels are real processes (a fake kernel that
binds the five sockets of its connection file)."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sshpyk.agent.remote import agent, paths, procgroup, records
from sshpyk.agent.remote.jsonlines import decode, encode
from sshpyk.agent.remote.protocol import PROTOCOL, AgentError

from support.agent import Events, answer, wait_gone

FAKE_KERNEL = """
import json, signal, socket, sys, time
info = json.load(open(sys.argv[1]))
if "--ignore-term" in sys.argv:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
socks = []
for channel in ("shell", "iopub", "stdin", "control", "hb"):
    s = socket.socket()
    s.bind((info["ip"], info[channel + "_port"]))
    s.listen(8)
    socks.append(s)
print("listening", flush=True)
time.sleep(60)
"""


@pytest.fixture
def fake_kernels(isolated_jupyter: Path, tmp_path: Path) -> Path:
    """Kernelspecs ``fake`` and ``stubborn`` (ignores SIGTERM) in the isolated Jupyter
    data dir, where the agent's find_kernelspec looks."""
    script = tmp_path / "fake_kernel.py"
    script.write_text(FAKE_KERNEL)
    for name, extra in (("fake", []), ("stubborn", ["--ignore-term"])):
        spec_dir = isolated_jupyter / "kernels" / name
        spec_dir.mkdir(parents=True)
        argv = [sys.executable, str(script), "{connection_file}", *extra]
        (spec_dir / "kernel.json").write_text(
            json.dumps({"argv": argv, "display_name": name, "language": "python"})
        )
    return script


class Peer:
    """The local side: one end of the socketpair, lines in and out."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lines: queue.Queue[tuple[float, dict[str, Any]]] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        rfile = self.sock.makefile("rb")
        for line in iter(rfile.readline, b""):  # ends when the agent closes its end
            message = decode(line)
            if message is not None:
                self.lines.put((time.monotonic(), message))

    def send(self, **message: Any) -> float:
        self.sock.sendall(encode(message))
        return time.monotonic()

    def wait(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> tuple[float, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:  # ends with a match or the deadline
            left = deadline - time.monotonic()
            assert left > 0, "no matching event"
            at, message = self.lines.get(timeout=left)
            assert message["v"] == PROTOCOL
            if predicate(message):
                return at, message


@contextlib.contextmanager
def serving(hello: dict[str, Any]) -> Iterator[tuple[agent.Agent, Peer, dict[str, Any]]]:
    """An agent started with ``hello``, serving a socketpair (its loop in a thread): the
    agent, the peer and the agent's hello event; shut down afterwards."""
    ours, theirs = socket.socketpair()
    the_agent = agent.Agent({"op": "hello", **hello})
    errors: list[BaseException] = []

    def run() -> None:
        try:
            the_agent.run(agent.socket_controller(the_agent, theirs))
        except BaseException as exc:  # the test fails below
            errors.append(exc)
        finally:
            the_agent.cleanup()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    peer = Peer(ours)
    _, hello_event = peer.wait(lambda m: m["event"] == "hello")
    try:
        yield the_agent, peer, hello_event
    finally:
        if thread.is_alive():
            peer.send(op="shutdown", rid=999)
            thread.join(15)
        ours.close()
        agent.CLEANING.clear()
    assert not thread.is_alive() and errors == []


@pytest.fixture
def served(root: Path) -> Iterator[tuple[agent.Agent, Peer]]:
    """An agent serving a socketpair (its loop in a thread); shut down afterwards."""
    with serving({"grace": 0, "run_root": str(root)}) as (the_agent, peer, hello):
        assert hello["pid"] == os.getpid() and hello["socket"]
        yield the_agent, peer


def event_of(kid: str, name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda m: m.get("kid") == kid and m["event"] == name


def test_direct_kernel_life(served: tuple[agent.Agent, Peer], fake_kernels: Path) -> None:
    """launch -> started (a private run dir, the key in a 0600 file, the record) ->
    ready -> signal TERM -> exited -> run dir gone; state says so on the way."""
    _the_agent, peer = served
    peer.send(op="launch", kid="k1", kernel_name="fake", key="secret", transport="auto")
    _, started = peer.wait(event_of("k1", "started"))
    run_dir = Path(started["run_dir"])
    assert started["transport"] == "tcp" and started["launcher"] == "direct"
    assert stat.S_IMODE(os.lstat(run_dir).st_mode) == 0o700
    conn_file = run_dir / "kernel.json"
    assert stat.S_IMODE(os.lstat(conn_file).st_mode) == 0o600
    assert json.loads(conn_file.read_text())["key"] == "secret"
    record = paths.trusted_json(str(run_dir), "sshpyk.json", os.getuid())
    assert record is not None and record[0]["pid"] == started["pid"]
    assert "secret" not in json.dumps(record[0])
    peer.wait(event_of("k1", "ready"))
    peer.send(op="state", rid=1)
    _, state = peer.wait(lambda m: m.get("rid") == 1)
    (kernel_state,) = state["kernels"]
    assert kernel_state["ready"] is True and kernel_state["exit_code"] is None
    peer.send(op="connection_info", rid=2, kid="k1")
    _, info = peer.wait(lambda m: m.get("rid") == 2)
    assert info["info"]["key"] == "secret"
    peer.send(op="signal", kid="k1", signum=int(signal.SIGTERM))
    _, exited = peer.wait(event_of("k1", "exited"))
    assert exited["code"] == -signal.SIGTERM
    assert "listening" in exited["stderr_tail"]
    assert not run_dir.exists() and wait_gone(started["pid"])
    peer.send(op="shutdown", rid=3)
    _, bye = peer.wait(lambda m: m.get("rid") == 3)
    assert bye["event"] == "bye" and bye["kept"] == 0


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_a_slow_kill_does_not_stall_the_loop(
    served: tuple[agent.Agent, Peer], fake_kernels: Path, how: str
) -> None:
    """While a kernel that ignores SIGTERM is being killed (TERM_WAIT = 2 s, then KILL),
    a ping and a state request are answered at once: the kill runs in a worker."""
    the_agent, peer = served
    peer.send(op="launch", kid="slow", kernel_name="stubborn", key="k")
    _, started = peer.wait(event_of("slow", "started"))
    peer.wait(event_of("slow", "ready"))
    if how == "stop":
        peer.send(op="stop", kid="slow")
    else:
        peer.send(op="kill", rid=5, kernel_id="slo")
    time.sleep(0.05)  # the kill is under way
    peer.send(op="ping")
    sent = peer.send(op="state", rid=6)
    answered, state = peer.wait(lambda m: m.get("rid") == 6)
    assert answered - sent < 0.2
    assert [k["kid"] for k in state["kernels"]] == []  # taken out before it is killed
    assert procgroup.pid_alive(started["pid"])  # still in its TERM wait
    if how == "stop":
        done_at, _ = peer.wait(event_of("slow", "stopped"))
    else:
        done_at, killed = peer.wait(lambda m: m.get("rid") == 5)
        (entry,) = killed["kernels"]
        assert entry["killed"] is True and entry["error"] is None
    assert done_at - sent > 1.5  # it did wait for TERM
    assert wait_gone(started["pid"]) and not Path(started["run_dir"]).exists()
    deadline = time.monotonic() + 5
    while the_agent.workers and time.monotonic() < deadline:  # pruned when done
        time.sleep(0.01)
    assert len(the_agent.workers) == 0


def test_failures_are_typed_and_keep_the_agent(
    served: tuple[agent.Agent, Peer], fake_kernels: Path, root: Path
) -> None:
    _the_agent, peer = served
    peer.send(op="launch", kid="x", kernel_name="no-such-kernel", key="k")
    _, error = peer.wait(event_of("x", "error"))
    assert error["kind"] == "kernelspec_not_found" and "fake" in error["message"]
    peer.send(op="launch", kid="y", kernel_name="fake", key="k", launcher="pbs")
    _, error = peer.wait(event_of("y", "error"))
    assert error["kind"] == "protocol" and "'pbs' launcher is not loaded" in error["message"]
    peer.send(op="launch", kid="z", kernel_name="fake", key="k", cwd=str(root / "none"))
    _, error = peer.wait(event_of("z", "error"))
    assert error["kind"] == "launch_failed" and "does not exist" in error["message"]
    peer.send(op="frobnicate", rid=1)
    _, error = peer.wait(lambda m: m.get("rid") == 1)
    assert error["kind"] == "protocol"
    peer.send(op="connection_info", rid=2, kid="nope")
    _, error = peer.wait(lambda m: m.get("rid") == 2)
    assert error["kind"] == "not_found"
    peer.send(op="kill", rid=3, kernel_id="nope")
    _, error = peer.wait(lambda m: m.get("rid") == 3)
    assert error["kind"] == "not_found"
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith("sshpyk-agent-")) == []


def test_shutdown_keeps_persistent_kernels_if_asked(
    served: tuple[agent.Agent, Peer], fake_kernels: Path
) -> None:
    the_agent, peer = served
    for kid, persistent in (("keep", True), ("drop", False)):
        peer.send(op="launch", kid=kid, kernel_name="fake", key="k", persistent=persistent)
    _, keep = peer.wait(event_of("keep", "started"))
    _, drop = peer.wait(event_of("drop", "started"))
    peer.send(op="shutdown", rid=1, keep_persistent=True)
    _, bye = peer.wait(lambda m: m.get("rid") == 1)
    assert bye["kept"] == 1 and list(the_agent.kernels) == ["keep"]
    assert wait_gone(drop["pid"]) and procgroup.pid_alive(keep["pid"])
    peer.send(op="shutdown", rid=2)
    _, bye = peer.wait(lambda m: m.get("rid") == 2)
    assert bye["kept"] == 0 and wait_gone(keep["pid"])


def test_agent_refuses_an_unsafe_run_root(root: Path) -> None:
    os.chmod(root, 0o777)
    the_agent = agent.Agent({"op": "hello", "grace": 0, "run_root": str(root)})
    events = Events()
    the_agent.output.add(events)
    try:
        with pytest.raises(AgentError) as err:
            the_agent.run()
    finally:
        the_agent.cleanup()
        agent.CLEANING.clear()
    assert err.value.kind == "unsafe_path"
    assert the_agent.agent_dir is None and list(root.iterdir()) == []
    event = answer(the_agent, {"op": "ps", "rid": 7, "run_root": str(root)}, events)
    assert event["event"] == "error" and event["kind"] == "unsafe_path"


def test_agent_dir_is_removed_on_the_way_out(root: Path) -> None:
    """Whatever ends the agent, cleanup removes its agent dir (item: ordinary-run leak)."""
    the_agent = agent.Agent({"op": "hello", "grace": 0, "run_root": str(root)})
    the_agent.run_root = paths.checked_run_root(str(root))
    the_agent.open_socket()
    try:
        assert the_agent.agent_dir
        assert os.path.exists(os.path.join(the_agent.agent_dir, "agent.json"))
        record = paths.trusted_json(the_agent.agent_dir, "agent.json", os.getuid())
        assert record and record[0]["pid"] == os.getpid()
        assert records.probe_agent(the_agent.socket_path, os.getpid(), os.getuid()) is True
        kind, probe = the_agent.events.get(timeout=5)  # the probe's accepted connection
        assert kind == "attach"
        probe.close()
    finally:
        the_agent.cleanup()
        agent.CLEANING.clear()
    assert not os.path.exists(the_agent.agent_dir)


def test_owners_keep_to_their_own_kernels(root: Path, fake_kernels: Path) -> None:
    """Three local processes on one agent (the first by its stdio, two by the control
    socket): a shutdown stops only its owner's kernels; an owner whose socket just
    ends keeps its kernel for the link grace, until a last will says it is gone, then
    for the short grace only; the first owner's kernel runs throughout."""
    grace = 0.5
    hello = {"grace": grace, "link_grace": 60, "run_root": str(root), "owner": "A"}
    with serving(hello) as (the_agent, first, hello_event):
        owners_keep_to_their_own(the_agent, first, hello_event["socket"], grace)


def owners_keep_to_their_own(the_agent: agent.Agent, first: Peer, path: str, grace: float) -> None:

    def joined(token: str) -> Peer:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(path)
        peer = Peer(sock)
        peer.wait(lambda m: m["event"] == "hello")
        peer.send(op="claim", owner=token)
        return peer

    first.send(op="launch", kid="ka", kernel_name="fake", key="k")
    _, ka = first.wait(event_of("ka", "started"))
    b = joined("B")
    b.send(op="launch", kid="kb", kernel_name="fake", key="k")
    _, kb = b.wait(event_of("kb", "started"))
    b.send(op="shutdown", rid=1)
    _, bye = b.wait(lambda m: m.get("rid") == 1)
    assert bye["kept"] >= 1 and wait_gone(kb["pid"])
    assert sorted(the_agent.kernels) == ["ka"]
    b.sock.shutdown(socket.SHUT_RDWR)  # B leaves (its process closes its channel)
    b.sock.close()
    c = joined("C")
    c.send(op="launch", kid="kc", kernel_name="fake", key="k")
    _, kc = c.wait(event_of("kc", "started"))
    c.sock.shutdown(socket.SHUT_RDWR)  # a reset or a crash: nobody knows which
    c.sock.close()
    time.sleep(grace * 4)
    assert procgroup.pid_alive(kc["pid"]), "reaped after the short grace without a will"
    will = socket.socket(socket.AF_UNIX)
    will.connect(path)
    will.sendall(encode({"v": PROTOCOL, "op": "gone", "owner": "C"}))
    will.shutdown(socket.SHUT_WR)
    said = time.monotonic()
    assert wait_gone(kc["pid"])
    assert time.monotonic() - said < grace + 2.5
    will.close()
    d = joined("D")  # the will overtakes the dead process's EOF (other channels, any order)
    d.send(op="launch", kid="kd", kernel_name="fake", key="k")
    _, kd = d.wait(event_of("kd", "started"))
    will = socket.socket(socket.AF_UNIX)
    will.connect(path)
    will.sendall(encode({"v": PROTOCOL, "op": "gone", "owner": "D"}))
    will.shutdown(socket.SHUT_WR)
    time.sleep(grace * 4)
    assert procgroup.pid_alive(kd["pid"]), "stopped while its controller was attached"
    d.sock.shutdown(socket.SHUT_RDWR)
    d.sock.close()
    ended = time.monotonic()
    assert wait_gone(kd["pid"])
    assert time.monotonic() - ended < grace + 2.5
    will.close()
    assert procgroup.pid_alive(ka["pid"]) and sorted(the_agent.kernels) == ["ka"]
    first.send(op="shutdown", rid=2)
    _, bye = first.wait(lambda m: m.get("rid") == 2)
    assert bye["kept"] == 0 and wait_gone(ka["pid"])


def test_a_will_before_the_eof_waits_for_it_and_a_claim_voids_it() -> None:
    """The broker's will and the dead process's channel EOF reach the agent by different
    channels: whichever comes first, the owner is gone (short grace) once both came; a
    controller claiming the token (a live process) voids a will that came before."""
    from sshpyk.agent.remote.owners import Owners

    class Ctl:  # a controller as Owners sees one: hashable, with an owner
        owner = None

    owners = Owners(grace=1.0, link_grace=60.0)
    c1, c2 = Ctl(), Ctl()
    owner = owners.claim(c1, "X")
    owners.said_gone("X")
    assert not owner.gone  # its controller is still attached
    now = owner.last_contact
    assert owners.expired(now + 5) == []
    owners.left(c1)
    assert owner.gone and owners.expired(now + 1.5) == [owner]

    owner = owners.claim(c2, "Y")
    owners.said_gone("Y")
    c3 = Ctl()
    owners.claim(c3, "Y")  # a controller speaks for a live "Y"
    owners.left(c2)
    owners.left(c3)
    assert not owner.gone  # an end, not a death: the link grace

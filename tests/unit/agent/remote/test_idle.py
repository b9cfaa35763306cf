"""Idle kernels (sshpyk/agent/remote/idle.py): the ZMTP sniffer finds each message's
type in any chunking and copies no payload; what counts as activity; the idle
decision; the signed shutdown_request a real ZMQ ROUTER accepts."""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import zmq
from jupyter_client.session import Session

from sshpyk.agent.remote import idle
from sshpyk.agent.remote.idle import Activity, Sniffer, idle_seconds, send_shutdown, should_reap

GREETING = b"\xff" + b"\x00" * 8 + b"\x7f\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" * 32


def zmtp(frames: list[bytes]) -> bytes:
    """One ZMTP 3 message (short and long frames)."""
    out = b""
    for i, body in enumerate(frames):
        more = i < len(frames) - 1
        if len(body) < 256:
            out += bytes((int(more), len(body))) + body
        else:
            out += bytes((0x02 | int(more),)) + len(body).to_bytes(8, "big") + body
    return out


def command(name: bytes) -> bytes:
    body = bytes((len(name),)) + name + b"\x0bSocket-Type" + (3).to_bytes(4, "big") + b"PUB"
    return bytes((0x04, len(body))) + body


SESSION = Session(key=b"k3y")


def message(
    msg_type: str,
    content: dict[str, Any],
    parent_type: str = "",
    topic: bytes = b"",
    parent: dict[str, Any] | None = None,
) -> bytes:
    if parent is None:
        parent = SESSION.msg(parent_type) if parent_type else {}
    msg = SESSION.msg(msg_type, content, parent=parent)
    frames = SESSION.serialize(msg, ident=[topic] if topic else None)
    return zmtp(frames)


def feed_in_pieces(sniffer: Sniffer, data: bytes, rng: random.Random) -> None:
    i = 0
    while i < len(data):  # ends with data
        step = rng.choice((1, 2, 3, 7, 64, 1000, 1 << 20))
        sniffer.feed(data[i : i + step])
        i += step


@pytest.mark.parametrize("seed", range(20))
def test_sniffer_finds_every_message_in_any_chunking(seed: int) -> None:
    seen: list[tuple[str, str, bytes | None]] = []
    sniffer = Sniffer(lambda h, p, c: seen.append((idle.msg_type(h), idle.msg_type(p), c)))
    big = "x" * 300_000  # a long frame (8-byte size), never copied: its content is skipped
    stream = GREETING + command(b"READY")
    stream += message("status", {"execution_state": "busy"}, "execute_request", b"kernel.1.status")
    stream += message(
        "stream", {"name": "stdout", "text": big}, "execute_request", b"stream.stdout"
    )
    stream += message("display_data", {"data": {"text/plain": "1"}}, topic=b"display_data")
    stream += message(
        "status", {"execution_state": "idle"}, "kernel_info_request", b"kernel.1.status"
    )
    stream += zmtp([b"no delimiter", b"at all"])
    sniffer.feed(b"")
    feed_in_pieces(sniffer, stream, random.Random(seed))
    assert not sniffer.dead
    assert [s[:2] for s in seen] == [
        ("status", "execute_request"),
        ("stream", ""),
        ("display_data", ""),
        ("status", "kernel_info_request"),
    ]
    assert seen[0][2] is not None and b'"busy"' in seen[0][2]
    assert seen[1][2] is None  # only a status's content is copied


def test_sniffer_gives_up_on_what_is_not_zmtp3() -> None:
    seen: list[bytes] = []
    sniffer = Sniffer(lambda h, p, c: seen.append(h))
    sniffer.feed(b"GET / HTTP/1.1\r\n\r\n" + message("execute_request", {}))
    assert sniffer.dead and not seen


def status(state: str, parent: str = "execute_request", request: Any = None) -> bytes:
    """A status of ``request`` (a message: its msg_id), or of a new ``parent`` request."""
    return message("status", {"execution_state": state}, parent, b"kernel.1.status", parent=request)


def test_activity_counts_execute_output_and_busy_but_not_passive_requests() -> None:
    activity = Activity(now=100.0)
    shell, iopub = activity.sniffer("shell"), activity.sniffer("iopub")
    assert shell is not None and iopub is not None and activity.sniffer("hb") is None
    shell.feed(GREETING)
    iopub.feed(GREETING)
    shell.feed(message("kernel_info_request", {}))
    iopub.feed(status("busy", "kernel_info_request") + status("idle", "kernel_info_request"))
    iopub.feed(status("busy", "usage_request") + status("idle", "usage_request"))
    assert activity.last == 100.0 and not activity.busy  # passive: not activity
    shell.feed(message("execute_request", {"code": "1"}))
    assert activity.last > 100.0
    activity.state = (100.0, activity.busy)
    cell = SESSION.msg("execute_request")
    iopub.feed(status("busy", request=cell))
    assert activity.busy and activity.idle_for(10_000.0) == 0.0  # busy is never idle
    activity.state = (100.0, activity.busy)
    iopub.feed(message("stream", {"name": "stdout", "text": "hi"}, topic=b"stream.stdout"))
    assert activity.last > 100.0 and activity.busy
    iopub.feed(status("idle", request=cell))
    assert not activity.busy
    assert activity.idle_for(activity.last + 7.5) == 7.5


def kernel(timeout: Any, last: float, **fields: Any) -> SimpleNamespace:
    activity = Activity(now=last)
    values = dict(ready=True, exit_code=None, activity=activity)
    values.update(fields)
    return SimpleNamespace(request={"idle_timeout": timeout}, **values)


def test_idle_decision() -> None:
    now = 1000.0
    assert should_reap(kernel(10, now - 11), now) == pytest.approx(11)
    assert should_reap(kernel(10, now - 9), now) is None
    assert should_reap(kernel(0, now - 1e6), now) is None  # off
    assert should_reap(kernel(None, now - 1e6), now) is None
    assert should_reap(kernel("junk", now - 1e6), now) is None
    assert should_reap(kernel(10, now - 11, ready=False), now) is None
    assert should_reap(kernel(10, now - 11, exit_code=0), now) is None
    assert should_reap(kernel(10, now - 11, activity=None), now) is None  # no relay: unseen
    busy = kernel(10, now - 1e6)
    busy.activity.state = (now - 1e6, True)
    assert should_reap(busy, now) is None
    spare = kernel(10, now - 11)
    spare.request["spare"] = True
    assert should_reap(spare, now) is None


def test_idle_seconds_reads_the_activity_file(tmp_path: Path) -> None:
    assert idle_seconds(str(tmp_path)) is None
    idle.create_activity_file(str(tmp_path))
    stamp = time.time() - 42
    os.utime(tmp_path / idle.ACTIVITY_FILE, (stamp, stamp))
    assert idle_seconds(str(tmp_path)) == pytest.approx(42, abs=1)


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_shutdown_request_is_signed_and_taken_by_a_router(tmp_path: Path, transport: str) -> None:
    """What a kernel's control channel (a ZMQ ROUTER) receives from send_shutdown is a
    shutdown_request whose signature the kernel's Session accepts."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    if transport == "ipc":
        target: Any = str(tmp_path / "k-4")
        router.bind("ipc://" + target)
    else:
        target = router.bind_to_random_port("tcp://127.0.0.1")
    got: list[dict[str, Any]] = []

    def serve() -> None:
        if router.poll(5000):
            idents, msg = SESSION.feed_identities(router.recv_multipart())
            got.append(SESSION.deserialize(msg))  # checks the signature
            reply = SESSION.msg("shutdown_reply", {"restart": False})
            SESSION.send(router, reply, ident=idents)

    server = threading.Thread(target=serve)
    server.start()
    try:
        send_shutdown(target, "k3y", "hmac-sha256")
    finally:
        server.join(10)
        router.close()
        ctx.term()
    assert got and got[0]["msg_type"] == "shutdown_request"
    assert got[0]["content"] == {"restart": False}


def test_shutdown_request_to_nobody_is_an_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        send_shutdown(str(tmp_path / "none"), "k", "hmac-sha256")


class FakeKernel:
    """What IdleWatch needs of a launcher."""

    def __init__(self, run_dir: Path, idle_for: float, timeout: float = 5.0) -> None:
        self.kid, self.run_dir = "k1", str(run_dir)
        self.request: dict[str, Any] = {"idle_timeout": timeout}
        self.endpoints: dict[str, Any] = {}
        self.ready, self.exit_code, self.proc = True, None, None
        self.activity = Activity(now=time.time() - idle_for)
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.cleaned = False
        idle.create_activity_file(self.run_dir)

    def emit(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    def poll_exit(self) -> int | None:
        return 0  # it took the shutdown_request

    def cleanup(self) -> None:
        self.cleaned = True


def fake_agent(tmp_path: Path, kernel: FakeKernel) -> SimpleNamespace:
    spawned: list[Any] = []
    return SimpleNamespace(
        kernels={kernel.kid: kernel},
        agent_dir=str(tmp_path),
        spawned=spawned,
        spawn=lambda work, then: spawned.append((work, then)),
    )


def test_idle_watch_reaps_logs_and_tells(tmp_path: Path) -> None:
    kernel = FakeKernel(tmp_path, idle_for=6.0)
    agent = fake_agent(tmp_path, kernel)
    watch = idle.IdleWatch(agent)
    watch.tick(100.0)
    assert agent.kernels == {}  # out of the agent's kernels at once
    ((work, then),) = agent.spawned
    then(work())  # the worker: the polite shutdown, then the cleanup
    assert kernel.cleaned
    ((event, fields),) = kernel.events
    assert event == "exited" and fields["reason"] == "idle_timeout" == idle.IDLE_TIMEOUT
    assert fields["code"] == 0 and fields["idle_timeout"] == 5.0
    assert 6.0 <= fields["idle_s"] < 8.0
    log = (tmp_path / "agent.log").read_text()
    assert "kernel k1 (pid ?) shut down after 6 s idle (idle timeout 5 s)" in log


def test_idle_watch_keeps_a_busy_kernel_and_writes_its_activity(tmp_path: Path) -> None:
    kernel = FakeKernel(tmp_path, idle_for=1000.0)
    kernel.activity.state = (kernel.activity.state[0], True)
    agent = fake_agent(tmp_path, kernel)
    watch = idle.IdleWatch(agent)
    watch.tick(100.0)
    assert agent.kernels and not agent.spawned
    assert idle_seconds(str(tmp_path)) is not None and idle_seconds(str(tmp_path)) < 2.0
    kernel.activity.state = (kernel.activity.state[0], False)
    watch.tick(100.5)  # between ticks: nothing
    assert agent.kernels and not agent.spawned
    watch.tick(101.0)
    assert not agent.kernels and agent.spawned
    assert idle_seconds(str(tmp_path)) == pytest.approx(1000.0, abs=2)


def test_the_reaper_never_sees_idle_with_a_stale_last() -> None:
    """A cell ran 3 h (idle timeout 1 h) and ends now: at every write the relay's
    thread makes (a thread switch may come between any two), what the reaper reads is
    busy, or idle since now: never idle since 3 h ago."""
    start = time.time() - 3 * 3600
    watched = kernel(3600, start)
    seen: list[float | None] = []

    class Traced(Activity):
        def __setattr__(self, name: str, value: Any) -> None:
            object.__setattr__(self, name, value)
            if name == "state":
                seen.append(should_reap(watched, time.time()))

    activity = Traced(now=start)
    watched.activity = activity
    iopub = activity.sniffer("iopub")
    assert iopub is not None
    iopub.feed(GREETING)
    cell = SESSION.msg("execute_request")
    iopub.feed(status("busy", request=cell))
    activity.state = (start, True)  # busy since 3 h ago
    seen.clear()
    iopub.feed(status("idle", request=cell))
    assert seen and all(s is None for s in seen)
    assert activity.seen()[0] >= start + 3 * 3600 - 1 and not activity.busy


def test_a_late_idle_from_a_lagging_stream_keeps_a_new_cell_busy() -> None:
    activity = Activity(now=100.0)
    ahead, behind = activity.sniffer("iopub"), activity.sniffer("iopub")
    assert ahead is not None and behind is not None
    ahead.feed(GREETING)
    behind.feed(GREETING)
    cell5, cell6 = SESSION.msg("execute_request"), SESSION.msg("execute_request")
    behind.feed(status("busy", request=cell5))
    ahead.feed(status("busy", request=cell5) + status("idle", request=cell5))
    ahead.feed(status("busy", request=cell6))
    behind.feed(status("idle", request=cell5))  # late: cell 6 still runs
    assert activity.busy and activity.idle_for(1e9) == 0.0
    ahead.feed(status("idle", request=cell6))
    assert not activity.busy
    behind.feed(status("busy", request=cell6))  # late busy of a finished request
    assert not activity.busy
    behind.feed(status("idle", request=cell6))
    assert not activity.busy


def test_running_requests_are_bounded_by_count_and_the_dropped_ones_logged(
    tmp_path: Path,
) -> None:
    fake = FakeKernel(tmp_path, idle_for=0.0)
    iopub = fake.activity.sniffer("iopub")
    assert iopub is not None
    iopub.feed(GREETING)
    first = SESSION.msg("execute_request")
    iopub.feed(status("busy", request=first))
    for _ in range(idle.REMEMBERED):
        iopub.feed(status("busy"))
    assert fake.activity.forgotten == 1 and fake.activity.busy
    assert first["header"]["msg_id"].encode() not in fake.activity.running
    watch = idle.IdleWatch(fake_agent(tmp_path, fake))
    watch.tick(100.0)
    watch.tick(102.0)
    log = (tmp_path / "agent.log").read_text()
    assert log.count("more than 1000 requests busy at once") == 1


def test_an_iopub_stream_it_cannot_follow_makes_the_kernel_unseen(tmp_path: Path) -> None:
    fake = FakeKernel(tmp_path, idle_for=1000.0)
    iopub = fake.activity.sniffer("iopub")
    assert iopub is not None
    iopub.feed(b"GET / HTTP/1.1\r\n\r\n")
    assert iopub.dead and fake.activity.blind
    assert should_reap(fake, time.time()) is None  # never reaped
    agent = fake_agent(tmp_path, fake)
    watch = idle.IdleWatch(agent)
    watch.tick(100.0)
    watch.tick(102.0)
    assert agent.kernels and not agent.spawned
    assert (tmp_path / "agent.log").read_text().count("could not be followed") == 1

    broken = Activity()  # a parser error later on: the same
    sniffer = broken.sniffer("iopub")
    assert sniffer is not None
    sniffer.on_message = lambda *_: 1 / 0
    sniffer.feed(GREETING + status("busy"))
    assert sniffer.dead and broken.blind


def test_a_failed_idle_shutdown_still_tells_exited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bogus signature_scheme (the signing raises AttributeError), a kernel that does
    not exit and a cleanup that raises: ``exited`` is told (code -1), all logged."""
    monkeypatch.setattr(idle, "POLITE_WAIT", 0.2)
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)  # the control channel: the handshake succeeds
    router.linger = 0
    router.bind("ipc://" + str(tmp_path / "k-4"))
    fake = FakeKernel(tmp_path, idle_for=6.0)
    fake.endpoints = {"control": str(tmp_path / "k-4")}
    fake.request.update(key="k3y", signature_scheme="hmac-bogus")

    def cleanup() -> None:
        raise RuntimeError("no group")

    fake.poll_exit = lambda: None  # type: ignore[method-assign]
    fake.cleanup = cleanup  # type: ignore[method-assign]
    agent = fake_agent(tmp_path, fake)
    try:
        idle.IdleWatch(agent).tick(100.0)
        ((work, then),) = agent.spawned
        then(work())
    finally:
        router.close()
        ctx.term()
    ((event, fields),) = fake.events
    assert event == "exited" and fields["code"] == idle.LOST == fake.exit_code
    assert fields["reason"] == idle.IDLE_TIMEOUT and not agent.kernels
    log = (tmp_path / "agent.log").read_text()
    assert "its shutdown_request failed (AttributeError" in log
    assert "its cleanup failed (RuntimeError: no group)" in log
    assert "shut down after 6 s idle" in log


def test_a_kernel_active_again_before_its_shutdown_is_kept(tmp_path: Path) -> None:
    fake = FakeKernel(tmp_path, idle_for=6.0)
    agent = fake_agent(tmp_path, fake)
    idle.IdleWatch(agent).tick(100.0)
    assert not agent.kernels
    ((work, then),) = agent.spawned
    shell = fake.activity.sniffer("shell")
    assert shell is not None
    shell.feed(GREETING + message("execute_request", {"code": "1"}))  # before the worker
    then(work())  # on the loop: back in the agent's kernels, untouched
    assert agent.kernels == {"k1": fake}
    assert not fake.cleaned and not fake.events and fake.exit_code is None
    assert "active again before its idle shutdown, kept" in (tmp_path / "agent.log").read_text()

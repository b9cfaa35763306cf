"""The resumable relay's protocol (sshpyk/agent/remote/resume.py), both ends in memory:
links that drop at random points lose nothing, duplicate nothing, keep order; overflow
drops whole iopub messages only, oldest first, and never shell bytes."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from sshpyk.agent.remote.resume import (
    COUNT,
    F_ACK,
    F_DATA,
    F_HELLO,
    F_OPEN,
    F_WELCOME,
    Endpoint,
    FrameReader,
    ZmtpUnits,
)


class Pair:
    """A local and an agent Endpoint, with per-direction "wires" that can be cut."""

    def __init__(self, budget: int = 64 << 20, early: bool = True) -> None:
        self.early = early  # False: an agent that never says it takes a resend at once
        self.local = Endpoint(budget)
        self.agent = Endpoint(budget, agent_side=True)
        self.to_kernel: dict[int, bytearray] = {}  # what reached the kernel per stream
        self.to_client: dict[int, bytearray] = {}
        self.dropped: list[dict[str, Any]] = []
        self.connect()

    def connect(self) -> None:
        reader = FrameReader()
        ((kind, _, payload),) = reader.feed(self.local.start_link("tok"))
        assert kind == F_HELLO
        assert self.local.awaiting_welcome
        hello = json.loads(payload)
        later = self.local.links > 1
        assert self.local.up == (not later or self.early)
        ahead = self.local.outgoing()  # what the local side sends before the WELCOME
        assert ("resend" in hello) == (later and self.early)
        assert not ahead or not later or self.early
        actions = self.agent.resume(hello["streams"], resend=hello.get("resend"))
        self.run(actions, self.to_kernel, self.agent)
        ((kind, sid, payload),) = reader.feed(self.agent.welcome())
        assert kind == F_WELCOME
        if not self.early:
            payload = json.dumps({**json.loads(payload), "resend": False}).encode()
        for akind, asid, apayload in frames(ahead):  # the agent reads them after WELCOME
            self.run(self.agent.on_frame(akind, asid, apayload), self.to_kernel, self.agent)
        self.run(self.local.on_frame(kind, sid, payload), self.to_client, self.local)
        assert self.local.up and not self.local.awaiting_welcome

    def drop(self) -> None:
        self.local.link_lost()
        self.agent.link_lost()

    def run(self, actions: list[Any], sink: dict[int, bytearray], side: Endpoint) -> None:
        for action in actions:
            if action[0] == "data":
                sink.setdefault(action[1], bytearray()).extend(action[2])
                side.written(action[1], len(action[2]))
            elif action[0] == "dropped":
                self.dropped.append(action[1])

    def pump(self, lose_after: int | None = None) -> None:
        """Move frames both ways until quiet; ``lose_after``: the wire loses everything
        after that many bytes (then the link is dropped)."""
        for _ in range(1000):  # bounded: ends when quiet
            moved = False
            for src, dst, sink in (
                (self.local, self.agent, self.to_kernel),
                (self.agent, self.local, self.to_client),
            ):
                data = src.outgoing()
                if not data:
                    continue
                moved = True
                if lose_after is not None:
                    data = data[:lose_after]  # a torn frame stays in the dead reader
                    reader = FrameReader()
                    for kind, sid, payload in reader.feed(data):
                        self.run(dst.on_frame(kind, sid, payload), sink, dst)
                    self.drop()
                    return
                for kind, sid, payload in FrameReader().feed(data):
                    self.run(dst.on_frame(kind, sid, payload), sink, dst)
            if not moved:
                return
        raise AssertionError("the relay never went quiet")


def frames(data: bytes) -> list[tuple[int, int, bytes]]:
    return FrameReader().feed(data)


def test_the_first_link_sends_before_welcome_and_the_agent_takes_it() -> None:
    local, agent = Endpoint(), Endpoint(agent_side=True)
    hello = local.start_link("tok")
    assert local.up and local.awaiting_welcome  # nothing to resume: no round trip
    sid = local.new_stream("shell")
    local.push(sid, b"request")
    (kind, _, payload), *rest = frames(hello + local.outgoing())  # as the wire has them
    assert kind == F_HELLO
    assert agent.resume(json.loads(payload)["streams"]) == []
    welcome = agent.welcome()  # goes out strictly first
    actions = [a for k, s, p in rest for a in agent.on_frame(k, s, p)]
    assert actions == [("open", sid, "shell", False), ("data", sid, b"request")]
    ((kind, wsid, payload),) = frames(welcome)
    assert local.on_frame(kind, wsid, payload) == []
    assert local.up and not local.awaiting_welcome
    agent.written(sid, len(b"request"))
    agent.push(sid, b"reply")
    actions = [a for k, s, p in frames(agent.outgoing()) for a in local.on_frame(k, s, p)]
    assert actions == [("data", sid, b"reply")]


def test_a_later_link_waits_for_welcome_and_resumes() -> None:
    pair = Pair(early=False)
    sid = pair.local.new_stream("shell")
    pair.local.push(sid, b"request")
    pair.pump()
    pair.agent.push(sid, b"reply")
    pair.pump()
    pair.drop()
    pair.local.push(sid, b"more")  # during the outage: queued on both sides
    pair.agent.push(sid, b"queued")
    ((kind, _, payload),) = frames(pair.local.start_link("tok"))
    assert kind == F_HELLO
    assert pair.local.awaiting_welcome and not pair.local.up
    assert pair.local.outgoing() == b""  # nothing before the WELCOME
    pair.agent.resume(json.loads(payload)["streams"])
    ((kind, wsid, payload),) = frames(pair.agent.welcome())
    assert pair.local.on_frame(kind, wsid, payload) == []
    assert pair.local.up and not pair.local.awaiting_welcome
    assert pair.local.peer_pending == len(b"queued")
    pair.pump()
    assert pair.to_kernel[sid] == b"requestmore"
    assert pair.to_client[sid] == b"replyqueued"


def test_a_later_link_resends_at_once_and_the_agent_drops_what_it_has() -> None:
    """An agent that said it takes it gets everything unconfirmed again right behind
    the HELLO (a reconnect's first request saves the WELCOME's round trip); it drops the
    bytes it already had, so each reaches the kernel once, in order."""
    pair = Pair()
    sid = pair.local.new_stream("shell")
    pair.local.push(sid, b"request")
    pair.pump()  # the agent has it; its ACK had nothing to ride along with
    assert pair.to_kernel[sid] == b"request" and pair.local.streams[sid].unacked
    pair.drop()
    pair.local.push(sid, b"more")
    hello = json.loads(frames(pair.local.start_link("tok"))[0][2])
    assert hello["resend"] == {str(sid): 0}
    ahead = frames(pair.local.outgoing())  # before any WELCOME
    assert [k for k, _, _ in ahead] == [F_OPEN, F_DATA, F_DATA]
    assert b"".join(p for _, _, p in ahead[1:]) == b"requestmore"
    pair.agent.resume(hello["streams"], resend=hello["resend"])
    welcome = frames(pair.agent.welcome())[0]
    actions = [a for k, s, p in ahead for a in pair.agent.on_frame(k, s, p)]
    assert actions == [("data", sid, b"more")]  # the OPEN repeat and "request" dropped
    assert pair.local.on_frame(*welcome) == []
    assert pair.local.streams[sid].base == len(b"request")
    pair.agent.written(sid, len(b"more"))
    pair.agent.push(sid, b"reply")
    pair.pump()
    assert pair.to_client[sid] == b"reply"
    assert not pair.local.streams[sid].unacked  # the ACK of "more" came with the reply


def test_resent_bytes_that_skip_ahead_or_an_ack_of_bytes_never_sent_break_the_link() -> None:
    pair = Pair()
    sid = pair.local.new_stream("shell")
    pair.local.push(sid, b"request")
    pair.pump()
    pair.drop()
    pair.agent.resume({str(sid): 0}, resend={str(sid): 9})  # it has 7 bytes, not 9
    with pytest.raises(ValueError):
        pair.agent.on_frame(F_DATA, sid, b"xx")
    with pytest.raises(ValueError):
        pair.local.on_frame(F_ACK, sid, COUNT.pack(8))


def test_a_welcome_nobody_asked_for_is_a_broken_peer() -> None:
    pair = Pair()
    ((kind, sid, payload),) = frames(pair.agent.welcome())
    with pytest.raises(ValueError):
        pair.local.on_frame(kind, sid, payload)
    with pytest.raises(ValueError):
        pair.agent.on_frame(kind, sid, payload)


@pytest.mark.parametrize("first_link", [True, False])
def test_a_frame_before_the_welcome_is_a_broken_peer(first_link: bool) -> None:
    local = Endpoint()
    sid = local.new_stream("shell")
    if not first_link:
        local.start_link("tok")
        local.link_lost()
    local.start_link("tok")
    with pytest.raises(ValueError):
        local.on_frame(F_DATA, sid, b"x")


def test_bytes_flow_both_ways_in_order() -> None:
    pair = Pair()
    sid = pair.local.new_stream("shell")
    pair.local.push(sid, b"request")
    pair.pump()
    assert pair.to_kernel[sid] == b"request"
    pair.agent.push(sid, b"reply")
    pair.pump()
    assert pair.to_client[sid] == b"reply"


@pytest.mark.parametrize("early", [True, False], ids=["resend-at-once", "after-welcome"])
@pytest.mark.parametrize("seed", range(40))
def test_random_drops_lose_and_repeat_nothing(seed: int, early: bool) -> None:
    rng = random.Random(seed)
    pair = Pair(early=early)
    sids = [pair.local.new_stream(c) for c in ("shell", "control", "stdin", "hb")]
    sent_up: dict[int, bytearray] = {s: bytearray() for s in sids}
    sent_down: dict[int, bytearray] = {s: bytearray() for s in sids}
    for step in range(60):
        for sid in sids:
            if rng.random() < 0.5:
                up = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 3000)))
                pair.local.push(sid, up)
                sent_up[sid] += up
            if rng.random() < 0.5 and pair.agent.streams.get(sid):
                down = bytes([step % 256]) * rng.randint(1, 300_000)
                pair.agent.push(sid, down)
                sent_down[sid] += down
        if rng.random() < 0.3:
            pair.pump(lose_after=rng.randint(0, 5000))
            pair.connect()
        else:
            pair.pump()
    pair.pump()
    for sid in sids:
        assert pair.to_kernel.get(sid, b"") == sent_up[sid]
        assert pair.to_client.get(sid, b"") == sent_down[sid]


def test_streams_close_on_both_sides_and_are_removed() -> None:
    pair = Pair()
    sid = pair.local.new_stream("shell")
    pair.local.push(sid, b"x")
    pair.pump()
    pair.local.push_close(sid)
    pair.pump(lose_after=30)  # the CLOSE may or may not arrive
    pair.connect()
    pair.pump()
    pair.agent.push_close(sid)  # the agent closed its socket in answer
    pair.pump()
    assert sid not in pair.local.streams and sid not in pair.agent.streams


def zmtp_message(*parts: bytes) -> bytes:
    out = b""
    for n, part in enumerate(parts):
        more = 0x01 if n < len(parts) - 1 else 0
        if len(part) > 255:
            out += bytes([more | 0x02]) + len(part).to_bytes(8, "big") + part
        else:
            out += bytes([more, len(part)]) + part
    return out


GREETING = b"\xff" + b"\x00" * 8 + b"\x7f\x03\x01" + b"NULL" + b"\x00" * 16 + b"\x00" * 32
READY = b"\x04\x19\x05READY\x0bSocket-Type\x00\x00\x00\x03PUB"


def test_zmtp_units_split_greeting_commands_and_whole_messages() -> None:
    units = ZmtpUnits()
    stream = GREETING + READY + zmtp_message(b"a", b"bb") + zmtp_message(b"c" * 300)
    got = []
    for i in range(0, len(stream), 7):  # any chunking
        got += units.feed(stream[i : i + 7])
    joined = b"".join(chunk for chunk, _ in got)
    assert joined == stream
    droppable = [chunk for chunk, d in got if d]
    assert droppable == [zmtp_message(b"a", b"bb"), zmtp_message(b"c" * 300)]
    assert all(not d for chunk, d in got if chunk in (READY,))


def test_not_zmtp3_passes_through_undropped() -> None:
    units = ZmtpUnits()
    got = units.feed(b"hello, this is not zmq at all")
    assert b"".join(c for c, _ in got) == b"hello, this is not zmq at all"
    assert not any(d for _, d in got)


def test_overflow_drops_the_oldest_iopub_messages_never_shell() -> None:
    pair = Pair(budget=1 << 20)
    iopub = pair.local.new_stream("iopub")
    shell = pair.local.new_stream("shell")
    pair.pump()
    pair.agent.push(iopub, GREETING + READY)
    pair.pump()
    pair.drop()  # the outage: everything queues on the agent
    messages = [zmtp_message(b"topic", bytes([n % 256]) * 100_000) for n in range(40)]
    for message in messages:
        pair.agent.push(iopub, message)
    pair.agent.push(shell, b"R" * 300_000)  # a reply: kept whatever the budget
    pair.connect()
    pair.pump()
    received = bytes(pair.to_client[iopub])
    assert received.startswith(GREETING + READY)
    rest = received[len(GREETING + READY) :]
    kept = len(rest) // len(messages[0])
    assert 0 < kept < len(messages)
    assert rest == b"".join(messages[-kept:])  # the newest whole messages, in order
    assert pair.to_client[shell] == b"R" * 300_000
    assert sum(d["messages"] for d in pair.dropped) == len(messages) - kept

"""The agent's end of the relay (links.py over relayio.py) with real unix sockets: a link
speaks frames to a LinkServer, which connects each stream to a stand-in kernel socket.
ZMTP's first bytes go ahead on a ``zmtp3`` stream: the kernel gets them at once, its own
never reach the link, and ACKs count only the local side's bytes."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sshpyk.agent.remote.links import LinkDispatch, LinkServer
from sshpyk.agent.remote.resume import (
    COUNT,
    F_ACK,
    F_CLOSE,
    F_DATA,
    F_HELLO,
    F_OPEN,
    F_WELCOME,
    FrameReader,
    frame,
    json_frame,
)
from sshpyk.agent.remote.zmtp import ZMTP_AHEAD

CLIENT_REST = b"\x01NULL" + bytes(48)  # what a client's greeting has after its 11 bytes


class Kernel:
    """A unix socket that accepts one connection and answers ``reply`` once it has read
    ``expect`` bytes; what it read is kept."""

    def __init__(self, path: Path, expect: int, reply: bytes) -> None:
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.listener.settimeout(5)
        self.got = b""
        self.expect = expect
        self.reply = reply
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(5)
        with conn:
            while len(self.got) < self.expect:  # bounded: the timeout
                data = conn.recv(4096)
                if not data:
                    return
                self.got += data
            conn.sendall(self.reply)
            conn.recv(1)  # until the relay closes it (or the timeout)

    def close(self) -> None:
        self.thread.join(6)
        self.listener.close()


class Peer:
    """The local side of one link: frames out, frames in."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(5)
        self.sock.connect(str(path))
        self.reader = FrameReader()
        self.frames: list[tuple[int, int, bytes]] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def until(self, done: object) -> list[tuple[int, int, bytes]]:
        for _ in range(100):  # bounded: 100 reads of at most 5 s each
            if callable(done) and done(self.frames):
                return self.frames
            data = self.sock.recv(65536)
            if not data:
                break
            self.frames += self.reader.feed(data)
        raise AssertionError(f"not seen: {self.frames}")


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "k"
    path.mkdir(mode=0o700)
    yield path


def serve(run_dir: Path, kernel_path: Path) -> LinkServer:
    return LinkServer(str(run_dir / "r"), lambda channel: str(kernel_path), 1 << 20, 60.0)


def data_of(frames: list[tuple[int, int, bytes]], sid: int) -> bytes:
    return b"".join(p for k, s, p in frames if k == F_DATA and s == sid)


def test_zmtp_goes_ahead_to_the_kernel_and_its_own_first_bytes_are_dropped(run_dir: Path) -> None:
    kernel = Kernel(run_dir / "shell", len(ZMTP_AHEAD) + len(CLIENT_REST), ZMTP_AHEAD + b"KREST")
    server = serve(run_dir, run_dir / "shell")
    peer = Peer(run_dir / "r")
    try:
        peer.send(json_frame(F_HELLO, {"session": "s", "streams": {}}))
        peer.send(frame(F_OPEN, 1, b"shell zmtp3") + frame(F_DATA, 1, CLIENT_REST))
        frames = peer.until(
            lambda f: data_of(f, 1) == b"KREST" and any(k == F_ACK and s == 1 for k, s, _ in f)
        )
        assert frames[0][0] == F_WELCOME and json.loads(frames[0][2])["resend"] is True
        assert kernel.got == ZMTP_AHEAD + CLIENT_REST  # ours first, then the client's
        acks = [COUNT.unpack(p)[0] for k, s, p in frames if k == F_ACK and s == 1]
        assert acks and max(acks) == len(CLIENT_REST)  # not the bytes we gave ahead
    finally:
        server.close(0)
        peer.sock.close()
        kernel.close()


def test_a_kernel_that_is_not_zmtp3_ends_its_stream(run_dir: Path) -> None:
    kernel = Kernel(run_dir / "shell", len(ZMTP_AHEAD), b"HTTP/1.1 400 Bad Request\r\n\r\n")
    server = serve(run_dir, run_dir / "shell")
    peer = Peer(run_dir / "r")
    try:
        peer.send(json_frame(F_HELLO, {"session": "s", "streams": {}}))
        peer.send(frame(F_OPEN, 1, b"shell zmtp3"))
        frames = peer.until(lambda f: any(k == F_CLOSE and s == 1 for k, s, _ in f))
        assert data_of(frames, 1) == b""  # nothing of what it sent went on
    finally:
        server.close(0)
        peer.sock.close()
        kernel.close()


def test_without_the_flag_the_stream_is_passed_as_it_is(run_dir: Path) -> None:
    kernel = Kernel(run_dir / "shell", 5, ZMTP_AHEAD + b"KREST")
    server = serve(run_dir, run_dir / "shell")
    peer = Peer(run_dir / "r")
    try:
        peer.send(json_frame(F_HELLO, {"session": "s", "streams": {}}))
        peer.send(frame(F_OPEN, 1, b"shell") + frame(F_DATA, 1, b"hello"))
        frames = peer.until(lambda f: data_of(f, 1) == ZMTP_AHEAD + b"KREST")
        assert kernel.got == b"hello"
        assert data_of(frames, 1) == ZMTP_AHEAD + b"KREST"
    finally:
        server.close(0)
        peer.sock.close()
        kernel.close()


def test_the_agents_relay_socket_hands_a_link_to_the_kernel_it_names(run_dir: Path) -> None:
    """A link to the agent-wide socket goes to the LinkServer its HELLO names (the
    local side opens it before the kernel's run dir is known); an unknown kernel, or one
    whose server was unregistered, gets the link aborted (the local side then opens the
    kernel's own socket)."""
    kernel = Kernel(run_dir / "shell", 5, b"reply")
    server = serve(run_dir, run_dir / "shell")
    dispatch = LinkDispatch(str(run_dir / "a"))
    dispatch.register("k1", server)
    peers = [Peer(run_dir / "a") for _ in range(3)]
    try:
        peers[0].send(json_frame(F_HELLO, {"session": "s", "kid": "k1", "streams": {}}))
        peers[0].send(frame(F_OPEN, 1, b"shell") + frame(F_DATA, 1, b"hello"))
        frames = peers[0].until(lambda f: data_of(f, 1) == b"reply")
        assert frames[0][0] == F_WELCOME and kernel.got == b"hello"
        assert list(server.sessions) == ["s"]  # the kernel's server has the session
        peers[1].send(json_frame(F_HELLO, {"session": "t", "kid": "k2", "streams": {}}))
        assert peers[1].sock.recv(100) == b""  # aborted: no such kernel
        dispatch.unregister("k1", server)
        peers[2].send(json_frame(F_HELLO, {"session": "u", "kid": "k1", "streams": {}}))
        assert peers[2].sock.recv(100) == b""
    finally:
        dispatch.close()
        server.close(0)
        for peer in peers:
            peer.sock.close()
        kernel.close()

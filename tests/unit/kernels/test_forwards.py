"""The forwards' client connections (sshpyk/kernels/forwards.py), over real local
sockets and no SSH: an accepted connection keeps what its client sent until it is
bound to a relay stream or a direct pipe, and either kind passes it on first."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sshpyk.agent.remote.zmtp import ZMTP_AHEAD
from sshpyk.kernels.forwards import _Accepted, _DirectEnd, _RelayClient


class FakeLink:
    """What a _RelayClient calls on its KernelLink, recorded."""

    label = "[fake] kernel k"

    def __init__(self, ahead: bool = False) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.ahead = ahead

    def add(self, channel: str, client: Any, ahead: bool = False) -> int:
        self.calls.append(("add", channel) + (("ahead",) if ahead else ()))
        return 7

    def from_client(self, sid: int, data: bytes, client: Any) -> None:
        self.calls.append(("data", sid, data))

    def client_closed(self, sid: int) -> None:
        self.calls.append(("closed", sid))

    def client_drained(self, sid: int, count: int) -> None:
        self.calls.append(("drained", sid, count))


async def until(condition: Any) -> None:
    for _ in range(200):  # bounded: 2 s
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


@pytest.fixture
async def accepted(tmp_path: Path) -> AsyncIterator[tuple[_Accepted, socket.socket, set[Any]]]:
    """An _Accepted connection, the client's socket, and the set it leaves on close."""
    live: set[Any] = set()
    made: list[_Accepted] = []

    def factory() -> _Accepted:
        made.append(_Accepted(on_close=live.discard))
        live.add(made[-1])
        return made[-1]

    path = str(tmp_path / "k-1")
    server = await asyncio.get_running_loop().create_unix_server(factory, path)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    client.settimeout(2)
    await until(lambda: made and made[0].transport is not None)
    try:
        yield made[0], client, live
    finally:
        client.close()
        for connection in list(live):
            connection.close()
        server.close()
        await server.wait_closed()


async def test_a_relayed_connection_gets_what_came_before_it_was_bound(
    accepted: tuple[_Accepted, socket.socket, set[Any]],
) -> None:
    connection, client, live = accepted
    client.sendall(b"early")
    await until(lambda: connection.pending == b"early")
    link = FakeLink()
    relay = _RelayClient(link, "shell", live.discard)  # type: ignore[arg-type]
    live.discard(connection)
    live.add(relay)
    connection.bind(relay)
    assert link.calls == [("add", "shell"), ("data", 7, b"early")]
    client.sendall(b"later")
    await until(lambda: len(link.calls) == 3)
    assert link.calls[2] == ("data", 7, b"later")
    assert relay.deliver(b"reply") == 5  # written at once: ACKed at once
    assert client.recv(100) == b"reply"
    relay.pause_writing()  # over the high-water mark: ACKed once drained
    assert relay.deliver(b"held") == 0
    relay.resume_writing()
    assert link.calls[3] == ("drained", 7, 4)
    client.shutdown(socket.SHUT_WR)  # ZMQ never half-closes: the stream ends
    await until(lambda: relay.closed)
    assert link.calls[-1] == ("closed", 7) and not live


async def test_an_eof_before_binding_ends_a_relayed_stream_after_its_bytes(
    accepted: tuple[_Accepted, socket.socket, set[Any]],
) -> None:
    connection, client, live = accepted
    client.sendall(b"last words")
    client.shutdown(socket.SHUT_WR)
    await until(lambda: connection.eof)
    link = FakeLink()
    relay = _RelayClient(link, "control", live.discard)  # type: ignore[arg-type]
    connection.bind(relay)
    assert link.calls == [("add", "control"), ("data", 7, b"last words"), ("closed", 7)]
    assert relay.closed


@pytest.mark.parametrize("split", [1, 5, 11, 30])
async def test_zmtps_first_bytes_go_ahead_to_the_client_and_its_own_are_dropped(
    accepted: tuple[_Accepted, socket.socket, set[Any]], split: int
) -> None:
    """With a relay that takes them ahead, the client gets a ZMTP 3 peer's first 11 bytes
    at once (it need not wait a round trip for the kernel's), and the 11 it sends do not
    go on the link (the agent gives the kernel its own), however they arrive."""
    connection, client, live = accepted
    greeting = ZMTP_AHEAD + b"\x01NULL" + bytes(16)
    client.sendall(greeting[:split])
    await until(lambda: connection.pending == greeting[:split])
    link = FakeLink(ahead=True)
    relay = _RelayClient(link, "shell", live.discard)  # type: ignore[arg-type]
    connection.bind(relay)
    client.settimeout(2)
    assert await asyncio.to_thread(client.recv, 100) == ZMTP_AHEAD
    client.sendall(greeting[split:])
    rest = greeting[len(ZMTP_AHEAD) :]
    await until(lambda: b"".join(c[2] for c in link.calls if c[0] == "data") == rest)
    assert link.calls[0] == ("add", "shell", "ahead")


async def test_a_client_that_is_not_zmtp3_is_cut_off_when_zmtp_goes_ahead(
    accepted: tuple[_Accepted, socket.socket, set[Any]],
) -> None:
    connection, client, live = accepted
    client.sendall(b"GET / HTTP/1.1\r\n")
    await until(lambda: connection.pending)
    link = FakeLink(ahead=True)
    relay = _RelayClient(link, "shell", live.discard)  # type: ignore[arg-type]
    connection.bind(relay)
    await until(lambda: relay.closed)
    assert [c for c in link.calls if c[0] == "data"] == []


async def test_a_direct_pipe_passes_early_bytes_and_the_half_close_on(
    accepted: tuple[_Accepted, socket.socket, set[Any]],
) -> None:
    connection, client, live = accepted
    client.sendall(b"early")
    client.shutdown(socket.SHUT_WR)
    await until(lambda: connection.eof)
    local, remote = _DirectEnd.pair(live.discard)
    kernel, channel = socket.socketpair()  # stands in for the SSH channel to the kernel
    kernel.settimeout(2)
    try:
        await asyncio.get_running_loop().connect_accepted_socket(lambda: remote, channel)
        live.discard(connection)
        live.add(local)
        connection.bind(local)
        await asyncio.sleep(0)
        got = b""
        while True:  # ends at the client's EOF, passed on
            data = await asyncio.to_thread(kernel.recv, 100)
            if not data:
                break
            got += data
        assert got == b"early"
        kernel.sendall(b"reply")  # the other direction is still open
        assert await asyncio.to_thread(client.recv, 100) == b"reply"
        kernel.close()  # the kernel's EOF is passed on too
        assert await asyncio.to_thread(client.recv, 100) == b""
        remote.transport.close()  # asyncssh closes a channel once both EOFs went by
        await until(lambda: local.closed and remote.closed)
        assert not live
    finally:
        kernel.close()

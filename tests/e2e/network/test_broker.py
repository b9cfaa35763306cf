"""Connection sharing through the connection broker (issue 22, phase A), against a real
OpenSSH sshd: one TCP connection for several processes, a faithful relay of sessions
and streams, errors as in-process, kill -9 of the broker, the persist time, and
another local user kept out.

Every test has its own broker dir in /tmp (``SSHPYK_BROKER_DIR``); the broker in it is
stopped and the dir removed at the end, also when the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from sshpyk import SSHSession
from sshpyk.errors import LoginPromptError, SSHPykError, UnsafePathError
from sshpyk.kernels.kernel import KernelOptions
from sshpyk.localfs import BROKER_DIR_ENV
from sshpyk.ssh.brokered import PERSIST_ENV
from sshpyk.ssh.session import Session

from support.broker import (
    ClientProcess,
    KernelClientProcess,
    broker_alive,
    broker_pid,
    established,
    logins,
    temp_broker_dir,
)
from support.errors import one_line
from support.kernels import run_cell
from support.second_user import SecondUser
from support.sshd import ThrowawaySSHD
from support.waiting import pid_alive, wait_until

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def bdir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """This test's broker dir; sharing on (persist 2 s) for connects made in the test."""
    with temp_broker_dir() as path:
        monkeypatch.setenv(BROKER_DIR_ENV, str(path))
        monkeypatch.setenv(PERSIST_ENV, "2")
        yield path


@contextlib.asynccontextmanager
async def connected(sshd: ThrowawaySSHD) -> AsyncIterator[Session]:
    session = await Session.connect(sshd.alias, ssh_config=sshd.ssh_config)
    try:
        yield session
    finally:
        await session.aclose(10)


@contextlib.contextmanager
def no_sharing(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """In-process connects for the block (the reference a relay is compared with)."""
    saved = os.environ.get(PERSIST_ENV)
    monkeypatch.delenv(PERSIST_ENV)
    try:
        yield
    finally:
        if saved is not None:
            monkeypatch.setenv(PERSIST_ENV, saved)


# -- (a) one connection for two processes --------------------------------------------------


def test_two_processes_share_one_connection(own_sshd: ThrowawaySSHD) -> None:
    before = logins(own_sshd.log_file)
    with temp_broker_dir() as path:
        args = (path, 5.0, own_sshd.alias, own_sshd.ssh_config, "echo $SSH_CONNECTION")
        first = ClientProcess(*args)
        second: ClientProcess | None = None
        try:
            one = first.report()
            second = ClientProcess(*args)
            two = second.report()
            assert one["status"] == two["status"] == 0
            assert one["out"] and one["out"] == two["out"]  # the same TCP connection
            assert established(own_sshd.port) == 1
            assert logins(own_sshd.log_file) - before == 1
            pid = broker_pid(path)
            assert pid is not None
            # the second one only made the local handshake
            assert two["connect"] < min(0.5, one["connect"]), (one, two)
            print(f"connect: first {one['connect']:.3f} s, second {two['connect']:.3f} s")
        finally:
            for client in (first, second):
                if client is not None:
                    client.close()
        assert broker_pid(path) == pid  # persist: it stays for now


# -- (b) sessions relayed faithfully -------------------------------------------------------

BIG = "seq 1 1500000"  # about 10.9 MB of stdout
BIG_OUT = "".join(f"{i}\n" for i in range(1, 1500001)).encode()


async def session_behaviour(conn: asyncssh.SSHClientConnection) -> dict[str, Any]:
    """What a connection does with exit statuses, signals, stderr, big and early data."""
    seen: dict[str, Any] = {}
    result = await conn.run("printf out; printf err >&2; exit 3", check=False)
    seen["status"] = (result.exit_status, result.exit_signal, result.stdout, result.stderr)
    result = await conn.run("kill -KILL $$", check=False)
    seen["killed"] = (result.exit_status, result.exit_signal and result.exit_signal[0])
    big = await conn.run(BIG, check=False, encoding=None)
    seen["big"] = (big.exit_status, len(big.stdout or b""), hashlib.sha256(big.stdout).hexdigest())
    data = os.urandom(3 << 20)
    echoed = await conn.run("cat", input=data, check=False, encoding=None)  # early stdin
    seen["cat"] = (echoed.exit_status, echoed.stdout == data)
    return seen


async def test_exec_relay_is_faithful(sshd, bdir, monkeypatch) -> None:
    with no_sharing(monkeypatch):
        async with connected(sshd) as session:
            direct = await session_behaviour(await session.connection())
    async with connected(sshd) as session:
        relayed = await session_behaviour(await session.connection())
        assert broker_pid(bdir) is not None
    assert relayed == direct
    assert relayed["status"] == (3, None, "out", "err")
    assert relayed["killed"] == (-1, "KILL")  # asyncssh's status for a signal
    assert relayed["big"] == (0, len(BIG_OUT), hashlib.sha256(BIG_OUT).hexdigest())
    assert relayed["cat"] == (0, True)


async def test_signals_are_relayed(sshd, bdir) -> None:
    """This sshd refuses to deliver signals ("session signalling requires privilege
    separation") but logs each request: one line per signal shows it got through."""

    def requests() -> int:
        return sshd.log_file.read_text(errors="replace").count("session_signal_req")

    before = requests()
    async with connected(sshd) as session:
        process = await (await session.connection()).create_process("echo ready; sleep 30")
        assert await asyncio.wait_for(process.stdout.readline(), 10) == "ready\n"
        process.send_signal("TERM")
        assert wait_until(lambda: requests() == before + 1, 10)
        process.close()


# -- (c) streams, and refused opens --------------------------------------------------------


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.write_eof()  # half-close passes through
        await writer.drain()
    writer.close()


async def round_trip(reader: Any, writer: Any, data: bytes) -> bytes:
    writer.write(data)
    writer.write_eof()
    got = b""
    while chunk := await asyncio.wait_for(reader.read(1 << 20), 20):
        got += chunk
    writer.close()
    return got


async def open_errors(conn: asyncssh.SSHClientConnection, closed_port: int) -> list[Any]:
    found = []
    for opening in (
        conn.open_unix_connection("/nonexistent/sshpyk-broker-test.sock"),
        conn.open_connection("127.0.0.1", closed_port),
    ):
        with pytest.raises(asyncssh.ChannelOpenError) as info:
            await opening
        found.append((info.value.code, info.value.reason))
    return found


async def test_stream_relay_and_refused_opens(sshd, sshd_nofwd, bdir, monkeypatch) -> None:
    sock_dir = Path(tempfile.mkdtemp(prefix="sshpyk-tbs-", dir="/tmp"))
    unix = await asyncio.start_unix_server(echo, str(sock_dir / "echo.sock"))
    tcp = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = tcp.sockets[0].getsockname()[1]
    with socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        closed_port = spare.getsockname()[1]  # nothing listens once it is closed
    try:
        with no_sharing(monkeypatch):
            async with connected(sshd) as session:
                direct_errors = await open_errors(await session.connection(), closed_port)
            async with connected(sshd_nofwd) as session:
                with pytest.raises(SSHPykError) as direct_refusal:
                    await session.check_forwarding("ipc", str(sock_dir / "echo.sock"))
        async with connected(sshd) as session:
            conn = await session.connection()
            data = os.urandom(5 << 20)
            got = await round_trip(
                *await conn.open_unix_connection(str(sock_dir / "echo.sock")), data
            )
            assert got == data
            got = await round_trip(*await conn.open_connection("127.0.0.1", port), data)
            assert got == data
            await session.check_forwarding("ipc", str(sock_dir / "echo.sock"))
            assert await open_errors(conn, closed_port) == direct_errors
        async with connected(sshd_nofwd) as session:
            with pytest.raises(SSHPykError) as relayed_refusal:
                await session.check_forwarding("ipc", str(sock_dir / "echo.sock"))
        assert type(relayed_refusal.value) is type(direct_refusal.value)
        assert str(relayed_refusal.value) == str(direct_refusal.value)
    finally:
        unix.close()
        tcp.close()
        await unix.wait_closed()
        await tcp.wait_closed()
        subprocess.run(["rm", "-rf", str(sock_dir)], check=False, timeout=10)


# -- errors of the upstream, as in-process -------------------------------------------------


@pytest.mark.parametrize(
    "alias", ["sshpyk-badauth", "sshpyk-badhostkey", "sshpyk-refused", "sshpyk-no-such-host"]
)
async def test_upstream_errors_are_the_in_process_ones(sshd, bdir, monkeypatch, alias) -> None:
    with no_sharing(monkeypatch):
        with pytest.raises(SSHPykError) as direct:
            await Session.connect(alias, ssh_config=sshd.ssh_config, connect_timeout=20)
    with pytest.raises(SSHPykError) as relayed:
        await Session.connect(alias, ssh_config=sshd.ssh_config, connect_timeout=20)
    assert type(relayed.value) is type(direct.value)
    assert str(relayed.value) == str(direct.value)
    assert one_line(relayed.value)
    assert vars(relayed.value) == vars(direct.value)  # a HostKeyError's fingerprint, file, fix


# -- (d) kill -9 of the broker -------------------------------------------------------------


async def test_broker_killed_the_link_drops_and_a_new_broker_serves(sshd, bdir) -> None:
    async with connected(sshd) as session:
        conn = await session.connection()
        process = await conn.create_process("sleep 60")
        pid = broker_pid(bdir)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await asyncio.wait_for(process.wait_closed(), 10)
        # no exit status: sshpyk reads this as a dropped link, not as an ended command
        assert (process.exit_status, process.exit_signal) == (None, None)
        await asyncio.wait_for(conn.wait_closed(), 10)
        assert not session.connected
        result = await asyncio.wait_for(session.run("echo again"), 30)  # reconnects
        assert (result.exit_status, result.stdout) == (0, "again\n")
        new_pid = broker_pid(bdir)
        assert new_pid is not None and new_pid != pid
    assert not pid_alive(pid)


# -- (e) the persist time ------------------------------------------------------------------


@pytest.mark.slow
def test_persist_expiry_then_the_broker_exits(own_sshd: ThrowawaySSHD) -> None:
    assert wait_until(lambda: established(own_sshd.port) == 0, 30)  # earlier tests' ends
    with temp_broker_dir() as path:
        client = ClientProcess(path, 3.0, own_sshd.alias, own_sshd.ssh_config, "true")
        try:
            assert client.report()["status"] == 0
            assert established(own_sshd.port) == 1
        finally:
            assert client.close() == 0
        left = time.monotonic()
        assert broker_alive(path)
        time.sleep(1.5)
        assert established(own_sshd.port) == 1, "closed before the persist time"
        assert wait_until(lambda: established(own_sshd.port) == 0, 10)
        closed_after = time.monotonic() - left
        assert 2.5 < closed_after < 6, closed_after
        assert wait_until(lambda: not broker_alive(path), 15)  # LINGER (5 s) after that
        assert not (path / "broker.sock").exists()


# -- (f) another local user, planted dirs and sockets ---------------------------------------

PROBE = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print("connect", type(exc).__name__); sys.exit(0)
try:
    data = s.recv(4096)  # an SSH server speaks first: its version string
except OSError as exc:
    print("recv", type(exc).__name__); sys.exit(0)
print("got", repr(data))
"""


async def test_another_user_cannot_reach_the_broker(sshd, bdir, attacker: SecondUser) -> None:
    async with connected(sshd):
        sock = str(bdir / "broker.sock")
        os.chmod(bdir.parent, 0o711)  # the test's temp dir: only the broker's dir stops it
        result = attacker.run_python(PROBE, sock)
        assert result.stdout.split() == ["connect", "PermissionError"]
        os.chmod(bdir, 0o711)  # loosened by the test: the socket itself is reachable
        os.chmod(sock, 0o777)
        try:
            result = attacker.run_python(PROBE, sock)
        finally:
            os.chmod(bdir, 0o700)
            os.chmod(sock, 0o600)
        # closed before any SSH byte: no version string, nothing at all
        assert result.stdout.strip() == "got b''", result.stdout
        log = (bdir / "broker.log").read_text()
        assert f"refused a connection from uid {attacker.uid}" in log


def _plant_dir(path: Path, how: str) -> None:
    if how == "symlink":
        target = path.with_name("elsewhere")
        target.mkdir(mode=0o700)
        path.symlink_to(target)
        return
    path.mkdir(mode=0o700)
    if how == "loose":
        os.chmod(path, 0o755)
    elif how == "foreign":
        os.chown(path, 65534, 65534)


@pytest.mark.parametrize("how", ["loose", "symlink", "foreign"])
async def test_a_planted_broker_dir_is_refused(sshd, bdir, how) -> None:
    if how == "foreign" and os.geteuid() != 0:
        pytest.skip("needs root to give the dir to another uid")
    bdir.parent.mkdir(exist_ok=True)
    _plant_dir(bdir, how)
    with pytest.raises(UnsafePathError) as info:
        await Session.connect(sshd.alias, ssh_config=sshd.ssh_config, connect_timeout=20)
    assert str(bdir) in one_line(info.value)


@pytest.mark.parametrize("how", ["symlink", "file", "foreign"])
async def test_a_planted_broker_socket_is_refused(sshd, bdir, how) -> None:
    if how == "foreign" and os.geteuid() != 0:
        pytest.skip("needs root to give the socket to another uid")
    bdir.mkdir(mode=0o700, parents=True)
    sock_path = bdir / "broker.sock"
    with socket.socket(socket.AF_UNIX) as planted:
        if how == "symlink":
            sock_path.symlink_to("/tmp")
        elif how == "file":
            sock_path.write_text("")
        else:
            planted.bind(str(sock_path))
            planted.listen(1)
            os.chown(sock_path, 65534, 65534)
        with pytest.raises(UnsafePathError) as info:
            await Session.connect(sshd.alias, ssh_config=sshd.ssh_config, connect_timeout=20)
    assert str(sock_path) in one_line(info.value)
    assert broker_pid(bdir) is None  # nothing was started next to it


# -- (g) a kernel through the broker -------------------------------------------------------


@pytest.mark.slow
async def test_a_kernel_through_the_broker(sshd, bdir, run_root, no_leftovers) -> None:
    options = KernelOptions(kernel_name="python3", python=sys.executable, run_root=str(run_root))
    async with await SSHSession.connect(sshd.alias, ssh_config=sshd.ssh_config) as session:
        pid = broker_pid(bdir)
        assert pid is not None
        kernel = await asyncio.wait_for(session.start_kernel(options=options), 90)
        async with kernel:
            kc = kernel.client()
            kc.start_channels()
            try:
                await kc.wait_for_ready(timeout=60)
                content, out = await run_cell(kc, "print(6 * 7)")
                assert content["status"] == "ok" and out.strip() == "42"
            finally:
                kc.stop_channels()
    no_leftovers()
    assert broker_pid(bdir) == pid  # the same broker carried it all
    assert wait_until(lambda: not broker_alive(bdir), 20)  # persist 2 s + linger 5 s


# -- a login that needs a person: asked in this process, through the broker ---------------


def passphrase_host(sshd: ThrowawaySSHD, tmp_path: Path) -> Path:
    """An ssh config whose host "needs-person" logs in with the test key, encrypted
    (passphrase "pass-phrase-42"): a login that needs a person."""
    key = asyncssh.read_private_key(sshd.root / "id_ed25519")
    encrypted = tmp_path / "id_encrypted"
    encrypted.write_bytes(key.export_private_key("openssh", "pass-phrase-42"))
    encrypted.chmod(0o600)
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host needs-person\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User {sshd.user}\n"
        f"  IdentityFile {encrypted}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {sshd.known_hosts}\n"
    )
    return config


async def test_a_login_that_needs_a_person_is_asked_here(
    sshd, bdir, tmp_path, monkeypatch, caplog
) -> None:
    """The broker has no terminal and runs no askpass: the key's passphrase question comes
    to this process (a keyboard-interactive round on its connection to the broker),
    which asks once; the connection is the broker's, shared."""
    caplog.set_level(logging.INFO, logger="sshpyk")
    config = passphrase_host(sshd, tmp_path)
    asked = tmp_path / "asked"
    askpass = tmp_path / "askpass.sh"
    askpass.write_text(f'#!/bin/sh\necho "$PPID $1" >> {asked}\necho pass-phrase-42\n')
    askpass.chmod(0o700)
    monkeypatch.setenv("SSH_ASKPASS", str(askpass))
    monkeypatch.setenv("SSH_ASKPASS_REQUIRE", "force")
    started = time.monotonic()
    session = await Session.connect("needs-person", ssh_config=config, connect_timeout=30)
    try:
        assert time.monotonic() - started < 15
        assert session.shared.via_broker
        assert (await session.run("echo ok")).stdout.strip() == "ok"
    finally:
        await session.aclose(10)
    (line,) = asked.read_text().splitlines()  # once, by this process
    assert line.startswith(f"{os.getpid()} ") and "passphrase" in line, line
    assert any("answered the login's question" in r.message for r in caplog.records)
    assert "pass-phrase-42" not in caplog.text


async def test_nobody_to_ask_fails_at_once(sshd, bdir, tmp_path, monkeypatch) -> None:
    """No terminal and no askpass here: the login fails within seconds, with the
    one-line reason of an in-process login; the broker asked nobody."""
    config = passphrase_host(sshd, tmp_path)
    monkeypatch.delenv("SSH_ASKPASS", raising=False)
    monkeypatch.setenv("SSH_ASKPASS_REQUIRE", "never")
    started = time.monotonic()
    with pytest.raises(LoginPromptError) as info:
        await Session.connect("needs-person", ssh_config=config, connect_timeout=30)
    assert time.monotonic() - started < 15
    assert "SSH_ASKPASS" in one_line(info.value), one_line(info.value)


# -- one agent for the processes of a user (issue 22 item 1) ------------------------------


@pytest.mark.slow
def test_processes_share_one_agent_and_each_owns_its_kernels(
    own_sshd: ThrowawaySSHD, run_root: Path, no_leftovers
) -> None:
    """Two processes through one broker: one agent. The first closes on purpose: only its
    kernel stops. The second is SIGKILLed: the broker's last will for it makes the agent
    stop its kernel within the short grace (3 s), not the link grace (300 s); then the
    agent, with nothing left, exits."""
    grace, link_grace = 3.0, 300.0
    with temp_broker_dir() as path:
        args = (path, 5.0, own_sshd.alias, own_sshd.ssh_config, run_root, grace, link_grace)
        first = KernelClientProcess(*args)
        second: KernelClientProcess | None = None
        try:
            one = first.report(90)
            second = KernelClientProcess(*args)
            two = second.report(90)
            assert one["agent"] == two["agent"], (one, two)  # joined, not started
            agent = one["agent"]
            assert pid_alive(one["pid"]) and pid_alive(two["pid"]) and pid_alive(agent)
            first.send("quit")
            assert first.report(60) == {"bye": True}
            assert wait_until(lambda: not pid_alive(one["pid"]), 15)
            assert pid_alive(two["pid"]) and pid_alive(agent)  # not the other's kernel
            second.send("check")
            assert second.report(60) == {"status": "ok"}
            second.proc.kill()
            second.proc.wait(10)
            killed = time.monotonic()
            assert wait_until(lambda: not pid_alive(two["pid"]), grace + 20, 0.1), (
                "the kernel of the SIGKILLed process outlived the short grace"
            )
            took = time.monotonic() - killed
            print(f"reaped {took:.1f} s after the SIGKILL (grace {grace:g} s)")
            log = (path / "broker.log").read_text()
            assert f"process {second.proc.pid} exited: delivering its will" in log
            # the first closed on purpose: it revoked its will
            assert f"process {first.proc.pid} exited" not in log, log
            assert wait_until(lambda: not pid_alive(agent), 20)
        finally:
            for client in (first, second):
                if client is not None:
                    client.close(10)
    no_leftovers()


async def test_a_joiner_checks_the_agents_token_before_it_says_anything(sshd, run_root) -> None:
    """A process joining an agent by its socket (a direct stream through sshd) reads the
    hello first: a wrong token (a reused socket path now served by another agent) is
    refused before one request goes out; the right one joins, the same agent."""
    from sshpyk.agent.client import RemoteAgent
    from sshpyk.errors import AgentGoneError

    async with await SSHSession.connect(sshd.alias, ssh_config=sshd.ssh_config) as session:
        agent = await session.agent(sys.executable, run_root=str(run_root))
        assert agent.socket_path and agent.agent_token
        with pytest.raises(AgentGoneError):
            await RemoteAgent.attach(
                session, agent.socket_path, sys.executable, owner=True, token="0" * 32
            )
        joined = await RemoteAgent.attach(
            session, agent.socket_path, sys.executable, owner=True, token=agent.agent_token
        )
        try:
            from sshpyk.agent.channel import SocketChannel

            assert isinstance(joined.process, SocketChannel)  # no exec'd relay
            assert joined.pid == agent.pid
            assert (await joined.request("state"))["kernels"] == []
        finally:
            await joined.close(5)

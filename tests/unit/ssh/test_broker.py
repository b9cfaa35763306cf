"""sshpyk.ssh.broker and sshpyk.ssh.brokered without OpenSSH: the request and error
codecs, the persist switch, the broker's files, single-flight start, a stale socket,
and the relay against an asyncssh server standing in for the host (signals, exit
status or none, early stdin, a refused channel with its code, a dropped upstream)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from sshpyk.errors import (
    BatchModeError,
    ChangedHostKeyError,
    HostRefusedError,
    LoginPromptError,
    SharedLoginNeedsPersonError,
    SSHConfigError,
    SSHPykError,
    UnsafePathError,
)
from sshpyk.localfs import (
    BROKER_DIR_ENV,
    broker_dir,
    check_own_socket,
    open_private_file,
    peer_credentials,
    read_private_json,
    write_private_json,
)
from sshpyk.ssh import broker, brokered, pool
from sshpyk.ssh.brokered import PERSIST_ENV, BrokerPaths, Request
from sshpyk.ssh.session import Session

from support.broker import broker_alive, broker_pid, stop_broker, temp_broker_dir
from support.waiting import pid_alive, wait_until

pytestmark = pytest.mark.timeout(60)


# -- the request and the errors --------------------------------------------------------


def test_request_round_trip_and_refusals() -> None:
    request = Request("gpu,box", "/home/u/.ssh/config", 600.0, 30.0)
    assert Request.decode(request.encode()) == request
    assert Request.decode(Request("a", None, 1, 2).encode()).ssh_config is None
    creds = {"SSH_AUTH_SOCK": "/tmp/ssh-x/agent.1", "KRB5CCNAME": "FILE:/tmp/krb5cc_0"}
    assert Request.decode(Request("a", None, 1, 2, creds).encode()).env == creds
    for bad in (
        '{"v":1,"alias":"a","config":null,"persist":1,"timeout":1,"env":{"LD_PRELOAD":"x"}}',
        '{"v":0,"alias":"a","config":null,"persist":1,"timeout":1}',
        '{"v":1,"alias":"","config":null,"persist":1,"timeout":1}',
        '{"v":1,"alias":"a","config":"relative/cfg","persist":1,"timeout":1}',
        '{"v":1,"alias":"a","config":null,"persist":-1,"timeout":1}',
        '{"v":1,"alias":"a","config":null,"persist":1,"timeout":"x"}',
        "root",
        "[]",
    ):
        with pytest.raises(ValueError):
            Request.decode(bad)
    with pytest.raises(SSHConfigError, match=PERSIST_ENV):
        Request("a", "/" + "x" * 1100, 1, 1).encode()


def test_errors_come_back_as_they_left() -> None:
    original = ChangedHostKeyError(
        "host key of 'box' has CHANGED. Verify it",
        problem="host key of 'box' has CHANGED",
        fix="verify it",
        fingerprint="SHA256:abc",
        known_hosts="/k",
    )
    # asyncssh adds " (error 11)" to the reason of an application disconnect
    wire = asyncssh.DisconnectError(11, brokered.encode_error(original) + " (error 11)")
    back = brokered.decode_error(wire)
    assert type(back) is ChangedHostKeyError and str(back) == str(original)
    assert vars(back) == vars(original)
    assert isinstance(back, SSHPykError)
    for cls in (HostRefusedError, LoginPromptError):
        back = brokered.decode_error(asyncssh.DisconnectError(11, brokered.encode_error(cls("x"))))
        assert type(back) is cls and str(back) == "x"
    unknown = brokered.ERROR_PREFIX + '{"kind":"NoSuchError","message":"m"}'
    assert type(brokered.decode_error(asyncssh.DisconnectError(11, unknown))) is SSHPykError
    assert brokered.decode_error(asyncssh.DisconnectError(11, "plain reason")) is None
    assert brokered.decode_error(OSError("no reason")) is None


def test_a_login_that_needs_a_person_says_so() -> None:
    asked = LoginPromptError("authentication failed for 'box': there is no terminal")
    error = broker._needs_person(asked, "box")
    assert type(error) is SharedLoginNeedsPersonError and f"{PERSIST_ENV}=0" in str(error)
    # it travels from the broker to the client as its own class (the client falls back)
    back = brokered.decode_error(asyncssh.DisconnectError(11, brokered.encode_error(error)))
    assert type(back) is SharedLoginNeedsPersonError
    batch = BatchModeError("authentication failed for 'box': BatchMode yes forbids prompting")
    assert broker._needs_person(batch, "box") is batch  # as in-process
    refused = HostRefusedError("refused")
    assert broker._needs_person(refused, "box") is refused


# -- the switch ------------------------------------------------------------------------


def test_share_persist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PERSIST_ENV, raising=False)
    assert brokered.share_persist() == 0
    assert brokered.share_persist(30) == 30
    monkeypatch.setenv(PERSIST_ENV, " 600 ")
    assert brokered.share_persist() == 600
    assert brokered.share_persist(0) == 600  # the environment overrides the kernelspec
    monkeypatch.setenv(PERSIST_ENV, "0")
    assert brokered.share_persist(600) == 0
    monkeypatch.setenv(PERSIST_ENV, " 600 ")
    for bad in ("ten", "-1", "inf", "nan"):
        monkeypatch.setenv(PERSIST_ENV, bad)
        with pytest.raises(SSHConfigError, match="not a number of seconds") as info:
            brokered.share_persist()
        assert "\n" not in str(info.value)


async def test_the_pool_takes_the_largest_persist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PERSIST_ENV, raising=False)
    plain = pool.acquire("box", None)
    assert plain.persist == 0 and not plain.brokered
    shared = pool.acquire("box", None, persist=120)
    assert shared is plain and shared.brokered and shared.persist == 120
    pool.acquire("box", None, persist=30)
    assert shared.persist == 120
    monkeypatch.setenv(PERSIST_ENV, "5")
    other = pool.acquire("other", None)
    assert other.persist == 5
    await pool.close_all(1)


# -- the broker's files ----------------------------------------------------------------


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A temp dir with a path short enough for unix sockets; the broker in its ``b``
    is stopped at the end."""
    with temp_broker_dir() as path:
        yield path


def test_broker_dir_is_private_and_refused_when_planted(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(BROKER_DIR_ENV, str(short_dir))
    made = broker_dir(brokered.PROTOCOL)
    assert made == short_dir and (made.stat().st_mode & 0o777) == 0o700
    made.chmod(0o755)
    with pytest.raises(UnsafePathError, match="chmod 700"):
        broker_dir(brokered.PROTOCOL)
    monkeypatch.setenv(BROKER_DIR_ENV, "/tmp/" + "x" * 100)
    with pytest.raises(UnsafePathError, match="too long"):
        broker_dir(brokered.PROTOCOL)
    monkeypatch.delenv(BROKER_DIR_ENV)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(short_dir.parent))
    short_dir.parent.chmod(0o700)
    assert broker_dir(7).name == f"sshpyk-broker-{os.getuid()}-v7"


def test_private_files_and_sockets(tmp_path: Path) -> None:
    data = tmp_path / "data.json"
    write_private_json(data, {"key": "k"})
    assert read_private_json(data) == {"key": "k"}
    link = tmp_path / "link.json"
    link.symlink_to(data)
    with pytest.raises(UnsafePathError):
        read_private_json(link)
    with pytest.raises(UnsafePathError):
        os.close(open_private_file(link))
    data.chmod(0o620)
    with pytest.raises(UnsafePathError, match="writable by others"):
        read_private_json(data)
    with pytest.raises(UnsafePathError, match="not a unix socket"):
        check_own_socket(data)
    with pytest.raises(FileNotFoundError):
        check_own_socket(tmp_path / "missing")
    with socket.socket(socket.AF_UNIX) as listener:
        path = Path("/tmp") / f"sshpyk-ut-{os.getpid()}.sock"
        listener.bind(str(path))
        try:
            assert check_own_socket(path) == path
        finally:
            path.unlink()
    one, two = socket.socketpair()
    with one, two:
        assert peer_credentials(one) == (os.getpid(), os.getuid())


def test_start_is_single_flight_and_the_broker_cleans_up(short_dir: Path) -> None:
    paths = BrokerPaths(short_dir)
    short_dir.mkdir(mode=0o700)
    pids: list[int | None] = []
    failures: list[BaseException] = []

    def start() -> None:
        try:
            sock = brokered.open_broker_socket(paths, deadline=1e18)
            with sock:
                creds = peer_credentials(sock)
                pids.append(creds[0] if creds else None)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert failures == [] and len(pids) == 4
    assert len(set(pids)) == 1 and pids[0] == broker_pid(short_dir)
    assert (paths.hostkey.stat().st_mode & 0o777) == 0o600
    assert (paths.log.stat().st_mode & 0o777) == 0o600
    pid = pids[0]
    assert pid is not None
    stop_broker(short_dir)
    assert wait_until(lambda: not pid_alive(pid), 10)
    assert not paths.socket.exists() and not broker_alive(short_dir)


def test_a_stale_socket_is_replaced(short_dir: Path) -> None:
    paths = BrokerPaths(short_dir)
    short_dir.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX) as dead:  # a broker that died: the file stays
        dead.bind(str(paths.socket))
    with brokered.open_broker_socket(paths, deadline=1e18) as sock:
        creds = peer_credentials(sock)
        assert creds is not None and creds[0] == broker_pid(short_dir)


# -- the relay, against an asyncssh host -----------------------------------------------


class _Host(asyncssh.SSHServer):
    connections: list[asyncssh.SSHServerConnection] = []

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.connections.append(conn)

    def unix_connection_requested(self, dest_path: str) -> Any:
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "no streams")


async def _serve(process: asyncssh.SSHServerProcess[str]) -> None:
    command = process.command or ""
    if command == "status":
        process.stdout.write("out")
        process.stderr.write("err")
        process.exit(3)
    elif command == "cat":
        process.stdout.write(await process.stdin.read())
        process.exit(0)
    elif command == "signal":
        process.stdout.write("ready\n")
        try:
            await process.stdin.read()
        except asyncssh.SignalReceived as exc:
            process.stdout.write(f"got {exc.signal}\n")
            process.exit(5)
    elif command == "exit-signal":
        process.exit_with_signal("TERM", False, "bye")
    elif command == "hang":
        process.stdout.write("ready\n")
        await asyncio.sleep(60)


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[Path]:
    """An asyncssh server as the host, and an ssh config naming it ``up``."""
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key.write_private_key(tmp_path / "id")
    _Host.connections = []
    server = await asyncssh.listen(
        "127.0.0.1",
        0,
        server_host_keys=[host_key],
        authorized_client_keys=asyncssh.import_authorized_keys(
            client_key.export_public_key().decode()
        ),
        server_factory=_Host,
        process_factory=_serve,
    )
    port = server.sockets[0].getsockname()[1]
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {host_key.export_public_key().decode()}")
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host up\n  HostName 127.0.0.1\n  Port {port}\n  User me\n  IdentityFile "
        f"{tmp_path / 'id'}\n  UserKnownHostsFile {known}\n"
    )
    try:
        yield config
    finally:
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def through_broker(
    config: Path, path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Session]:
    monkeypatch.setenv(BROKER_DIR_ENV, str(path))
    monkeypatch.setenv(PERSIST_ENV, "1")
    session = await Session.connect("up", ssh_config=config, connect_timeout=20)
    try:
        assert session.shared.brokered
        yield session
    finally:
        await session.aclose(5)


async def test_exec_relay(host: Path, short_dir: Path, monkeypatch) -> None:
    async with through_broker(host, short_dir, monkeypatch) as session:
        conn = await session.connection()
        result = await conn.run("status", check=False)
        assert (result.exit_status, result.stdout, result.stderr) == (3, "out", "err")
        data = "x" * (1 << 20)
        result = await conn.run("cat", input=data, check=False)  # stdin before the upstream
        assert (result.exit_status, result.stdout) == (0, data)
        result = await conn.run("exit-signal", check=False)
        assert result.exit_signal == ("TERM", False, "bye", "en-US")
        process = await conn.create_process("signal")
        assert await asyncio.wait_for(process.stdout.readline(), 10) == "ready\n"
        process.send_signal("USR1")
        assert await asyncio.wait_for(process.stdout.read(), 10) == "got USR1\n"
        await asyncio.wait_for(process.wait_closed(), 10)
        assert process.exit_status == 5


async def test_a_refused_channel_keeps_its_code(host: Path, short_dir: Path, monkeypatch) -> None:
    async with through_broker(host, short_dir, monkeypatch) as session:
        conn = await session.connection()
        with pytest.raises(asyncssh.ChannelOpenError) as info:
            await conn.open_unix_connection("/any.sock")
        assert info.value.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
        assert info.value.reason == "no streams"


async def test_a_dropped_upstream_drops_its_clients(
    host: Path, short_dir: Path, monkeypatch
) -> None:
    async with through_broker(host, short_dir, monkeypatch) as session:
        conn = await session.connection()
        process = await conn.create_process("hang")
        assert await asyncio.wait_for(process.stdout.readline(), 10) == "ready\n"
        for upstream in _Host.connections:
            upstream.abort()
        await asyncio.wait_for(process.wait_closed(), 10)
        assert (process.exit_status, process.exit_signal) == (None, None)  # a dropped link
        await asyncio.wait_for(conn.wait_closed(), 10)
        result = await asyncio.wait_for(session.run("status"), 20)  # reconnects
        assert result.exit_status == 3

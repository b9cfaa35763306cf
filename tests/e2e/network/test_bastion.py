"""Bastions: ProxyJump one hop and two, host keys on every hop, one connection per bastion.

Real OpenSSH sshds in network namespaces (tests/support/netns.py): the internal hosts are
reachable only through the bastion. Needs root; skipped with the reason elsewhere.
The JumpTarget parsing tests at the top run everywhere.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import sshpyk
from sshpyk import SSHSession
from sshpyk.kernelspec import SSHKernelSpec, write_spec
from sshpyk.ssh import jump
from sshpyk.ssh.hosts import JumpTarget

from support.errors import connect_error
from support.kernels import run_cell, start_manager, stop_manager
from support.netns import Topology, unavailable_reason
from support.waiting import leftovers, wait_until

pytestmark = pytest.mark.timeout(180)


# -- hop syntax (no namespaces needed) ------------------------------------------------------


@pytest.mark.parametrize(
    ("alias", "host", "username", "port", "via"),
    [
        ("gpubox", "gpubox", None, None, None),
        ("alice@bastion", "bastion", "alice", None, None),
        ("bastion:2222", "bastion", None, 2222, None),
        ("alice@10.0.0.1:22", "10.0.0.1", "alice", 22, None),
        ("[fe80::1]:2200", "fe80::1", None, 2200, None),
        ("fe80::1", "fe80::1", None, None, None),
        ("a,b", "b", None, None, "a"),
        ("a, b ,me@c:2", "c", "me", 2, "a, b"),
    ],
)
def test_jump_target_parse(alias, host, username, port, via) -> None:
    target = JumpTarget.parse(alias)
    assert (target.host, target.username, target.port, target.via) == (host, username, port, via)
    assert target.options["host"] == host


@pytest.mark.parametrize("alias", ["bastion:ssh", "bastion:0", "a,,b", ",b", "a,", "@bastion"])
def test_jump_target_rejects(alias) -> None:
    with pytest.raises(sshpyk.SSHConfigError) as info:
        JumpTarget.parse(alias)
    assert alias in str(info.value) and "\n" not in str(info.value)


# -- the topology ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def topo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"bastion tests need network namespaces: {reason}")
    topology = Topology(tmp_path_factory.mktemp("netns")).start()
    try:
        yield topology
    finally:
        topology.stop()


@pytest.fixture(autouse=True)
def nudge_on() -> Iterator[None]:
    """Every test starts with the stall fix on (one test turns it off)."""
    jump.NUDGE_BASTIONS = True
    yield
    jump.NUDGE_BASTIONS = True


async def bastion_connect_error(alias: str, config: Path) -> BaseException:
    """connect_error with room for the hops: a 20 s connect timeout, an answer within 10 s."""
    return await connect_error(alias, config, connect_timeout=20, within=10)


async def ssh_connection(alias: str, config: Path) -> list[str]:
    """SSH_CONNECTION as the host behind ``alias`` sees it: client addr, port, server addr, port."""
    async with await SSHSession.connect(alias, ssh_config=config) as session:
        result = await session.run("echo $SSH_CONNECTION")
    assert result.exit_status == 0, result.stderr
    return result.stdout.split()


def write_kernelspec(topo: Topology, name: str, alias: str, run_root: Path) -> None:
    write_spec(
        SSHKernelSpec(
            name=name,
            ssh_host_alias=alias,
            ssh_config=str(topo.ssh_config),
            remote_python=sys.executable,
            display_name=f"Test ({alias})",
            start_timeout=90.0,
            remote_run_root=str(run_root),
        ),
        replace=True,
    )


def registry_aliases() -> set[str]:
    """Aliases with a live shared connection on the provisioner's SSH loop."""
    from sshpyk.loop import SSHLoop
    from sshpyk.ssh.pool import _registries

    registry = _registries.get(SSHLoop.instance().loop, {})
    return {alias for alias, _config in list(registry)}


# -- reachability and routing ------------------------------------------------------------------


def test_internal_hosts_only_reachable_through_the_bastion(topo: Topology) -> None:
    bastion = topo.host("bastion").address
    with socket.create_connection((bastion, 22), timeout=5) as sock:
        assert sock.recv(4) == b"SSH-"
    for name in ("internal", "bastion2", "deep"):
        route = subprocess.run(
            ["ip", "route", "get", topo.host(name).address], capture_output=True, text=True
        )
        assert route.returncode != 0 or "unreachable" in route.stdout, route.stdout
        with pytest.raises(OSError):  # no route: refused locally, nothing is sent
            socket.create_connection((topo.host(name).address, 22), timeout=2).close()


# -- ProxyJump: one hop, two hops, hop syntax --------------------------------------------------


async def test_one_hop(topo: Topology) -> None:
    client, _, server, port = await ssh_connection("spk-internal", topo.ssh_config)
    assert (client, server, port) == (topo.addr(5), topo.addr(6), "22")  # came from the bastion


@pytest.mark.parametrize("alias", ["spk-deep", "spk-deep-nested"])
async def test_two_hops(topo: Topology, alias: str) -> None:
    """``ProxyJump a,b`` and a bastion that has a ProxyJump of its own."""
    client, _, server, _ = await ssh_connection(alias, topo.ssh_config)
    assert (client, server) == (topo.addr(13), topo.addr(14))  # came from bastion2


async def test_hop_with_user_and_port(topo: Topology, caplog) -> None:
    """``ProxyJump spk-bastion,root@ADDR:2200``: user and port from the hop, key from Match.

    Port 2200 of bastion2 is jump-only (``MaxSessions 0``): the nudge is refused,
    which costs a warning, not the connection.
    """
    caplog.set_level(logging.WARNING, "sshpyk")
    async with await SSHSession.connect("spk-deep-userport", ssh_config=topo.ssh_config) as s:
        result = await s.run("echo $SSH_CONNECTION")
        assert result.stdout.split()[0] == topo.addr(13)
        assert len(topo.established("bastion2", 2200)) == 1
        assert topo.established("bastion2", 22) == []
    assert wait_until(lambda: topo.established("bastion2", 2200) == [], 10)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("bastion refused a session" in w and "stall" in w for w in warnings), warnings


async def test_proxyjump_loop_is_an_error(topo: Topology) -> None:
    exc = await bastion_connect_error("spk-loop-a", topo.ssh_config)
    assert isinstance(exc, sshpyk.SSHConfigError)
    assert "ProxyJump loop" in str(exc) and "spk-loop-a -> spk-loop-b -> spk-loop-a" in str(exc)


# -- the ssh config: Include, Match, and lines asyncssh cannot parse --------------------------


def config_without_keys(topo: Topology, tmp_path: Path) -> Path:
    """The generated config, but its Include only brings in the Host blocks, not the Match."""
    config = tmp_path / "ssh_config_nokeys"
    text = topo.ssh_config.read_text()
    assert f"Include {topo.conf_dir}/*.conf" in text
    config.write_text(text.replace("*.conf", "hosts.conf"))
    return config


async def test_include_and_match_pick_the_keys(topo: Topology, tmp_path: Path) -> None:
    # With the Match blocks: every hop logs in (each sshd accepts one key only).
    assert (await ssh_connection("spk-deep", topo.ssh_config))[2] == topo.addr(14)
    # Without them: no key for the bastion, and the error says it was the bastion.
    exc = await bastion_connect_error("spk-internal", config_without_keys(topo, tmp_path))
    assert isinstance(exc, sshpyk.AuthenticationError)
    assert "through bastion 'spk-bastion'" in str(exc)


def broken_config(topo: Topology, tmp_path: Path, lines: list[str], bad: int) -> tuple[Path, int]:
    """A config that Includes a file made of ``lines``: (that file, line number of ``bad``)."""
    broken = tmp_path / "conf.d" / "broken.conf"
    broken.parent.mkdir()
    broken.write_text("# a broken file\n\n" + "".join(line + "\n" for line in lines))
    (tmp_path / "ssh_config").write_text(f"Include {broken}\nInclude {topo.ssh_config}\n")
    return broken, 3 + bad


@pytest.mark.parametrize(
    ("alias", "lines", "bad", "reason"),
    [
        # a line of the target's own block
        ("spk-internal", ["Host spk-internal", "  Port twenty-two"], 1, "Invalid Port"),
        # a line only the bastion's block reads: it fails while connecting the bastion
        ("spk-internal", ["Host spk-bastion", "  Compression maybe"], 1, "Invalid Compression"),
        # a Match condition asyncssh does not know
        ("spk-deep", ["Host x", "", "Match sunshine yes", "  Port 2"], 2, "Invalid match"),
        # an unbalanced quote
        ("spk-internal", ["Host spk-internal", '  User "root'], 1, "No closing quotation"),
    ],
)
async def test_unparsable_config_line(topo, tmp_path, alias, lines, bad, reason) -> None:
    broken, line = broken_config(topo, tmp_path, lines, bad)
    exc = await bastion_connect_error(alias, tmp_path / "ssh_config")
    assert isinstance(exc, sshpyk.SSHConfigError)
    text = str(exc)
    assert f"{broken} line {line}" in text and reason in text, text
    if "spk-bastion" in lines[0]:
        assert "through bastion 'spk-bastion'" in text, text


# -- host keys on every hop --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alias", "bad_host", "through"),
    [
        # the first bastion's key changed
        ("spk-internal-badbastion", "spk-bastion-badkey", "spk-bastion-badkey"),
        # the second bastion's (a hop of ``ProxyJump spk-bastion,spk-bastion2-badkey``)
        ("spk-deep-badmiddle", "spk-bastion2-badkey", "spk-bastion,spk-bastion2-badkey"),
        # the target's, behind a good bastion
        ("spk-internal-badkey", "spk-internal-badkey", None),
    ],
)
async def test_changed_host_key_on_any_hop(topo, alias, bad_host, through) -> None:
    exc = await bastion_connect_error(alias, topo.ssh_config)
    assert isinstance(exc, sshpyk.HostKeyError)
    text = str(exc)
    assert f"host key of {bad_host!r}" in text, text  # which host
    assert f"against {topo.known_hosts_changed} " in text, text  # which file
    if through:
        assert f"through bastion {through!r}" in text, text
        assert topo.established("internal") == [] and topo.established("deep") == []
    # nothing stays open: the good bastion's connection went with its last user
    assert wait_until(lambda: topo.established("bastion") == [], 10)


# -- kernels behind bastions, one connection per bastion -------------------------------------


@pytest.mark.slow
async def test_kernels_share_one_connection_per_bastion(topo: Topology, run_root: Path) -> None:
    """Five kernels on four aliases behind two bastions: one TCP connection to each bastion.

    spk-internal (2 kernels) and spk-internal-again sit behind spk-bastion; spk-deep
    (``ProxyJump spk-bastion,spk-bastion2``) and spk-deep-nested (``ProxyJump
    spk-bastion2``, itself behind spk-bastion) behind both.
    """
    kernels = [
        ("k_in1", "spk-internal"),
        ("k_in2", "spk-internal"),
        ("k_again", "spk-internal-again"),
        ("k_deep", "spk-deep"),
        ("k_nested", "spk-deep-nested"),
    ]
    for name, alias in kernels:
        write_kernelspec(topo, name, alias, run_root)
    started = await asyncio.gather(*(start_manager(name) for name, _ in kernels))
    try:
        seen = {}
        for (name, _alias), (_km, kc) in zip(kernels, started, strict=True):
            content, out = await run_cell(
                kc, "import os; print(os.environ['SSH_CONNECTION'], os.getpid())"
            )
            assert content["status"] == "ok", content
            seen[name] = out.split()
        # each kernel runs on the host behind the bastions, reached from the last bastion
        for name in ("k_in1", "k_in2", "k_again"):
            assert seen[name][0] == topo.addr(5) and seen[name][2] == topo.addr(6)
        for name in ("k_deep", "k_nested"):
            assert seen[name][0] == topo.addr(13) and seen[name][2] == topo.addr(14)
        assert seen["k_in1"][1] == seen["k_in2"][1]  # same SSH connection to spk-internal
        assert seen["k_in1"][1] != seen["k_again"][1]  # another alias, another connection
        # one connection into each bastion, whatever sits behind it
        bastion_peers, bastion2_peers = topo.established("bastion"), topo.established("bastion2")
        assert len(bastion_peers) == 1 and bastion_peers[0].startswith(f"{topo.addr(1)}:")
        assert len(bastion2_peers) == 1 and bastion2_peers[0].startswith(f"{topo.addr(9)}:")
        assert len(topo.established("internal")) == 2
        assert len(topo.established("deep")) == 2
        assert "spk-bastion2" in registry_aliases()  # "spk-bastion,spk-bastion2" shortened
        assert "spk-bastion,spk-bastion2" not in registry_aliases()
    finally:
        await asyncio.gather(*(stop_manager(km, kc) for km, kc in started))
    # the last kernel gone: every connection closes, bastions included
    assert wait_until(lambda: topo.established("bastion") == [], 15)
    assert wait_until(lambda: not registry_aliases() & {"spk-bastion", "spk-bastion2"}, 5)
    assert wait_until(lambda: leftovers(run_root) == ([], []), 10), leftovers(run_root)


@pytest.mark.slow
@pytest.mark.parametrize("alias", ["spk-internal", "spk-deep"])
async def test_kernel_through_bastions(topo: Topology, run_root: Path, alias: str) -> None:
    write_kernelspec(topo, "k_hops", alias, run_root)
    km, kc = await start_manager("k_hops")
    try:
        content, out = await run_cell(kc, "import os; print(os.environ['SSH_CONNECTION'])")
        assert content["status"] == "ok"
        assert out.split()[2] == topo.host(alias.removeprefix("spk-")).address
        await km.restart_kernel()
        await kc.wait_for_ready(timeout=60)
        content, out = await run_cell(kc, "print(6 * 7)")
        assert out.strip() == "42"
    finally:
        await stop_manager(km, kc)
    assert wait_until(lambda: leftovers(run_root) == ([], []), 10), leftovers(run_root)


# -- the stall ---------------------------------------------------------------------------------

SPLIT_SERVER = r"""
import socket, sys, time
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(1)
print(server.getsockname()[1], flush=True)
conn, _ = server.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while conn.recv(1):
    conn.sendall(b"a" * 64)   # like a kernel: status "busy" on IOPub ...
    time.sleep(0.005)
    conn.sendall(b"b" * 64)   # ... then the reply on shell, a moment later
"""


async def split_reply_rtts(topo: Topology, alias: str, rounds: int) -> list[float]:
    """Round trips to a server on the internal host that answers in two writes 5 ms apart."""
    server = subprocess.Popen(
        ["ip", "netns", "exec", topo.host("internal").netns, sys.executable, "-c", SPLIT_SERVER],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        async with await SSHSession.connect(alias, ssh_config=topo.ssh_config) as session:
            await session.run("true")  # as the agent does: the internal sshd marks its socket
            conn = await session.connection()
            reader, writer = await conn.open_connection("127.0.0.1", port)
            rtts = []
            for _ in range(rounds):
                started = time.perf_counter()
                writer.write(b"?")
                await asyncio.wait_for(reader.readexactly(128), 5)
                rtts.append((time.perf_counter() - started) * 1000)
            writer.close()
        return rtts
    finally:
        server.kill()
        server.wait(5)
        if server.stdout is not None:
            server.stdout.close()


@pytest.mark.slow
async def test_no_delayed_ack_stall_through_the_bastion(topo: Topology) -> None:
    """Without the nudge the bastion's sshd leaves Nagle on: ~40 ms per split reply."""
    jump.NUDGE_BASTIONS = False
    unfixed = statistics.median(await split_reply_rtts(topo, "spk-internal", 20))
    jump.NUDGE_BASTIONS = True
    fixed = statistics.median(await split_reply_rtts(topo, "spk-internal", 20))
    # the setup reproduces the stall (else this test proves nothing) ...
    assert unfixed > 30, f"no stall without the nudge ({unfixed:.1f} ms): is sshd patched?"
    # ... and the nudge removes it
    assert fixed < 25, f"{fixed:.1f} ms with the nudge (without: {unfixed:.1f} ms)"

"""The agent's web-port scan (sshpyk/agent/remote/ports.py) on this host's real /proc:
which listeners are a kernel's (descendants, detached ones by SSHPYK_RUN_DIR), which
are not (other processes, the kernel's own ZMQ sockets), and /proc/net/tcp parsing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from sshpyk.agent.remote import ports

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/net/tcp"), reason="the port scan reads Linux's /proc/net/tcp"
)

#: listens on argv[1] (host) port 0, prints the port, then waits; argv[2] "detach":
#: a grandchild in a session of its own does it (the child exits at once)
SERVER = r"""
import os, socket, sys, time
host, how = sys.argv[1], sys.argv[2]
if how == "detach":
    r, w = os.pipe()
    if os.fork():
        os.close(w); print(os.read(r, 32).decode(), flush=True); os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    out = lambda text: os.write(w, text.encode())
else:
    out = lambda text: print(text, flush=True)
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
s.bind((host, 0)); s.listen(4)
out("%d %d" % (s.getsockname()[1], os.getpid()))
time.sleep(60)
"""


@pytest.fixture
def spawned() -> Iterator[list[int]]:
    """Pids of the servers a test starts: killed (and our children reaped) at the end."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    for proc in _children:
        proc.wait(5)
    _children.clear()


_children: list[subprocess.Popen[str]] = []


def serve(spawned: list[int], host: str, how: str, env: dict[str, str]) -> int:
    """A server on ``host`` (a child of this process, or with ``how`` "detach" a
    re-parented grandchild in a session of its own); its port."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, host, how],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    assert proc.stdout is not None
    port, pid = (int(x) for x in proc.stdout.readline().split())
    proc.stdout.close()
    spawned.append(pid)
    _children.append(proc)
    return port


def scan_until(scanner: ports.PortScanner, kernels, want, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    found = scanner.scan(kernels)
    while time.monotonic() < deadline and not want(found):  # bounded in time
        time.sleep(0.1)
        found = scanner.scan(kernels)
    return found


def test_address_parsing() -> None:
    assert ports._address("0100007F") == ("127.0.0.1", 4)
    assert ports._address("00000000") == ("127.0.0.1", 4)
    assert ports._address("0200007F") == ("127.0.0.2", 4)
    assert ports._address("0A00020F") is None  # 15.2.0.10: one interface's address
    assert ports._address("0" * 32) == ("::1", 6)
    assert ports._address("00000000000000000000000001000000") == ("::1", 6)
    assert ports._address("0000000000000000FFFF00000100007F") == ("127.0.0.1", 4)
    assert ports._address("B80D0120000000000000000001000000") is None  # 2001:db8::1
    assert ports._address("zz") is None


def test_listening_reads_only_our_listen_lines(tmp_path: Path) -> None:
    table = tmp_path / "tcp"
    table.write_text(
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt"
        "   uid  timeout inode\n"
        "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000"
        "  1000        0 111 1 0000000000000000 100 0 0 10 0\n"
        "   1: 00000000:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000"
        "  1001        0 222 1 0000000000000000 100 0 0 10 0\n"
        "   2: 0100007F:1F92 0100007F:9999 01 00000000:00000000 00:00000000 00000000"
        "  1000        0 333 1 0000000000000000 100 0 0 10 0\n"
        "   3: 0A00020F:1F93 00000000:0000 0A 00000000:00000000 00:00000000 00000000"
        "  1000        0 444 1 0000000000000000 100 0 0 10 0\n"
        "   4: 00000000:1F94 00000000:0000 0A 00000000:00000000 00:00000000 00000000"
        "  1000        0 555 1 0000000000000000 100 0 0 10 0\n"
    )
    found = ports.listening(1000, [str(table)])
    # another uid's (222), an established connection (333) and one interface's (444): no
    assert found == {111: (8080, "127.0.0.1", 4), 555: (8084, "127.0.0.1", 4)}


def test_a_kernels_listeners_are_found_and_others_are_not(
    spawned: list[int], tmp_path: Path
) -> None:
    """This process plays the kernel: its child's listener is its; a re-parented
    grandchild with its SSHPYK_RUN_DIR too; one with another run dir is not."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    child_port = serve(spawned, "127.0.0.1", "stay", {})
    detached_port = serve(spawned, "::", "detach", {"SSHPYK_RUN_DIR": str(run_dir)})
    stranger_port = serve(spawned, "127.0.0.1", "detach", {"SSHPYK_RUN_DIR": str(other)})
    kernels = {"k": (os.getpid(), str(run_dir), set())}
    found = scan_until(
        ports.PortScanner(),
        kernels,
        lambda f: {child_port, detached_port} <= {e["port"] for e in f["k"]},
    )
    got = {e["port"]: e["host"] for e in found["k"]}
    assert got.get(child_port) == "127.0.0.1"  # a descendant of the watched pid
    assert got.get(detached_port) == "::1"  # re-parented, found by SSHPYK_RUN_DIR
    assert stranger_port not in got
    # the kernel's own ports are never a web app
    own = {"k": (os.getpid(), str(run_dir), {child_port})}
    assert child_port not in {e["port"] for e in ports.PortScanner().scan(own)["k"]}
    # a listener that closes is gone from the next scan
    scanner = ports.PortScanner()
    assert child_port in {e["port"] for e in scanner.scan(kernels)["k"]}
    os.kill(spawned[0], 9)
    found = scan_until(scanner, kernels, lambda f: child_port not in {e["port"] for e in f["k"]})
    assert child_port not in {e["port"] for e in found["k"]}


def test_zmq_sockets_are_told_apart_from_web_servers(spawned: list[int]) -> None:
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    try:
        zmq_port = pull.bind_to_random_port("tcp://127.0.0.1")
        web_port = serve(spawned, "127.0.0.1", "stay", {})
        started = time.monotonic()
        assert ports.speaks_zmtp("127.0.0.1", zmq_port) is True
        assert time.monotonic() - started < ports.ZMTP_PROBE  # ZMQ greets at once
        assert ports.speaks_zmtp("127.0.0.1", web_port) is False
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            closed_port = free.getsockname()[1]
        assert ports.speaks_zmtp("127.0.0.1", closed_port) is False
        scanner = ports.PortScanner()
        found = scan_until(
            scanner,
            {"k": (os.getpid(), "", set())},
            lambda f: web_port in {e["port"] for e in f["k"]},
        )
        found_ports = {e["port"] for e in found["k"]}
        assert web_port in found_ports and zmq_port not in found_ports
    finally:
        pull.close(0)
        context.term()


def test_netlink_and_proc_agree(spawned: list[int]) -> None:
    """The scan reads the LISTEN sockets by NETLINK_SOCK_DIAG (cheap), /proc/net/tcp{,6}
    where it cannot: both see the same listeners, with the same port and address."""
    try:
        by_netlink = ports._netlink_listening(os.getuid())
    except OSError as exc:
        pytest.skip(f"no NETLINK_SOCK_DIAG here: {exc}")
    port = serve(spawned, "127.0.0.1", "stay", {})
    by_netlink = ports._netlink_listening(os.getuid())
    by_proc = ports._proc_listening(os.getuid(), ports.PROC_NET)
    ours = [entry for entry in by_netlink.values() if entry[0] == port]
    assert ours == [(port, "127.0.0.1", 4)]
    # listeners come and go on a busy machine between the two reads: compare ours
    assert {i: e for i, e in by_netlink.items() if e[0] == port} == {
        i: e for i, e in by_proc.items() if e[0] == port
    }


def test_a_listener_stays_with_the_kernel_process_that_had_it(
    spawned: list[int], tmp_path: Path
) -> None:
    """Attribution is once per listener and per key (the agent keys by kernel process):
    after a restart, a server the previous process left running is not the new one's."""
    port = serve(spawned, "127.0.0.1", "stay", {})
    scanner = ports.PortScanner()
    before = object()  # the kernel process before the restart
    found = scan_until(
        scanner,
        {before: (os.getpid(), str(tmp_path), set())},
        lambda f: port in {e["port"] for e in f[before]},
    )
    assert port in {e["port"] for e in found[before]}
    after = object()  # the restarted kernel: same pid here, a new process in the agent
    assert scanner.scan({after: (os.getpid(), str(tmp_path), set())}) == {after: []}

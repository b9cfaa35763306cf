"""Web apps a remote kernel starts open here at the URL they print (issue 21).

The remote is a real OpenSSH sshd in a network namespace of its own
(:class:`support.netns.IsolatedHost`): its loopback is not ours, so a server the kernel
binds on ``127.0.0.1:P`` there is reachable here on ``127.0.0.1:P`` only through
sshpyk's forward, and "the same local port" is really tested. Processes, users and
files are this machine's (the remote Python is the tests' one; we are root).

Proves, through the provisioner (AsyncKernelManager) unless said otherwise:

- ``python -m http.server`` started from a cell on 127.0.0.1, on 0.0.0.0 (detached:
  ``start_new_session=True``) and on ::1, a server in a thread of the kernel itself,
  and a Bokeh server app (``bokeh serve``) are served here on the same port within
  10 s of the print, loopback only; headless chromium loads each at the URL the
  kernel printed and sees the page (Bokeh: the document its JavaScript pulled over
  the app's websocket, and a server callback's answer to the browser's
  DocumentReady event, i.e. the websocket went both ways through the forward);
- a local port that is taken gets a free one, the log says so, and ``kernel.web``,
  ``sshpyk ports --json`` and ``sshpyk ps --json`` show remote -> local;
- the app's exit closes the local port;
- listeners of another unix user (even one that carries the kernel's SSHPYK_RUN_DIR)
  and of a process of ours that is not the kernel's are not forwarded, nor the kernel's
  ZMQ sockets or its servers bound to the remote's network interface;
- a detached grandchild of the kernel (double fork + setsid, re-parented) is;
- the argv launcher (``python -m sshpyk.launch``, as VS Code starts it) forwards too;
- explicit forwards (``--forward PORT`` and ``LOCAL:HOST:PORT``) reach servers the kernel
  did not start, and ``--no-auto-forward`` turns detection off;
- the kernel's shutdown closes its forwards, also that of a detached server that
  outlives it.

Needs root, ``ip`` and sshd (skipped with the reason otherwise); the browser test also
Debian's chromium, Playwright and Bokeh (the ``clients`` extra).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sshpyk.kernels.kernel import RemoteKernel
from sshpyk.kernelspec import SSHKernelSpec, write_spec

from e2e.clients.test_clients_browser import CHROMIUM, CHROMIUM_ARGS
from support.kernels import run_cell, start_manager, stop_manager
from support.netns import IsolatedHost, unavailable_reason
from support.raw_client import RawClient
from support.waiting import leftovers, pid_alive, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

KERNEL = "ssh_webports"
#: a forwarded URL must work within this many seconds of the kernel's print
WITHIN = 10.0
#: printed by http.server ("... (http://127.0.0.1:P/) ...") and Bokeh ("... at:
#: http://localhost:P/app")
URL_RE = re.compile(r"(http://(?:\[[0-9a-f:]+\]|[0-9.]+|localhost):(\d+)[^\s)]*)")
#: what these tests measured (printed at the end of the module: pytest -s shows it)
MEASURED: dict[str, float] = {}


# -- plain helpers ---------------------------------------------------------------------------


def _have_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s6:
            s6.bind(("::1", 0))
        return True
    except OSError:
        return False


#: this machine has IPv6 loopback (then the remote's namespace has it too)
HAVE_IPV6 = _have_ipv6()
LOOPBACKS = ("127.0.0.1", "::1") if HAVE_IPV6 else ("127.0.0.1",)


def free_port() -> int:
    """A port free here on 127.0.0.1 (and ::1; the remote's namespace is fresh: free there)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not HAVE_IPV6:
            return port
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET6) as s6:
            s6.bind(("::1", port))
            return port
    raise AssertionError("no port free on both 127.0.0.1 and ::1")


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy from env


def http_get(url: str, timeout: float = 3.0) -> tuple[int, str] | None:
    """(status, body) of a GET, or None if it failed (refused, reset, timed out)."""
    try:
        with _OPENER.open(url, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except (OSError, ValueError):
        return None


def wait_serving(url: str, marker: str, since: float, within: float = WITHIN) -> float:
    """Seconds from ``since`` (a monotonic time) until a GET of ``url`` answers 200 with
    ``marker`` in the body; AssertionError if not within ``within`` seconds of ``since``."""
    last: tuple[int, str] | None = None
    while time.monotonic() - since < within:
        last = http_get(url, timeout=2.0)
        if last is not None and last[0] == 200 and marker in last[1]:
            return time.monotonic() - since
        time.sleep(0.05)
    raise AssertionError(f"{url} did not serve {marker!r} within {within:g}s: {last!r}")


def closed_here(port: int) -> bool:
    """Nothing listens on ``port`` on any loopback here."""
    return all(refused(address, port) for address in LOOPBACKS)


def refused(host: str, port: int) -> bool:
    """Nothing listens on host:port here (connect refused)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.settimeout(2.0)
        try:
            s.connect((host, port))
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
    return False


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The next line ``proc`` writes on its stdout ("" if none within ``timeout`` s)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else ""


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: state, ppid, pgrp, session, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()


def ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1 and len(chain) < 64:
        pid = int(stat_fields(pid)[1])
        chain.append(pid)
    return chain


def kill_pid(pid: int, marker: str) -> None:
    """SIGKILL ``pid`` if it is still one of ours (its command line has ``marker``)."""
    with contextlib.suppress(OSError):
        if marker in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
            os.kill(pid, signal.SIGKILL)


def cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """The sshpyk CLI as a user runs it: another process, this test's Jupyter dirs."""
    return subprocess.run(
        [sys.executable, "-m", "sshpyk.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


class LocalApp:
    """Something of ours that already listens on 127.0.0.1:``port`` (and says ``body``)."""

    def __init__(self, port: int, body: str) -> None:
        payload = body.encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


# -- the remote host and the kernel ------------------------------------------------------------


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IsolatedHost]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"the remote host in its own network namespace: {reason}")
    remote = IsolatedHost(tmp_path_factory.mktemp("netns-remote")).start()
    try:
        yield remote
    finally:
        remote.stop()
        if MEASURED:
            print(
                "\nweb ports, measured: " + ", ".join(f"{k} {v:.2f}s" for k, v in MEASURED.items())
            )


def write_kernelspec(host: IsolatedHost, run_root: Path, **fields: Any) -> str:
    write_spec(
        SSHKernelSpec(
            **{
                "name": KERNEL,
                "ssh_host_alias": host.ALIAS,
                "ssh_config": str(host.ssh_config),
                "remote_python": sys.executable,
                "display_name": "Web ports (isolated remote)",
                "start_timeout": 60.0,
                "remote_run_root": str(run_root),
                **fields,
            }
        ),
        replace=True,
    )
    return str(fields.get("name", KERNEL))


@pytest.fixture
def spec(host: IsolatedHost, run_root: Path) -> str:
    return write_kernelspec(host, run_root)


@dataclass
class Served:
    """A server a cell started: the URL it printed, its pid, when the print arrived."""

    url: str
    port: int
    pid: int
    printed_at: float
    marker: str


@dataclass
class Kernel:
    """A kernel started through the provisioner on the isolated host, and the servers its
    cells started (killed at the end, also the detached ones)."""

    km: Any
    kc: Any
    host: IsolatedHost
    tmp: Path
    pids: list[int] = field(default_factory=list)

    @property
    def remote(self) -> RemoteKernel:
        kernel = self.km.provisioner.remote_kernel
        assert kernel is not None
        return kernel

    def forwarded(self) -> dict[int, int]:
        """remote port -> local port of the automatic forwards, from ``kernel.web``."""
        return {r["remote_port"]: r["local"] for r in self.remote.web.listing() if r["auto"]}

    async def run(self, code: str, timeout: float = 60) -> str:
        content, out = await run_cell(self.kc, code, timeout=timeout)
        assert content["status"] == "ok", content
        return out

    def site(self, marker: str) -> Path:
        """A directory whose index.html shows ``marker`` in ``<h1 id="marker">``."""
        site = self.tmp / f"site-{marker}"
        site.mkdir(exist_ok=True)
        (site / "index.html").write_text(f"<title>{marker}</title><h1 id=marker>{marker}</h1>")
        return site

    async def serve(
        self, port: int, marker: str, bind: str = "127.0.0.1", detach: bool = False
    ) -> Served:
        """A cell starts ``python -m http.server PORT --bind BIND`` as a child of the
        kernel (in a session of its own if ``detach``) and prints what it printed."""
        site = str(self.site(marker))
        args = ["-u", "-m", "http.server", str(port), "--bind", bind, "--directory", site]
        return await self.start(port, marker, args, detach=detach)

    async def start(
        self,
        port: int,
        marker: str,
        args: list[str],
        ready: str = "Serving HTTP",
        detach: bool = False,
    ) -> Served:
        """A cell starts ``python ARGS`` (a server on ``port``) as a child of the kernel
        and prints its pid and its output once ``ready`` is in it."""
        log = self.tmp / f"server-{port}.log"
        code = START.format(args=args, log=str(log), name=marker, ready=ready, detach=detach)
        return self._served(await self.run(code), port, marker)

    def _served(self, out: str, port: int, marker: str, kill: bool = True) -> Served:
        """What a cell printed: the server's pid (killed at the end if ``kill``), its URL."""
        pid_match = re.search(r"^pid (\d+)$", out, re.M)
        assert pid_match, out
        pid = int(pid_match.group(1))
        if kill:
            self.pids.append(pid)
        url_match = URL_RE.search(out)
        assert url_match and int(url_match.group(2)) == port, out
        return Served(url_match.group(1), port, pid, time.monotonic(), marker)

    def kill_servers(self) -> None:
        for pid in self.pids:
            kill_pid(pid, str(self.tmp))


#: a cell: ``python ARGS`` (a server) as the kernel's child, its output in a file; prints
#: the server's pid and its output once READY is in it
START = """\
import subprocess, sys, time
_servers = globals().setdefault("_servers", {{}})
with open({log!r}, "w") as _log:
    _servers[{name!r}] = subprocess.Popen(
        [sys.executable, *{args!r}],
        stdin=subprocess.DEVNULL, stdout=_log, stderr=subprocess.STDOUT,
        start_new_session={detach},
    )
_deadline = time.monotonic() + 30
while time.monotonic() < _deadline and _servers[{name!r}].poll() is None:
    if {ready!r} in open({log!r}).read():
        break
    time.sleep(0.02)
print("pid", _servers[{name!r}].pid)
print(open({log!r}).read().strip())
"""

#: a cell: a server in a thread of the kernel process itself (as Dash's ``app.run()``
#: in a notebook, or a Dask ``Client()``'s dashboard)
IN_KERNEL = """\
import functools, os, threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
_handler = functools.partial(SimpleHTTPRequestHandler, directory={site!r})
_handler.log_message = lambda *args: None
_httpd = ThreadingHTTPServer(("127.0.0.1", {port}), _handler)
threading.Thread(target=_httpd.serve_forever, daemon=True).start()
print("pid", os.getpid())
print("serving in the kernel at http://127.0.0.1:{port}/")
"""

#: a Bokeh server app (``bokeh serve``): the page shows MARKER once Bokeh's JavaScript
#: pulled the document over the app's websocket, and "the server saw the browser" once
#: the browser's DocumentReady event reached the Python callback and its change came back
BOKEH_APP = """\
from bokeh.events import DocumentReady
from bokeh.io import curdoc
from bokeh.layouts import column
from bokeh.models import Div

echo = Div(text="waiting for the browser")


def ready(event):
    echo.text = "the server saw the browser"


doc = curdoc()
doc.on_event(DocumentReady, ready)
doc.add_root(column(Div(text={marker!r}), echo))
"""


@pytest.fixture
async def kernel(
    spec: str, host: IsolatedHost, tmp_path: Path, run_root: Path
) -> AsyncIterator[Kernel]:
    km, kc = await start_manager(spec)
    session = Kernel(km, kc, host, tmp_path)
    try:
        yield session
    finally:
        try:
            await stop_manager(km, kc)
        finally:
            session.kill_servers()
        assert wait_until(lambda: leftovers(run_root) == ([], []), 15), leftovers(run_root)


def assert_loopback_only(host: IsolatedHost, port: int) -> None:
    """The local forward does not listen on our veth address (nor any other)."""
    assert refused(host.addr(1), port), f"port {port} is open on {host.addr(1)}"


# -- 1. http.server on 127.0.0.1, 0.0.0.0 (detached), ::1, in the kernel, Bokeh: chromium ---


@pytest.fixture
def browser_ready() -> None:
    """Chromium, Playwright and Bokeh are here (checked before the kernel starts)."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium; scripts/setup does it)")
    for module in ("playwright.async_api", "bokeh"):
        pytest.importorskip(module, reason=f"{module} is missing (pip install -e '.[clients]')")


async def test_web_apps_open_in_chromium_at_the_printed_url(
    browser_ready: None, kernel: Kernel, host: IsolatedHost
) -> None:
    from playwright.async_api import async_playwright

    names = (
        ("v4", "any", "v6", "kernel", "bokeh") if HAVE_IPV6 else ("v4", "any", "kernel", "bokeh")
    )
    ports = {name: free_port() for name in names}
    served: list[Served] = []

    async def works(s: Served, marker: str = "", browse: bool = True) -> None:
        """The printed URL works here, on the same port, within WITHIN s of the print;
        chromium loads it later if ``browse``."""
        MEASURED[f"print->URL works ({s.marker})"] = await asyncio.to_thread(
            wait_serving, s.url, marker or s.marker, s.printed_at
        )
        if browse:
            served.append(s)

    await works(await kernel.serve(ports["v4"], "loopback-v4"))
    await works(await kernel.serve(ports["any"], "any-address", bind="0.0.0.0", detach=True))
    detached = served[-1].pid
    assert stat_fields(detached)[3] == str(detached)  # the leader of a session of its own
    if HAVE_IPV6:
        await works(await kernel.serve(ports["v6"], "loopback-v6", bind="::1"))
    site = kernel.site("in-the-kernel")
    out = await kernel.run(IN_KERNEL.format(port=ports["kernel"], site=str(site)))
    await works(kernel._served(out, ports["kernel"], "in-the-kernel", kill=False))
    app = kernel.tmp / "bokeh_app.py"
    app.write_text(BOKEH_APP.format(marker="bokeh-app"))
    args = ["-m", "bokeh", "serve", str(app), "--port", str(ports["bokeh"])]
    bokeh = await kernel.start(ports["bokeh"], "bokeh-app", args, ready="Bokeh app running at")
    assert bokeh.url == f"http://localhost:{ports['bokeh']}/bokeh_app", bokeh
    await works(bokeh, "<html", browse=False)  # the page has Bokeh's JS; the document: later
    # ...because of sshpyk: the remote's listeners are in its namespace, not here.
    remote_listening = await asyncio.to_thread(host.listening)
    assert set(ports.values()) <= remote_listening, remote_listening
    assert kernel.forwarded() == {p: p for p in ports.values()}, kernel.remote.web.listing()
    for port in ports.values():
        assert_loopback_only(host, port)
        if HAVE_IPV6:  # both loopbacks answer, whatever the remote server bound
            assert await asyncio.to_thread(http_get, f"http://[::1]:{port}/") is not None, port
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=[*CHROMIUM_ARGS, "--no-proxy-server"]
        )
        try:
            page = await browser.new_page()
            for s in served:
                await page.goto(s.url, timeout=20_000)
                text = await page.locator("#marker").inner_text(timeout=10_000)
                assert text == s.marker, (s.url, text)
            sockets: list[str] = []
            page.on("websocket", lambda ws: sockets.append(ws.url))
            await page.goto(bokeh.url, timeout=20_000)
            # the document came over the websocket, the callback's answer too
            await page.get_by_text("the server saw the browser").wait_for(timeout=30_000)
            assert await page.get_by_text("bokeh-app").count() == 1
            assert sockets == [f"ws://localhost:{ports['bokeh']}/bokeh_app/ws"], sockets
        finally:
            await browser.close()


# -- 2. a taken local port: a free one, the log line, the listings -----------------------------


async def test_a_taken_local_port_gets_a_free_one_and_says_so(
    kernel: Kernel, host: IsolatedHost, run_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    port = free_port()
    local = LocalApp(port, "the local app on this port")
    try:
        served = await kernel.serve(port, "remote-app")
        assert await asyncio.to_thread(wait_until, lambda: port in kernel.forwarded(), WITHIN), (
            kernel.remote.web.listing()
        )
        other = kernel.forwarded()[port]
        assert other != port
        url = f"http://127.0.0.1:{other}"
        await asyncio.to_thread(wait_serving, url, "remote-app", served.printed_at)
        # the local app keeps its port: the printed URL still reaches it, not the remote
        assert await asyncio.to_thread(http_get, served.url) == (200, "the local app on this port")
        kid = kernel.remote.kernel_id
        said = f"remote port {port} of kernel {kid} is at {url} (local port {port} is taken)"
        assert any(said in r.getMessage() for r in caplog.records), [
            r.getMessage() for r in caplog.records if "port" in r.getMessage()
        ]
        (row,) = [r for r in kernel.remote.web.listing() if r["remote_port"] == port]
        assert row == {
            "remote": f"127.0.0.1:{port}",
            "remote_port": port,
            "local": other,
            "url": url,
            "auto": True,
        }
        # `sshpyk ports --json` and `sshpyk ps --json`, from another process
        where = ["--ssh-config", str(host.ssh_config), "--run-root", str(run_root)]
        listed = await asyncio.to_thread(cli, "ports", "--json", host.ALIAS, *where)
        assert listed.returncode == 0, listed.stderr
        rows = json.loads(listed.stdout)["ports"]
        assert [(r["kernel_id"], r["remote_port"], r["local"], r["url"]) for r in rows] == [
            (kid, port, other, url)
        ], rows
        by_kernel = await asyncio.to_thread(cli, "ports", kid[:8], *where)
        assert by_kernel.returncode == 0, by_kernel.stderr
        assert url in by_kernel.stdout and f"127.0.0.1:{port}" in by_kernel.stdout, by_kernel.stdout
        ps = await asyncio.to_thread(cli, "ps", "--json", host.ALIAS, *where)
        assert ps.returncode == 0, ps.stderr
        (entry,) = json.loads(ps.stdout)["hosts"][0]["kernels"]
        assert [(f["remote_port"], f["local"]) for f in entry["forwards"]] == [(port, other)]
        table = await asyncio.to_thread(cli, "ps", host.ALIAS, *where)
        assert f"{port}->{other}" in table.stdout, table.stdout
    finally:
        local.close()


# -- 3. the app's exit closes the local port ---------------------------------------------------


async def test_the_apps_exit_closes_the_local_port(
    kernel: Kernel, host: IsolatedHost, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    port = free_port()
    served = await kernel.serve(port, "short-lived")
    await asyncio.to_thread(wait_serving, served.url, "short-lived", served.printed_at)
    await kernel.run("_servers['short-lived'].terminate(); _servers['short-lived'].wait(10)")
    stopped = time.monotonic()
    assert await asyncio.to_thread(wait_until, lambda: closed_here(port), 5), (
        kernel.remote.web.listing()
    )
    MEASURED["server exit->local port closed"] = time.monotonic() - stopped
    assert port not in kernel.forwarded()
    kid = kernel.remote.kernel_id
    said = f"remote port {port} of kernel {kid} closed; http://127.0.0.1:{port} closed"
    assert any(said in r.getMessage() for r in caplog.records)
    # a new server on the same port is forwarded again
    again = await kernel.serve(port, "back-again")
    await asyncio.to_thread(wait_serving, again.url, "back-again", again.printed_at)


# -- 4. not forwarded: other users, strangers of ours, ZMQ, interface-bound servers ---------

LISTEN = """\
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(8)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    c.settimeout(5)
    request = b""
    try:
        while b"\\r\\n\\r\\n" not in request:
            chunk = c.recv(4096)
            if not chunk:
                break
            request += chunk
        c.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: 9\\r\\n\\r\\nnot yours")
    except OSError:
        pass
    c.close()
"""


#: a cell: a ZMQ REP socket of the kernel's on 127.0.0.1:PORT
ZMQ_REP = """\
import zmq
_zmq_rep = zmq.Context.instance().socket(zmq.REP)
_zmq_rep.bind("tcp://127.0.0.1:{port}")
"""


async def test_what_is_not_forwarded(
    kernel: Kernel, host: IsolatedHost, attacker: Any, run_root: Path
) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is missing: it runs the other user's listener")
    run_dir = (await kernel.run("import os; print(os.environ['SSHPYK_RUN_DIR'])")).strip()
    assert run_dir.startswith(str(run_root)), run_dir
    theirs, stranger, zmq_port, iface, ours = (free_port() for _ in range(5))
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}
    procs = [
        # another user, who even carries the kernel's SSHPYK_RUN_DIR
        subprocess.Popen(
            host.argv(
                attacker.python, "-c", LISTEN, str(theirs), uid=attacker.uid, gid=attacker.gid
            ),
            env={**env, "SSHPYK_RUN_DIR": run_dir},
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        ),
        # a process of ours on the remote that the kernel did not start
        subprocess.Popen(
            host.argv(sys.executable, "-c", LISTEN, str(stranger)),
            env=env,
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        ),
    ]
    try:
        for proc in procs:
            assert read_line(proc, 20) == "listening\n", proc.args
        owners = {p.pid: Path(f"/proc/{p.pid}").stat().st_uid for p in procs}
        assert owners == {procs[0].pid: attacker.uid, procs[1].pid: os.getuid()}
        # the kernel's own listeners that are no web apps for us: a ZMQ socket on
        # 127.0.0.1 (it greets like ZMQ) and a server bound to the remote's network
        # interface (meant for that network)
        await kernel.run(ZMQ_REP.format(port=zmq_port))
        await kernel.serve(iface, "interface-bound", bind=host.remote.address)
        # the kernel's own web server, started last: once it is forwarded, the agent's
        # scans have seen all the others
        served = await kernel.serve(ours, "ours")
        await asyncio.to_thread(wait_serving, served.url, "ours", served.printed_at)
        others = {theirs, stranger, zmq_port, iface}
        assert others | {ours} <= await asyncio.to_thread(host.listening)
        await asyncio.sleep(2.5)  # two more scans
        assert kernel.forwarded() == {ours: ours}
        found = kernel.remote.process.web_ports  # what the agent found
        assert [p["port"] for p in found] == [ours], found
        for port in others:
            assert closed_here(port), port
        # nor does `sshpyk ports` list them as found but not forwarded (->?)
        where = ["--ssh-config", str(host.ssh_config), "--run-root", str(run_root)]
        listed = await asyncio.to_thread(cli, "ports", "--json", host.ALIAS, *where)
        assert listed.returncode == 0, listed.stderr
        assert [r["remote_port"] for r in json.loads(listed.stdout)["ports"]] == [ours]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)
            assert proc.stdout is not None
            proc.stdout.close()


# -- 5. a detached grandchild is forwarded ---------------------------------------------------

#: a cell: a child that forks a grandchild into a new session and exits, the grandchild
#: forks again (so it is no session leader either) and execs http.server
GRANDCHILD = """\
import subprocess, sys, time
_code = '''
import os, sys
if os.fork():
    os._exit(0)
os.setsid()
if os.fork():
    os._exit(0)
log = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
os.dup2(log, 1)
os.dup2(log, 2)
os.execv(sys.executable, [sys.executable, "-u", "-m", "http.server", sys.argv[1],
         "--bind", "127.0.0.1", "--directory", sys.argv[3]])
'''
subprocess.run([sys.executable, "-c", _code, "{port}", {log!r}, {site!r}], check=True, timeout=20)
_deadline = time.monotonic() + 20
while time.monotonic() < _deadline:
    try:
        if "Serving HTTP" in open({log!r}).read():
            break
    except FileNotFoundError:
        pass
    time.sleep(0.02)
import os
print(open({log!r}).read().strip())
print("kernel", os.getpid())
"""


async def test_a_detached_grandchild_is_forwarded(kernel: Kernel, host: IsolatedHost) -> None:
    port = free_port()
    log = kernel.tmp / "grandchild.log"
    out = await kernel.run(
        GRANDCHILD.format(port=port, log=str(log), site=str(kernel.site("grandchild")))
    )
    printed_at = time.monotonic()
    match = URL_RE.search(out)
    assert match and int(match.group(2)) == port, out
    kernel_pid = int(re.search(r"^kernel (\d+)$", out, re.M).group(1))  # type: ignore[union-attr]
    found = subprocess.run(
        ["pgrep", "-f", f"http.server {port} --bind"], capture_output=True, text=True, timeout=10
    ).stdout.split()
    assert len(found) == 1, found
    pid = int(found[0])
    kernel.pids.append(pid)
    # detached: re-parented away from the kernel, another session
    assert kernel_pid not in ancestors(pid), (pid, ancestors(pid))
    assert stat_fields(pid)[3] != stat_fields(kernel_pid)[3]
    MEASURED["print->URL works (grandchild)"] = await asyncio.to_thread(
        wait_serving, match.group(1), "grandchild", printed_at
    )
    assert kernel.forwarded() == {port: port}


# -- 6. the argv launcher (VS Code, Zed, Positron) ---------------------------------------------


def test_the_argv_launcher_forwards_too(spec: str, host: IsolatedHost, tmp_path: Path) -> None:
    port = free_port()
    raw = RawClient(spec, tmp_path)
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<h1>through the launcher</h1>")
    log = tmp_path / "http.log"
    pids: list[int] = []
    try:
        raw.spawn()
        args = ["-u", "-m", "http.server", str(port), "--bind", "127.0.0.1"]
        code = START.format(
            args=[*args, "--directory", str(site)],
            log=str(log),
            name="x",
            ready="Serving HTTP",
            detach=False,
        )
        content, out = raw.execute(code)
        printed_at = time.monotonic()
        assert content["status"] == "ok", content
        pids.append(int(re.search(r"^pid (\d+)$", out, re.M).group(1)))  # type: ignore[union-attr]
        match = URL_RE.search(out)
        assert match and int(match.group(2)) == port, out
        MEASURED["print->URL works (argv launcher)"] = wait_serving(
            match.group(1), "through the launcher", printed_at
        )
        assert_loopback_only(host, port)
        said = re.compile(rf"remote port {port} of kernel \S+ is at http://127\.0\.0\.1:{port}\b")
        assert wait_until(lambda: said.search(raw.log()) is not None, 5), raw.log()
    finally:
        raw.close()
        for pid in pids:
            kill_pid(pid, str(site))
    assert wait_until(lambda: refused("127.0.0.1", port), 10)
    assert not any(pid_alive(p) for p in pids)


# -- explicit forwards, --no-auto-forward, shutdown ----------------------------------------------


def start_stranger(host: IsolatedHost, port: int) -> subprocess.Popen[str]:
    """A listener of ours on the remote's 127.0.0.1:``port`` that the kernel did not start."""
    proc = subprocess.Popen(
        host.argv(sys.executable, "-c", LISTEN, str(port)),
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    if read_line(proc, 20) != "listening\n":
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"the stranger on port {port} did not listen")
    return proc


def stop_stranger(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


async def test_explicit_forwards_and_no_auto_forward(
    host: IsolatedHost, run_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    same, remote, local, app = free_port(), free_port(), free_port(), free_port()
    strangers = [start_stranger(host, same), start_stranger(host, remote)]
    name = write_kernelspec(
        host,
        run_root,
        forward=[str(same), f"{local}:localhost:{remote}"],
        auto_forward=False,
    )
    try:
        km, kc = await start_manager(name)
        kernel = Kernel(km, kc, host, tmp_path)
        try:
            # open from the start, whoever listens there
            for port in (same, local):
                body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/")
                assert body == (200, "not yours"), (port, body)
                assert_loopback_only(host, port)
            rows = kernel.remote.web.listing()
            assert [(r["remote"], r["local"], r["auto"]) for r in rows] == [
                (f"localhost:{same}", same, False),
                (f"localhost:{remote}", local, False),
            ], rows
            kid = kernel.remote.kernel_id
            for text, port in ((str(same), same), (f"{local}:localhost:{remote}", local)):
                said = f"--forward {text} of kernel {kid} is at http://127.0.0.1:{port}"
                assert said in caplog.text, caplog.text
            # the kernel's own server is not forwarded: detection is off
            served = await kernel.serve(app, "not-detected")
            assert app in await asyncio.to_thread(host.listening)
            await asyncio.sleep(2.5)  # two scans' time
            assert kernel.remote.process.web_ports == []
            assert refused("127.0.0.1", app), served
            assert kernel.forwarded() == {}
        finally:
            try:
                await stop_manager(km, kc)
            finally:
                kernel.kill_servers()
        # the kernel's end closes its explicit forwards
        assert await asyncio.to_thread(
            wait_until, lambda: refused("127.0.0.1", same) and refused("127.0.0.1", local), 5
        )
    finally:
        for proc in strangers:
            stop_stranger(proc)


async def test_shutdown_closes_the_forward_of_a_server_that_outlives_the_kernel(
    spec: str, host: IsolatedHost, tmp_path: Path, run_root: Path
) -> None:
    port = free_port()
    km, kc = await start_manager(spec)
    kernel = Kernel(km, kc, host, tmp_path)
    try:
        served = await kernel.serve(port, "outlives", detach=True)
        await asyncio.to_thread(wait_serving, served.url, "outlives", served.printed_at)
        await stop_manager(km, kc)
        stopped = time.monotonic()
        assert await asyncio.to_thread(wait_until, lambda: closed_here(port), 5)
        MEASURED["shutdown->local port closed"] = time.monotonic() - stopped
        assert pid_alive(served.pid)  # detached: it outlived the kernel...
        assert port in await asyncio.to_thread(host.listening)  # ...and still listens there
    finally:
        await stop_manager(km, kc)
        kernel.kill_servers()
    assert wait_until(lambda: leftovers(run_root) == ([], []), 15), leftovers(run_root)

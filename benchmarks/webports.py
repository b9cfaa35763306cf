"""Web ports of remote kernels: what detection costs, how soon a URL works, how fast it is.

    python benchmarks/webports.py            # 32 kernels, 60 s idle per phase, 10 + 3 runs
    python benchmarks/webports.py --quick    # 4 kernels, 15 s idle, 3 + 2 runs

Issue 21, item 6. One throwaway loopback sshd (tests/support/sshd.py), one
``SSHSession`` to it in this process (so one remote agent: the agent is shared by every
kernel of the session whatever its ``auto_forward``), real ipykernels of this Python,
each with a client on every channel as in benchmarks/agent_scale.py (no traffic):

1. Detection cost. ``--kernels`` kernels with ``KernelOptions(auto_forward=False)``:
   5 s of settling, then the agent's CPU (utime + stime of /proc/PID/stat, all its
   threads) over ``--idle-seconds``; the kernels are closed and as many are started with
   auto-forward on (the default): the same reading; then one kernel starts
   ``python -m http.server`` (the server of 3.), and once it is forwarded, the same
   reading again. Per minute; also the bytes and read calls of the agent
   (/proc/PID/io rchar, syscr), the TCP listeners in /proc/net/tcp{,6} (what each scan
   reads) and the new listeners of this user seen during the window (each one makes the
   agent read the fd tables of this user's processes once).
2. listen() to a working local URL. A cell starts a tiny HTTP server (``python -c``:
   ``HTTPServer(("127.0.0.1", PORT))`` binds and listens, then it prints time.time(),
   then serves) and prints that time. Meanwhile this process polls
   ``kernel.web.listing()`` every 10 ms for the automatic forward of PORT (on loopback
   the remote port is taken here by the server itself, so the forward listens on a free
   local port) and, once it is there, GETs its URL (in a thread: the forward runs on
   this loop) until a 200 arrives. The time is that moment minus the printed one (one
   machine, one clock). Then the cell stops the server and prints when it exited; the
   time until the forward is gone from the listing is shown too. Median of ``--runs``.
3. Throughput. A ``--size-mb`` file (random bytes, 10^6 B per MB) served by the
   ``python -m http.server`` of 1., downloaded by a separate Python process (a socket,
   1 MiB ``recv_into``, HTTP/1.0; timed from connect to the last byte; its own CPU
   from getrusage) through: sshpyk's automatic forward (this process relays); ``ssh -N
   -L`` of OpenSSH's client with the same ssh_config, the same sshd and sshpyk's cipher
   (``-c``); ``ssh -L`` with OpenSSH's default cipher; straight to the server (no SSH,
   the ceiling). The paths take turns, ``--download-runs`` each; MB/s = 10^6 B/s. The
   forwarder's CPU (this process for sshpyk, the ``ssh`` process) and the sshd
   processes' CPU per download are shown.

Prints a Markdown table (metric | value | target | met?); ``--markdown FILE`` also
writes it there. Every wait is bounded; kernels, servers, ``ssh -L`` processes, the
sshd and the temp dir are cleaned up at the end, also after an error, Ctrl-C or
SIGTERM (this process is a child subreaper: whatever is left below it is counted in
the last row and killed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(HERE))

import procstat  # noqa: E402
from agent_scale import (  # noqa: E402
    CONCURRENCY,
    Served,
    agent_facts,
    agent_pid,
    close_all,
    start_served,
    sweep_descendants,
)

KERNELS = 32
IDLE_SECONDS = 60.0
RUNS = 10
DOWNLOAD_RUNS = 3
SIZE_MB = 100
SETTLE = 5.0
#: targets (issue 21, item 6)
MAX_ON_EXTRA_PER_MIN = 0.1  # CPU s per minute, ON over OFF
MAX_SERVER_EXTRA_PER_MIN = 0.05  # ON with a forwarded server over ON: two tick-limited readings
MAX_URL_S = 1.5
MIN_RATIO = 0.8
#: one poll of the listing / the URL
POLL = 0.01
#: a random wait of up to this long (s) before a server starts or stops, so that it
#: falls at a random moment of the agent's scan cycle (about 1 s, see the README)
PHASE = 2.0
#: bounds: a URL to work, a forward to go away, one download
URL_TIMEOUT = 15.0
GONE_TIMEOUT = 10.0
DOWNLOAD_TIMEOUT = 180.0

#: the tiny server of 2.: bind + listen (HTTPServer's constructor), then the time
TINY_SERVER = """
import http.server, sys, time
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H)
print(repr(time.time()), flush=True)
server.serve_forever()
"""

#: the downloader of 3., a process of its own: argv port, path, expected size
DOWNLOADER = """
import json, resource, socket, sys, time
port, path, size = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
cpu0, t0 = cpu(), time.perf_counter()
s = socket.create_connection(("127.0.0.1", port), timeout=60)
s.sendall(("GET /%s HTTP/1.0\\r\\nHost: 127.0.0.1\\r\\n\\r\\n" % path).encode())
buf = bytearray(1 << 20)
head = b""
body = None  # bytes of the body so far, once the header is complete
while True:
    n = s.recv_into(buf)
    if not n:
        break
    if body is None:
        head += bytes(buf[:n])
        if b"\\r\\n\\r\\n" in head:
            head, _, rest = head.partition(b"\\r\\n\\r\\n")
            body = len(rest)
    else:
        body += n
t1 = time.perf_counter()
total = body or 0
status = head.split(b"\\r\\n", 1)[0].decode("latin-1")
print(json.dumps({"bytes": total, "seconds": t1 - t0, "cpu_s": cpu() - cpu0, "status": status}))
"""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def self_cpu() -> float:
    """CPU seconds of this process (all its threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def proc_io(pid: int) -> dict[str, int]:
    """rchar and syscr of /proc/PID/io (bytes read, read calls), 0 where unreadable."""
    values = {"rchar": 0, "syscr": 0}
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in values:
                    values[key] = int(value)
    return values


def proc_listeners(uid: int | None = None) -> set[int]:
    """Inodes of the TCP listeners in /proc/net/tcp{,6} (of ``uid`` if given): what the
    agent's scan reads (ports.py's ``listening``)."""
    found = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            with open(path, "rb") as f:
                data = f.read()
            for line in data.decode("ascii", "replace").splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[3] == "0A":
                    if uid is None or int(fields[7]) == uid:
                        found.add(int(fields[9]))
    return found


#: NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1 << TCP_LISTEN
_SOCK_DIAG, _BY_FAMILY, _DUMP, _TCPF_LISTEN = 4, 20, 0x301, 1 << 10


def netlink_listeners(uid: int | None = None) -> set[int]:
    """The same as :func:`proc_listeners` through NETLINK_SOCK_DIAG, asking for LISTEN
    sockets only: the kernel then walks its listening hash, not every bucket of the
    established one as /proc/net/tcp does. OSError where unavailable."""
    found = set()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _SOCK_DIAG) as nl:
        nl.settimeout(5)
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), 1):
            # inet_diag_req_v2: family, protocol, ext, pad, states, a zero inet_diag_sockid
            req = struct.pack("=BBBxI", family, socket.IPPROTO_TCP, 0, _TCPF_LISTEN)
            req += bytes(48)
            nl.send(struct.pack("=IHHII", 16 + len(req), _BY_FAMILY, _DUMP, seq, 0) + req)
            for _ in range(10_000):  # until NLMSG_DONE (bounded)
                data, off, done = nl.recv(1 << 16), 0, False
                while off + 16 <= len(data):
                    length, kind = struct.unpack_from("=IH", data, off)
                    if kind == 3:  # NLMSG_DONE
                        done = True
                        break
                    if kind == 2:  # NLMSG_ERROR
                        raise OSError("sock_diag: netlink error")
                    # inet_diag_msg: 4 bytes, sockid (48), expires, rqueue, wqueue, uid, inode
                    owner, inode = struct.unpack_from("=II", data, off + 16 + 64)
                    if uid is None or owner == uid:
                        found.add(inode)
                    off += max(16, (length + 3) & ~3)
                if done:
                    break
    return found


def listeners(uid: int | None = None) -> set[int]:
    try:
        return netlink_listeners(uid)
    except OSError:
        return proc_listeners(uid)


def scan_costs(reps: int = 50) -> dict[str, float]:
    """CPU ms of one read of the listeners, from /proc/net/tcp{,6} and by netlink."""
    costs: dict[str, float] = {}
    for name, read in (("proc", proc_listeners), ("netlink", netlink_listeners)):
        try:
            read()
            t0 = time.process_time()
            for _ in range(reps):
                read()
            costs[name] = (time.process_time() - t0) / reps * 1000
        except OSError:
            pass
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/sys/net/ipv4/tcp_ehash_entries") as f:
            costs["ehash"] = abs(int(f.read()))
    return costs


def sshd_cpu(sshd_pid: int) -> float:
    """CPU seconds of the sshd processes below the throwaway sshd (its sessions), not
    of what they run (the agent, kernels)."""
    table = procstat.process_table()
    return sum(
        table[p].cpu_self
        for p in procstat.descendants(sshd_pid, table)
        if table[p].cmdline.startswith("sshd")
    )


def spread(values: list[float], fmt: str) -> str:
    if not values:
        return "n/a"
    text = format(statistics.median(values), fmt)
    if len(values) > 1:
        text += f" ({format(min(values), fmt)}-{format(max(values), fmt)})"
    return text


# -- the kernels -------------------------------------------------------------------------


async def start_many(session: Any, options: Any, count: int, errors: list[str]) -> list[Served]:
    """``count`` kernels with clients on every channel, CONCURRENCY at a time."""
    served: list[Served] = []
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one() -> None:
        async with gate:
            try:
                served.append(await start_served(session, options))
            except Exception as exc:
                errors.append(f"start: {type(exc).__name__}: {exc}"[:300])

    try:
        await asyncio.gather(*(one() for _ in range(count)))
    except BaseException:
        await asyncio.shield(close_all(served))
        raise
    return served


async def send_cell(kc: Any, code: str) -> str:
    return kc.execute(code, store_history=False)


async def cell_output(kc: Any, msg_id: str, timeout: float = 60.0) -> str:
    """The stdout of cell ``msg_id``, once the kernel is idle; RuntimeError on an error."""
    out: list[str] = []
    error = ""
    deadline = time.monotonic() + timeout
    while True:  # bounded by the deadline
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"cell not done within {timeout:g}s")
        msg = await kc.get_iopub_msg(timeout=left)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            out.append(content["text"])
        elif kind == "error":
            error = f"{content['ename']}: {content['evalue']}"
        elif kind == "status" and content["execution_state"] == "idle":
            break
    if error:
        raise RuntimeError(f"cell failed: {error}")
    return "".join(out)


async def run_cell(kc: Any, code: str, timeout: float = 60.0) -> str:
    return await cell_output(kc, await send_cell(kc, code), timeout)


def start_server_cell(argv: list[str], name: str, first_line: bool) -> str:
    """A cell that starts ``argv`` as a child of the kernel (kept as ``_spk[name]``) and
    prints its first stdout line if ``first_line``."""
    out = "subprocess.PIPE" if first_line else "subprocess.DEVNULL"
    code = (
        "import subprocess, sys\n"
        "_spk = globals().setdefault('_spk', {})\n"
        f"_spk[{name!r}] = subprocess.Popen({argv!r}, stdout={out},"
        " stderr=subprocess.DEVNULL, text=True)\n"
    )
    if first_line:
        code += f"print(_spk[{name!r}].stdout.readline().strip())\n"
    return code


def stop_server_cell(name: str) -> str:
    """Stop ``_spk[name]``; prints the time.time() when it had exited."""
    return (
        "import time\n"
        f"_p = globals().get('_spk', {{}}).pop({name!r}, None)\n"
        "if _p is not None:\n"
        "    _p.terminate()\n"
        "    try:\n"
        "        _p.wait(10)\n"
        "    except Exception:\n"
        "        _p.kill(); _p.wait(10)\n"
        "print(repr(time.time()))\n"
    )


STOP_ALL_CELL = (
    "for _p in list(globals().get('_spk', {}).values()):\n"
    "    _p.kill(); _p.wait(10)\n"
    "globals().get('_spk', {}).clear()\n"
)


def auto_forward(kernel: Any, remote_port: int) -> dict[str, Any] | None:
    for entry in kernel.web.listing():
        if entry.get("auto") and entry.get("remote_port") == remote_port:
            return entry
    return None


async def wait_forward(kernel: Any, remote_port: int, timeout: float = URL_TIMEOUT) -> int:
    """The local port of the automatic forward of ``remote_port``, once it exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = auto_forward(kernel, remote_port)
        if entry is not None:
            return int(entry["local"])
        await asyncio.sleep(POLL)
    raise RuntimeError(f"remote port {remote_port} not forwarded within {timeout:g}s")


def event_ports(kernel: Any) -> set[int]:
    """The ports of the agent's latest ``ports`` event for ``kernel``, as received here."""
    process = getattr(kernel, "process", None)
    return {int(e.get("port") or 0) for e in getattr(process, "web_ports", None) or []}


def http_ok(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as reply:
            return reply.status == 200 and reply.read() == b"ok"
    except OSError:
        return False


# -- 1. detection cost --------------------------------------------------------------------


async def idle_reading(pid: int, seconds: float) -> dict[str, float]:
    """The agent's CPU and reads over ``seconds`` (after SETTLE), per minute; the
    listeners seen, and new listeners of this user appearing meanwhile."""
    await asyncio.sleep(SETTLE)
    uid = os.getuid()
    seen = listeners(uid)
    total = len(listeners())
    new = 0
    cpu0, io0, me0, t0 = agent_facts(pid)["cpu_s"], proc_io(pid), self_cpu(), time.monotonic()
    while True:  # bounded by ``seconds``
        left = seconds - (time.monotonic() - t0)
        if left <= 0:
            break
        await asyncio.sleep(min(1.0, left))
        now = listeners(uid)
        new += len(now - seen)
        seen |= now
    elapsed = time.monotonic() - t0
    cpu, io, me = agent_facts(pid)["cpu_s"] - cpu0, proc_io(pid), self_cpu() - me0
    per_min = 60 / elapsed
    return {
        "seconds": elapsed,
        "cpu_s": cpu,
        "cpu_s_per_min": cpu * per_min,
        "rchar_per_min": (io["rchar"] - io0["rchar"]) * per_min,
        "syscr_per_min": (io["syscr"] - io0["syscr"]) * per_min,
        "client_cpu_s_per_min": me * per_min,
        "listeners": total,
        "new_listeners": new,
    }


# -- 3. downloads ---------------------------------------------------------------------------


async def download(port: int, size: int) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        DOWNLOADER,
        str(port),
        "blob",
        str(size),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), DOWNLOAD_TIMEOUT)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await asyncio.shield(proc.wait())
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"downloader failed: {err.decode(errors='replace')[-300:]}")
    result = json.loads(out)
    if result["bytes"] != size or " 200 " not in result["status"] + " ":
        raise RuntimeError(f"downloaded {result['bytes']} of {size} bytes ({result['status']})")
    return result


@dataclass
class SshL:
    """``ssh -N -L`` of OpenSSH's client to the same sshd."""

    cipher: str | None  # -c; None: OpenSSH's own choice
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    negotiated: str = "?"
    log: Path | None = None

    def start(self, sshd: Any, remote_port: int, logdir: Path) -> None:
        self.port = free_port()
        self.log = logdir / f"ssh-L-{self.cipher or 'default'}.log"
        cmd = ["ssh", "-F", str(sshd.ssh_config), "-N", "-v"]
        cmd += ["-o", "ExitOnForwardFailure=yes", "-o", "ControlMaster=no"]
        cmd += ["-o", "ControlPath=none", "-o", "BatchMode=yes"]
        if self.cipher:
            cmd += ["-c", self.cipher]
        cmd += ["-L", f"127.0.0.1:{self.port}:127.0.0.1:{remote_port}", sshd.alias]
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=f)
        deadline = time.monotonic() + 20
        while not procstat.listening_on(self.port):  # bounded by the deadline
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ssh -L did not listen: {self.log.read_text()[-500:]}")
            time.sleep(0.05)
        found = re.search(r"kex: server->client cipher: (\S+)", self.log.read_text())
        self.negotiated = found.group(1) if found else "?"

    def cpu(self) -> float:
        info = procstat._read_stat(self.proc.pid) if self.proc else None
        return info.cpu_self if info else 0.0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Results:
    args: argparse.Namespace
    idle: dict[str, dict[str, float]] = field(default_factory=dict)
    agent: str = ""
    url_s: list[float] = field(default_factory=list)
    gone_s: list[float] = field(default_factory=list)
    event_s: list[float] = field(default_factory=list)
    listed_s: list[float] = field(default_factory=list)
    paths: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    titles: dict[str, str] = field(default_factory=dict)
    ciphers: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    scan: dict[str, float] = field(default_factory=dict)


async def measure(sshd: Any, root: Path, res: Results) -> None:
    from sshpyk import KernelOptions, SSHSession

    args = res.args
    run_root = root / "run"
    run_root.mkdir(mode=0o700)
    www = root / "www"
    www.mkdir()
    size = args.size_mb * 10**6
    with open(www / "blob", "wb") as f:  # random: no compression can shrink it
        block = os.urandom(1 << 20)
        for start in range(0, size, len(block)):
            f.write(block[: size - start])
    res.scan = scan_costs()
    base = {"kernel_name": "python3", "python": sys.executable, "run_root": str(run_root)}
    served: list[Served] = []
    sshls: list[SshL] = []
    async with await SSHSession.connect(sshd.alias, ssh_config=str(sshd.ssh_config)) as session:
        conn = await session.connection()
        res.ciphers["sshpyk"] = str(conn.get_extra_info("recv_cipher"))
        res.ciphers["sshpyk compression"] = str(conn.get_extra_info("recv_compression"))
        try:
            # 1. OFF, then ON, then ON with a forwarded server
            for phase, options in (
                ("off", KernelOptions(**base, auto_forward=False)),
                ("on", KernelOptions(**base)),
            ):
                t0 = time.monotonic()
                served = await start_many(session, options, args.kernels, res.errors)
                if not served:
                    raise RuntimeError(f"no kernel started: {res.errors[-3:]}")
                pids = {agent_pid(s.kernel) for s in served}
                if len(pids) != 1:
                    raise RuntimeError(f"kernels on more than one agent: {pids}")
                pid = pids.pop()
                res.agent = res.agent or f"{pid}"
                log(
                    f"auto-forward {phase}: {len(served)} kernels in "
                    f"{time.monotonic() - t0:.0f}s; idle {args.idle_seconds:g}s"
                )
                reading = await idle_reading(pid, args.idle_seconds)
                reading["kernels"] = len(served)
                res.idle[phase] = reading
                log(f"  agent {reading['cpu_s']:.2f} CPU s in {reading['seconds']:.0f}s")
                if phase == "off":
                    await close_all(served)
                    served = []
            big, tiny = served[0], served[-1]
            web_port = free_port()
            argv = [sys.executable, "-m", "http.server", str(web_port)]
            argv += ["--bind", "127.0.0.1", "--directory", str(www)]
            await run_cell(big.client, start_server_cell(argv, "web", False))
            local = await wait_forward(big.kernel, web_port)
            log(f"http.server on {web_port} forwarded at {local}; idle {args.idle_seconds:g}s")
            reading = await idle_reading(pid, args.idle_seconds)
            reading["kernels"] = len(served)
            res.idle["server"] = reading
            log(f"  agent {reading['cpu_s']:.2f} CPU s in {reading['seconds']:.0f}s")

            # 2. listen() -> a working local URL
            for run in range(args.runs):
                await url_run(tiny, res)
                if res.url_s:
                    log(f"url {run + 1}/{args.runs}: {res.url_s[-1]:.3f}s")

            # 3. throughput
            res.titles = {
                "sshpyk": "sshpyk's automatic forward",
                "ssh-same": "`ssh -L` (OpenSSH client), sshpyk's cipher",
                "ssh-default": "`ssh -L` (OpenSSH client), its default cipher",
                "direct": "straight to the server (no SSH)",
            }
            same = SshL(res.ciphers["sshpyk"])
            default = SshL(None)
            sshls += [same, default]
            for item in sshls:
                item.start(sshd, web_port, root)
            res.ciphers["ssh-same"] = same.negotiated
            res.ciphers["ssh-default"] = default.negotiated
            ports = {"sshpyk": local, "ssh-same": same.port, "ssh-default": default.port}
            ports["direct"] = web_port
            cpu_of = {"sshpyk": self_cpu, "ssh-same": same.cpu, "ssh-default": default.cpu}
            assert sshd.proc is not None
            for run in range(args.download_runs):
                for key, port in ports.items():
                    fwd0 = cpu_of[key]() if key in cpu_of else 0.0
                    srv0 = sshd_cpu(sshd.proc.pid)
                    try:
                        got = await download(port, size)
                    except RuntimeError as exc:
                        res.errors.append(f"download via {key}: {exc}")
                        continue
                    got["forwarder_cpu_s"] = cpu_of[key]() - fwd0 if key in cpu_of else 0.0
                    got["sshd_cpu_s"] = sshd_cpu(sshd.proc.pid) - srv0
                    got["mb_s"] = size / got["seconds"] / 1e6
                    res.paths.setdefault(key, []).append(got)
                    log(f"download {run + 1}/{args.download_runs} {key}: {got['mb_s']:.0f} MB/s")
        finally:
            for item in sshls:
                item.stop()
            for s in served[:1]:  # the http.server; the tiny ones are stopped per run
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(run_cell(s.client, STOP_ALL_CELL, 20), 30)
            await asyncio.shield(close_all(served))


async def url_run(served: Served, res: Results) -> None:
    """One run of 2.: a tiny server started from a cell, the forwarded URL polled."""
    kc, kernel = served.client, served.kernel
    port = free_port()
    argv = [sys.executable, "-c", TINY_SERVER, str(port)]
    # a random phase against the agent's scan: the previous run ended with a scan
    await asyncio.sleep(random.uniform(0, PHASE))
    msg_id = await send_cell(kc, start_server_cell(argv, "tiny", True))
    ok_at = event_at = listed_at = None
    deadline = time.monotonic() + URL_TIMEOUT
    try:
        while time.monotonic() < deadline:
            if event_at is None and port in event_ports(kernel):
                event_at = time.time()
            entry = auto_forward(kernel, port)
            if entry is not None and listed_at is None:
                listed_at = time.time()
            if entry is not None and await asyncio.to_thread(http_ok, int(entry["local"])):
                ok_at = time.time()
                break
            await asyncio.sleep(POLL)
        listened = float((await cell_output(kc, msg_id, 30)).strip())
        await asyncio.sleep(random.uniform(0, PHASE))  # as above: it was found at a scan
    finally:
        stopped = await run_cell(kc, stop_server_cell("tiny"), 30)
    if ok_at is None:
        res.errors.append(f"url: port {port} gave no working URL within {URL_TIMEOUT:g}s")
        return
    res.url_s.append(ok_at - listened)
    if event_at is not None and listed_at is not None:
        res.event_s.append(event_at - listened)
        res.listed_s.append(listed_at - listened)
    exited = float(stopped.strip())
    deadline = time.monotonic() + GONE_TIMEOUT
    while auto_forward(kernel, port) is not None:  # bounded by the deadline
        if time.monotonic() > deadline:
            res.errors.append(f"url: forward of {port} still there {GONE_TIMEOUT:g}s after")
            return
        await asyncio.sleep(POLL)
    res.gone_s.append(time.time() - exited)


# -- the table ------------------------------------------------------------------------------


def table(res: Results) -> str:
    args = res.args
    lines = ["| Metric | Value | Target | Met? |", "|---|---|---|---|"]

    def row(metric: str, value: str, target: str = "-", ok: bool | None = None) -> None:
        verdict = "-" if ok is None else ("met" if ok else "NOT met")
        lines.append(f"| {metric} | {value} | {target} | {verdict} |")

    idle = res.idle
    n = args.kernels
    titles = {
        "off": f"agent CPU, {n} idle kernels, auto-forward OFF (CPU s per minute)",
        "on": f"agent CPU, {n} idle kernels, auto-forward ON (CPU s per minute)",
        "server": f"agent CPU, {n} idle kernels, ON, one serving http.server (CPU s per min)",
    }
    for key, metric in titles.items():
        got = idle.get(key)
        value = "n/a"
        if got:
            value = f"{got['cpu_s_per_min']:.3f} ({got['cpu_s']:.2f} in {got['seconds']:.0f} s)"
        target, ok = "-", None
        if key == "on":
            target = f"≤ OFF + {MAX_ON_EXTRA_PER_MIN}"
            if "off" in idle and got:
                ok = got["cpu_s_per_min"] <= idle["off"]["cpu_s_per_min"] + MAX_ON_EXTRA_PER_MIN
        if key == "server":
            target = f"≤ ON + {MAX_SERVER_EXTRA_PER_MIN} (the scan does not grow)"
            if "on" in idle and got:
                ok = got["cpu_s_per_min"] <= idle["on"]["cpu_s_per_min"] + MAX_SERVER_EXTRA_PER_MIN
        row(metric, value, target, ok)
    present = [k for k in ("off", "on", "server") if k in idle]
    if present:
        names = "/".join(k.upper() if k != "server" else "ON+server" for k in present)
        row(
            f"agent reads per minute, {names} (KB read; read calls)",
            "; ".join(
                f"{idle[k]['rchar_per_min'] / 1e3:.0f} KB, {idle[k]['syscr_per_min']:.0f}"
                for k in present
            ),
        )
        row(
            f"TCP listeners in /proc/net/tcp{{,6}}; new ones of this user during, {names}",
            "; ".join(f"{idle[k]['listeners']}, {idle[k]['new_listeners']}" for k in present),
        )
        row(
            f"this process's CPU (client side), {names} (CPU s per minute)",
            "; ".join(f"{idle[k]['client_cpu_s_per_min']:.3f}" for k in present),
        )
    if res.scan.get("proc") is not None:
        ehash = res.scan.get("ehash")
        row(
            "CPU ms of one read of the TCP listeners: /proc/net/tcp{,6} (what the scan reads"
            + (f"; {ehash:.0f} established-hash buckets" if ehash else "")
            + "); NETLINK_SOCK_DIAG, LISTEN only",
            f"{res.scan['proc']:.2f}; "
            + (f"{res.scan['netlink']:.3f}" if "netlink" in res.scan else "n/a"),
        )
    ok = statistics.median(res.url_s) <= MAX_URL_S if res.url_s else None
    count = f"median of {len(res.url_s)}" + (
        f" of {args.runs} runs" if len(res.url_s) < args.runs else ""
    )
    row(
        f"listen() → working local URL (s), {count} (min-max)",
        spread(res.url_s, ".3f"),
        f"≤ {MAX_URL_S}",
        ok,
    )
    row("… of which: listen() → the agent's ports event here (s)", spread(res.event_s, ".3f"))
    row("… of which: listen() → the local forward listed (s)", spread(res.listed_s, ".3f"))
    row("listener closed → local forward closed (s), median (min-max)", spread(res.gone_s, ".3f"))
    mbs = {k: [d["mb_s"] for d in v] for k, v in res.paths.items()}
    for key, title in res.titles.items():
        cipher = res.ciphers.get(key)
        suffix = f", {cipher}" if cipher else ""
        row(
            f"{args.size_mb} MB download, {title}{suffix} (MB/s), median of "
            f"{len(mbs.get(key, []))} (min-max)",
            spread(mbs.get(key, []), ".0f"),
        )
    if mbs.get("sshpyk") and mbs.get("ssh-same"):
        ratio = statistics.median(mbs["sshpyk"]) / statistics.median(mbs["ssh-same"])
        row(
            "sshpyk ÷ `ssh -L` at the same cipher",
            f"{ratio:.2f}x",
            f"≥ {MIN_RATIO}x",
            ratio >= MIN_RATIO,
        )
    if mbs.get("sshpyk") and mbs.get("ssh-default"):
        ratio = statistics.median(mbs["sshpyk"]) / statistics.median(mbs["ssh-default"])
        row("sshpyk ÷ `ssh -L` at its default cipher", f"{ratio:.2f}x")
    for key in ("sshpyk", "ssh-same", "ssh-default"):
        got = res.paths.get(key)
        if got:
            forwarder = "this process" if key == "sshpyk" else "the ssh process"
            row(
                f"CPU s per download via {key}: forwarder ({forwarder}); sshd; downloader",
                "; ".join(
                    format(statistics.median(d[k] for d in got), ".2f")
                    for k in ("forwarder_cpu_s", "sshd_cpu_s", "cpu_s")
                ),
            )
    row("errors; processes / run dirs left behind", f"{len(res.errors)}; {len(res.leftovers)}")
    return "\n".join(lines)


def environment(res: Results, elapsed: float) -> str:
    import importlib.metadata as md

    versions = ", ".join(
        f"{m} {md.version(m)}" for m in ("jupyter_client", "ipykernel", "pyzmq", "asyncssh")
    )
    ssh_version = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        head = "?"
    lines = [
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; "
        f"{len(os.sched_getaffinity(0))} cores; load at the end {load}; tree {head}",
        f"- python {platform.python_version()}, {versions}; {ssh_version}",
        f"- ciphers (server->client): sshpyk {res.ciphers.get('sshpyk', '?')} "
        f"(compression {res.ciphers.get('sshpyk compression', '?')}), `ssh -L -c` "
        f"{res.ciphers.get('ssh-same', '?')}, "
        f"`ssh -L` default {res.ciphers.get('ssh-default', '?')}",
        f"- command: `python benchmarks/webports.py {' '.join(sys.argv[1:])}` "
        f"({elapsed / 60:.1f} min)",
    ]
    lines += [f"- error: {e}" for e in res.errors]
    lines += [f"- left behind: {item}" for item in res.leftovers]
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 kernels, 15 s idle, 3 + 2 runs")
    parser.add_argument("--kernels", type=int, help=f"idle kernels per phase ({KERNELS})")
    parser.add_argument("--idle-seconds", type=float, help=f"per phase ({IDLE_SECONDS:g})")
    parser.add_argument("--runs", type=int, help=f"listen-to-URL runs ({RUNS})")
    parser.add_argument("--download-runs", type=int, help=f"downloads per path ({DOWNLOAD_RUNS})")
    parser.add_argument("--size-mb", type=int, default=SIZE_MB, help=f"download ({SIZE_MB})")
    parser.add_argument("--markdown", type=Path, help="also write the report to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (ssh -v logs)")
    args = parser.parse_args()
    if sys.platform != "linux":
        parser.error("the agent and the listeners are read from /proc: Linux only")
    quick = args.quick
    if args.kernels is None:
        args.kernels = 4 if quick else KERNELS
    if args.idle_seconds is None:
        args.idle_seconds = 15.0 if quick else IDLE_SECONDS
    if args.runs is None:
        args.runs = 3 if quick else RUNS
    if args.download_runs is None:
        args.download_runs = 2 if quick else DOWNLOAD_RUNS
    args.kernels = max(1, min(128, args.kernels))
    args.idle_seconds = max(1.0, min(600.0, args.idle_seconds))
    args.runs = max(1, min(100, args.runs))
    args.download_runs = max(1, min(20, args.download_runs))
    args.size_mb = max(1, min(2000, args.size_mb))
    return args


def main() -> int:
    args = parse_args()
    from support.sshd import ThrowawaySSHD, find_sshd

    if find_sshd() is None or shutil.which("ssh") is None:
        print("error: OpenSSH sshd and ssh needed (openssh-server, -client)", file=sys.stderr)
        return 1
    procstat.become_subreaper()
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="spk-webports-", dir="/tmp"))
    for name in ("data", "runtime"):
        (root / f"jupyter-{name}").mkdir(mode=0o700)
        os.environ[f"JUPYTER_{name.upper()}_DIR"] = str(root / f"jupyter-{name}")
    os.environ["JUPYTER_PLATFORM_DIRS"] = "1"
    sshd = ThrowawaySSHD(root / "sshd")
    res = Results(args)
    status = 0

    async def run() -> None:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        await measure(sshd, root, res)

    try:
        sshd.start()
        log(f"sshd on 127.0.0.1:{sshd.port}; temp dir {root}")
        asyncio.run(run())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted", file=sys.stderr)
        status = 130
    except Exception as exc:
        res.errors.append(f"{type(exc).__name__}: {exc}"[:500])
        status = 1
    finally:
        keep = {os.getpid()} | ({sshd.proc.pid} if sshd.proc is not None else set())
        res.leftovers += sweep_descendants(os.getpid(), keep, wait=10.0)
        sshd.stop()
        if (root / "run").exists():
            res.leftovers += [f"run dir {p.name}" for p in (root / "run").iterdir()]
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    text = (
        "## Web ports\n\n"
        + environment(res, time.monotonic() - started)
        + "\n\n"
        + table(res)
        + "\n"
    )
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return status


if __name__ == "__main__":
    sys.exit(main())

"""Side-by-side benchmarks: a local ipykernel, this sshpyk, and sshpyk 1.25 from PyPI.

    python benchmarks/run.py            # RTT 0, 20 and 100 ms (about 8 minutes on 2 cores)
    python benchmarks/run.py --quick    # a smaller run for development (about 4 minutes)
    python benchmarks/run.py --rtts 0 --sections all   # loopback, every section

One throwaway OpenSSH sshd on 127.0.0.1 (tests/sshd.py) serves both SSH candidates;
the "remote" Python is this machine's, so all three run the same ipykernel. Each
candidate is driven by ``driver.py`` in its own interpreter: this Python for the local
kernel and for sshpyk (the working tree), ``benchmarks/.venv-sshpyk125`` (made here on
first use) for sshpyk 1.25. For each ``--rtts`` value r > 0 both SSH candidates reach
the sshd through a delay proxy (:class:`DelayProxy`, r/2 ms each way); the local kernel
has no network and is measured once. The script prints one Markdown report
(environment, then per RTT the table and its targets) and writes it to ``--markdown``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import functools
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(HERE))

import procstat  # noqa: E402
import tunnel  # noqa: E402
from faultproxy import FaultProxy, _Link, proxied_ssh_config  # noqa: E402
from sshd import ThrowawaySSHD, find_sshd  # noqa: E402

VENV_125 = HERE / ".venv-sshpyk125"
OLD_VERSION = "1.25"
CANDIDATES = ("local", "sshpyk", "sshpyk125")
TITLES = {"local": "local ipykernel", "sshpyk": "sshpyk (this tree)", "sshpyk125": "sshpyk 1.25"}
SECTIONS = ("lifecycle", "latency", "reconnect", "tunnel", "idle", "concurrent")
#: run at every RTT; the others only on loopback (RTT 0) and only when asked for
RTT_SECTIONS = ("lifecycle", "latency", "reconnect")
DEFAULT_SECTIONS = RTT_SECTIONS
DEFAULT_RTTS = (0, 20, 100)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A set-up step failed; the message says which."""


# -- a link with latency ---------------------------------------------------------------


#: how late this machine wakes a sleeping event loop (measured: 0.3-0.4 ms)
WAKE_LATENCY = 0.0004


async def _sleep_until(loop: asyncio.AbstractEventLoop, due: float) -> None:
    """Sleep until about ``due``. asyncio's epoll timeouts are whole milliseconds rounded
    up, plus the wake-up latency, so a plain sleep ends 0.4-1.4 ms late: sleep the whole
    number of milliseconds nearest to the time left, which ends within +-0.5 ms of ``due``
    (a chunk due exactly ``delay`` after it was read: +0.4 ms)."""
    ms = round((due - loop.time() - WAKE_LATENCY) * 1000)
    if ms > 0:
        await asyncio.sleep(ms / 1000 - 0.00005)  # 50 us less, so that the ceiling is ms


class _DelayLink(_Link):
    """A FaultProxy link that delays every chunk by ``proxy.delay`` in each direction
    *without* serialising the chunks: each is sent ``delay`` after it was read, while the
    next ones are already being read (as a real link with latency, unlike the stock
    ``_pump``, which sleeps between reading a chunk and reading the next, so that a burst of
    k chunks took k x delay and throughput was capped at 64 KiB per delay). TCP_NODELAY on
    both sockets, so that the proxy adds no Nagle wait of its own.

    A new connection reaches the target one RTT (2 x delay) after it was accepted: the
    TCP handshake of a real link (SYN, SYN-ACK), which the local accept skips. Bytes the
    client sends meanwhile wait, as they would for connect() to return."""

    proxy: DelayProxy

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await self.proxy._flowing.wait()
            if self.proxy._down:
                self.abort()
                return
            if self.proxy.delay:
                await asyncio.sleep(2 * self.proxy.delay)  # the TCP handshake's round trip
                if self.proxy._down:  # reset meanwhile
                    self.abort()
                    return
            up = socket.socket()
            up.setblocking(False)
            await loop.sock_connect(up, ("127.0.0.1", self.proxy.target_port))
            self.upstream = up
            self.proxy.upstream_connects += 1
            for sock in (self.client, up):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.tasks = [
                asyncio.ensure_future(self._pump(self.client, up)),
                asyncio.ensure_future(self._pump(up, self.client)),
            ]
            await asyncio.wait(self.tasks, return_when=asyncio.FIRST_COMPLETED)
        except OSError:
            pass
        finally:
            self.close()

    async def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        proxy = self.proxy
        pending: asyncio.Queue[tuple[float, float, bytes]] = asyncio.Queue()
        room = asyncio.Event()
        room.set()
        queued = 0

        async def deliver() -> None:
            nonlocal queued
            while True:
                read_at, due, data = await pending.get()
                await _sleep_until(loop, due)
                if not data:
                    return
                await proxy._flowing.wait()
                proxy.record(loop.time() - read_at)
                await loop.sock_sendall(dst, data)
                queued -= len(data)
                if queued <= proxy.MAX_QUEUED:
                    room.set()

        writer = asyncio.ensure_future(deliver())
        try:
            while True:
                await proxy._flowing.wait()
                await room.wait()
                data = await loop.sock_recv(src, 65536)
                now = loop.time()
                pending.put_nowait((now, now + proxy.delay, data))
                if not data:  # EOF: deliver what is in flight, then end the link
                    await writer
                    return
                queued += len(data)
                if queued > proxy.MAX_QUEUED:
                    room.clear()
        finally:
            writer.cancel()


class DelayProxy(FaultProxy):
    """tests/faultproxy.py's FaultProxy (reset, heal, blackhole, ``accepted``) whose
    ``delay`` is a latency, not a per-chunk pause (see :class:`_DelayLink`). Records the
    delay each chunk actually got, and how many connections it opened to the target."""

    MAX_QUEUED = 16 * 2**20  # bytes in flight per direction before reading pauses
    link_class = _DelayLink

    def __init__(self, target_port: int, delay: float) -> None:
        super().__init__(target_port)
        self.delay = delay
        self.upstream_connects = 0
        self.delays: list[float] = []

    def record(self, seconds: float) -> None:
        if len(self.delays) < 200_000:
            self.delays.append(seconds)


# -- settings ---------------------------------------------------------------------------


@dataclass
class Settings:
    reps: int = 5  # lifecycle driver processes per candidate (one cold start each)
    cycles: int = 1  # warm start / restart / shutdown cycles per lifecycle process
    rounds: int = 200  # kernel_info round trips
    print_bytes: int = 20_000_000
    print_reps: int = 3
    tunnel_bytes: int = 200 * 2**20
    tunnel_ciphers: list[tuple[str | None, int]] = field(
        default_factory=lambda: [
            (None, 3),
            ("aes128-gcm@openssh.com", 3),
            ("aes256-gcm@openssh.com", 3),
            ("chacha20-poly1305@openssh.com", 3),
            ("aes128-ctr", 3),
        ]
    )
    idle_kernels: int = 8
    idle_seconds: float = 60.0
    concurrent: int = 32
    timeout: float = 120.0  # per kernel operation
    driver_timeout: float = 600.0  # per driver process
    reconnect_reps: int = 3  # reconnect driver processes per SSH candidate
    reconnect_down: float = 1.0  # seconds the link stays down (reset, then refused)
    reconnect_limit: float = 40.0  # after the reset: no reply by then is "did not reconnect"
    #: the RTT (ms) these settings are for; :meth:`at` makes the per-RTT ones
    rtt: int = 0
    driver_log_level: str = "WARNING"  # the drivers' jupyter_client and sshpyk loggers
    quick_run: bool = False
    fixed_reps: bool = False  # --reps given: the same at every RTT

    def at(self, rtt: int) -> Settings:
        """These settings for one RTT: fewer repetitions on slow links, so that the whole
        default run (0, 20 and 100 ms) stays within about 15 minutes on 2 cores."""
        s = dataclasses.replace(self, rtt=rtt)
        if rtt > 0:
            if not s.fixed_reps:
                s.reps = min(s.reps, 2 if s.quick_run else 3)
            s.rounds = min(s.rounds, 50 if rtt >= 50 else 100)
            s.print_reps = min(s.print_reps, 2)
        return s

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            quick_run=True,
            reconnect_reps=1,
            reps=2,
            cycles=1,
            rounds=100,
            print_bytes=5_000_000,
            print_reps=1,
            tunnel_bytes=50 * 2**20,
            tunnel_ciphers=[(None, 1), ("aes128-gcm@openssh.com", 1)],
            idle_kernels=4,
            idle_seconds=15.0,
            concurrent=8,
            timeout=90.0,
            driver_timeout=300.0,
        )


# -- the environment of one run ---------------------------------------------------------


def ensure_venv_125() -> Path:
    """benchmarks/.venv-sshpyk125 with sshpyk 1.25, reused when already right.

    jupyter_client and pyzmq are pinned to this interpreter's versions so that the only
    difference between the drivers is the provisioner.
    """
    python = VENV_125 / "bin" / "python"
    probe = (
        "import importlib.metadata as m; print(m.version('sshpyk'), m.version('jupyter_client'))"
    )
    import jupyter_client
    import zmq

    want = f"{OLD_VERSION} {jupyter_client.__version__}"
    if python.exists():
        found = subprocess.run([python, "-c", probe], capture_output=True, text=True)
        if found.returncode == 0 and found.stdout.strip() == want:
            return python
        log(
            f"{VENV_125} is not as expected "
            f"({found.stdout.strip() or found.stderr[-200:]}); rebuilding"
        )
        shutil.rmtree(VENV_125)
    log(f"creating {VENV_125} with sshpyk=={OLD_VERSION} from PyPI")
    subprocess.run([sys.executable, "-m", "venv", str(VENV_125)], check=True)
    pins = [
        f"sshpyk=={OLD_VERSION}",
        f"jupyter_client=={jupyter_client.__version__}",
        f"pyzmq=={zmq.__version__}",
    ]
    result = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", *pins], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise BenchError(f"pip install {' '.join(pins)} failed: {result.stderr.strip()[-500:]}")
    return python


#: the cipher we ask for in the "gcm" variant of the SSH candidates' ssh config
GCM = "aes128-gcm@openssh.com"


@dataclass
class Candidate:
    name: str
    python: str
    #: kernelspec name per variant: "default" (ssh config as made by tests/sshd.py) and,
    #: for the SSH candidates, "gcm" (the same with ``Ciphers aes128-gcm@openssh.com``)
    kernels: dict[str, str]
    env: dict[str, str]
    leftovers: list[str] = field(default_factory=list)
    #: errors of driver runs that failed (each was retried once)
    failures: list[str] = field(default_factory=list)


@dataclass
class DriverRun:
    name: str
    label: str
    proc: subprocess.Popen[bytes]
    out: Path
    logfile: Path
    started: float
    #: the delay proxy this run goes through, if any, and its counters and the sshd's
    #: connection count (from its log) at the start
    proxy: DelayProxy | None = None
    counters: tuple[int, int, int] = (0, 0, 0)


class Bench:
    """The throwaway sshd, the kernelspecs, and running drivers against them."""

    def __init__(
        self, root: Path, settings: Settings, candidates: list[str], proxied: list[int]
    ) -> None:
        self.root = root
        self.settings = settings
        self.names = candidates
        self.sshd = ThrowawaySSHD(root / "sshd")
        self.candidates: dict[str, Candidate] = {}
        self.ssh_config_125 = root / "ssh_config-125"
        self.ssh_config_gcm = root / "ssh_config-gcm"
        self.ssh_config_125_gcm = root / "ssh_config-125-gcm"
        self.run_root = root / "remote-run"
        self.me = os.getpid()
        #: RTTs (ms) that get a delay proxy between the SSH candidates and the sshd
        self.proxied = proxied
        self.proxies: dict[int, DelayProxy] = {}
        #: per RTT: the ssh configs through its proxy (sshpyk's, 1.25's)
        self.proxied_configs: dict[int, tuple[Path, Path]] = {}
        #: the RTT being measured; its kernelspec variant is "rtt<ms>" (RTT 0 without a
        #: proxy: "default"; the reconnect section always needs one, see :meth:`variant`)
        self.rtt = 0
        #: the local kernel has been measured (it has no network: once for all RTTs)
        self.local_done = False

    def variant(self, rtt: int | None = None, reconnect: bool = False) -> str:
        rtt = self.rtt if rtt is None else rtt
        return "default" if rtt == 0 and not reconnect else f"rtt{rtt}"

    # set-up
    def start(self) -> None:
        if find_sshd() is None:
            raise BenchError("OpenSSH sshd not found (apt-get install openssh-server)")
        if shutil.which("ssh") is None:
            raise BenchError("OpenSSH ssh not found (apt-get install openssh-client)")
        self.sshd.start()
        self.run_root.mkdir(mode=0o700)
        log(f"sshd on 127.0.0.1:{self.sshd.port} (pid {self.sshd.proc and self.sshd.proc.pid})")
        (self.root / "cm").mkdir(mode=0o700)
        (self.root / "cm-gcm").mkdir(mode=0o700)
        self.ssh_config_125.write_text(self.config_125("cm"))
        self.ssh_config_gcm.write_text(f"Ciphers {GCM}\n\n" + self.sshd.ssh_config.read_text())
        self.ssh_config_125_gcm.write_text(f"Ciphers {GCM}\n\n" + self.config_125("cm-gcm"))
        for rtt in self.proxied:
            # delay per direction: FaultProxy's delay is added to every chunk each way
            proxy = self.proxies[rtt] = DelayProxy(self.sshd.port, rtt / 2 / 1000).start()
            where = self.root / f"rtt{rtt}"
            where.mkdir(mode=0o700)
            (where / "cm").mkdir(mode=0o700)
            ours = proxied_ssh_config(self.sshd, proxy, where, self.sshd.alias)
            theirs = where / "ssh_config-125"
            theirs.write_text(
                self.config_125(
                    f"rtt{rtt}/cm",
                    port=proxy.port,
                    known_hosts=where / f"known_hosts_{self.sshd.alias}",
                )
            )
            self.proxied_configs[rtt] = (ours, theirs)
            log(f"RTT {rtt} ms: delay proxy on 127.0.0.1:{proxy.port} -> sshd")
        for name in self.names:
            self.candidates[name] = getattr(self, f"_setup_{name}")()

    def config_125(
        self, control_dir: str, port: int | None = None, known_hosts: Path | None = None
    ) -> str:
        """The alias as sshpyk 1.25 wants it: ControlMaster auto, ControlPersist, ControlPath
        (it refuses to start without them), BatchMode yes; otherwise as tests/sshd.py makes it.
        With ``port`` (a delay proxy's) and its ``known_hosts``: through that proxy."""
        sshd = self.sshd
        return f"""Host {sshd.alias}
  HostName 127.0.0.1
  User {sshd.user}
  Port {port or sshd.port}
  IdentitiesOnly yes
  IdentityFile {sshd.root / "id_ed25519"}
  UserKnownHostsFile {known_hosts or sshd.known_hosts}
  BatchMode yes
  ControlMaster auto
  ControlPath {self.root / control_dir / "%C"}
  ControlPersist 10m
"""

    def _env(self, name: str) -> dict[str, str]:
        env = dict(os.environ)
        data = self.root / f"jupyter-data-{name}"
        data.mkdir(exist_ok=True)
        env["JUPYTER_DATA_DIR"] = str(data)
        runtime = self.root / f"jupyter-runtime-{name}"
        runtime.mkdir(mode=0o700, exist_ok=True)  # sshpyk 1.25 fails if it does not exist
        env["JUPYTER_RUNTIME_DIR"] = str(runtime)
        env["JUPYTER_PLATFORM_DIRS"] = "1"
        # bytecode like an installed package has it, kept out of the source trees
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(self.root / "pycache" / name)
        env["PYTHONPATH"] = str(HERE)
        env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
        return env

    def _setup_local(self) -> Candidate:
        return Candidate("local", sys.executable, {"default": "python3"}, self._env("local"))

    def _setup_sshpyk(self) -> Candidate:
        env = self._env("sshpyk")
        kernels = {}
        variants = [("default", self.sshd.ssh_config), ("gcm", self.ssh_config_gcm)]
        variants += [(f"rtt{r}", ours) for r, (ours, _) in self.proxied_configs.items()]
        for variant, config in variants:
            name = kernels[variant] = f"bench_sshpyk_{variant}"
            add = [sys.executable, "-m", "sshpyk.cli", "add", "--kernel-name", name]
            add += ["--ssh-host-alias", self.sshd.alias, "--ssh-config", str(config)]
            add += ["--remote-python", sys.executable, "--remote-kernel-name", "python3"]
            self._run_setup(add, env, "sshpyk add")
            # remote run dirs in our temp dir, so that leftovers can be counted exactly
            spec = Path(env["JUPYTER_DATA_DIR"], "kernels", name, "kernel.json")
            data = json.loads(spec.read_text())
            data["metadata"]["kernel_provisioner"]["config"]["remote_run_root"] = str(self.run_root)
            spec.write_text(json.dumps(data, indent=1))
        return Candidate("sshpyk", sys.executable, kernels, env)

    def _setup_sshpyk125(self) -> Candidate:
        python = ensure_venv_125()
        env = self._env("sshpyk125")
        kernels = {}
        variants = [("default", self.ssh_config_125), ("gcm", self.ssh_config_125_gcm)]
        variants += [(f"rtt{r}", theirs) for r, (_, theirs) in self.proxied_configs.items()]
        for variant, config in variants:
            name = kernels[variant] = f"bench_sshpyk125_{variant}"
            add = [str(python.parent / "sshpyk"), "add", "--kernel-name", name]
            add += ["--display-name", f"bench 1.25 {variant}", "--language", "python"]
            add += ["--ssh-host-alias", self.sshd.alias, "--ssh-config", str(config)]
            add += ["--remote-python", sys.executable, "--remote-kernel-name", "python3"]
            self._run_setup(add, env, "sshpyk 1.25 add")
        return Candidate("sshpyk125", str(python), kernels, env)

    @staticmethod
    def _run_setup(cmd: list[str], env: dict[str, str], what: str) -> None:
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise BenchError(f"{what} failed: {(result.stderr or result.stdout).strip()[-500:]}")

    # running drivers
    def close_master(self) -> None:
        """Stop sshpyk 1.25's ControlMasters, if any: the next start is cold again."""
        configs = [self.ssh_config_125, self.ssh_config_125_gcm]
        configs += [theirs for _, theirs in self.proxied_configs.values()]
        for config in configs:
            subprocess.run(
                ["ssh", "-F", str(config), "-O", "exit", self.sshd.alias],
                capture_output=True,
                timeout=30,
            )

    def driver(
        self,
        name: str,
        mode: str,
        *extra: str,
        label: str = "",
        variant: str = "default",
        retry: bool = True,
        during: Callable[[DriverRun], None] | None = None,
    ) -> dict[str, Any]:
        """Run one driver process to its end; leftovers are collected afterwards.
        ``during`` is called once the driver has started (e.g. to break its link).

        A failed run is counted (and reported) and, with ``retry``, run once more."""
        handle = self.start_driver(name, mode, *extra, label=label, variant=variant)
        if during is not None:
            during(handle)
        result = self.finish_driver(handle)
        self.collect_leftovers(self.candidates[name])
        if "error" in result:
            where = f" at RTT {self.rtt} ms" if self.rtt else ""
            self.candidates[name].failures.append(f"{mode}{where}: {result['error']}")
            if retry:
                log(f"  retrying {mode} of {TITLES[name]} once")
                return self.driver(
                    name, mode, *extra, label=label, variant=variant, retry=False, during=during
                )
        return result

    def start_driver(
        self, name: str, mode: str, *extra: str, label: str = "", variant: str = "default"
    ) -> DriverRun:
        cand = self.candidates[name]
        out = self.root / f"{name}-{mode}-{time.monotonic_ns()}.json"
        logfile = self.root / f"{name}-{mode}.log"
        cmd = [cand.python, str(HERE / "driver.py"), mode, "--kind", name]
        cmd += ["--kernel", cand.kernels[variant], "--out", str(out)]
        cmd += ["--timeout", str(self.settings.timeout)]
        cmd += ["--sshd-port", str(self.sshd.port if name != "local" else 0)]
        cmd += ["--all-root", str(self.me), "--log-level", self.settings.driver_log_level]
        cmd += ["--stacks-after", str(max(10.0, self.settings.driver_timeout - 20)), *extra]
        if name == "sshpyk125":
            self.close_master()
        with open(logfile, "a") as log_f:
            log_f.write(f"\n$ {' '.join(cmd)}\n")
            log_f.flush()
            proc = subprocess.Popen(
                cmd, env=cand.env, stdout=log_f, stderr=log_f, start_new_session=True
            )
        label = (label or mode) + ("" if variant == "default" else f" ({variant})")
        run = DriverRun(name, label, proc, out, logfile, time.monotonic())
        if variant.startswith("rtt") and name != "local":
            run.proxy = self.proxies[int(variant[3:])]
            run.counters = self.connection_counters(run.proxy)
        return run

    def connection_counters(self, proxy: DelayProxy) -> tuple[int, int, int]:
        """(connections the proxy accepted, connections it opened to sshd, connections
        sshd logged): run.py runs one proxied driver at a time, so the differences over a
        run show whether every SSH connection of it went through the proxy."""
        try:
            sshd_log = self.sshd.log_file.read_text(errors="replace")
        except OSError:
            sshd_log = ""
        return proxy.accepted, proxy.upstream_connects, sshd_log.count("Connection from ")

    def finish_driver(self, run: DriverRun) -> dict[str, Any]:
        remaining = self.settings.driver_timeout - (time.monotonic() - run.started)
        try:
            run.proc.wait(max(1.0, remaining))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.proc.pid, signal.SIGKILL)
            run.proc.wait(10)
        if run.name == "sshpyk125":
            self.close_master()
        result: dict[str, Any] = {}
        if run.out.exists():
            result = json.loads(run.out.read_text())
        else:
            result["error"] = f"driver gave no result (timeout {self.settings.driver_timeout:g}s?)"
        if run.proxy is not None:
            # sshd writes its log line from the forked session: give it a moment
            time.sleep(0.2)
            now = self.connection_counters(run.proxy)
            accepted, through, logged = (b - a for a, b in zip(run.counters, now, strict=True))
            result["proxy_accepted"] = accepted
            result["proxy_connections"] = through
            result["direct_connections"] = max(0, logged - through)
            if through == 0 or logged > through:
                result.setdefault(
                    "error",
                    f"not all SSH connections went through the delay proxy: it opened "
                    f"{through} to sshd, sshd logged {logged}",
                )
        if "error" in result:
            result["error"] += f" (log: {run.logfile})"
        done = "error: " + result["error"] if "error" in result else "ok"
        elapsed = time.monotonic() - run.started
        log(f"  {run.label:<16} {TITLES[run.name]:<20} {elapsed:6.1f}s {done}")
        return result

    def collect_leftovers(self, cand: Candidate, wait: float = 10.0) -> None:
        """Processes started for this candidate that are still there (e.g. a remote kernel
        nobody stopped): recorded, then killed. Only our own descendants are touched."""
        keep = {self.me}
        if self.sshd.proc is not None:
            keep.add(self.sshd.proc.pid)
        deadline = time.monotonic() + wait
        while True:
            self.reap_zombies()
            table = procstat.process_table()
            extra = [p for p in procstat.descendants(self.me, table) if p not in keep]
            extra = [p for p in extra if table[p].state != "Z"]
            if not extra or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for pid in extra:
            cand.leftovers.append(table[pid].cmdline[:160])
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self.reap_zombies()
        leftovers = sorted(self.run_root.iterdir()) if self.run_root.exists() else []
        for path in leftovers:
            cand.leftovers.append(f"remote run dir {path.name}")
            shutil.rmtree(path, ignore_errors=True)

    def reap_zombies(self) -> None:
        """Reap orphans reparented to us (we are a subreaper) once they exit. Only zombie
        children that no Popen waits for: at this point none is pending."""
        table = procstat.process_table()
        sshd_pid = self.sshd.proc.pid if self.sshd.proc is not None else -1
        for info in table.values():
            if info.ppid == self.me and info.state == "Z" and info.pid != sshd_pid:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(info.pid, os.WNOHANG)

    def stop(self) -> None:
        if "sshpyk125" in self.candidates:
            with contextlib.suppress(Exception):
                self.close_master()
        for proxy in self.proxies.values():
            with contextlib.suppress(Exception):
                proxy.stop()
        self.sshd.stop()
        for cand in self.candidates.values():
            self.collect_leftovers(cand, wait=2.0)


# -- statistics and the report ----------------------------------------------------------


@dataclass
class Stat:
    values: list[float]

    @property
    def ok(self) -> bool:
        return bool(self.values)

    @property
    def median(self) -> float:
        return statistics.median(self.values)


def cell(stat: Stat | None, fmt: str, error: str = "", rtt: float = 0, na: str = "") -> str:
    """median (min-max); with ``rtt`` (in the row's unit) also "= N.N RTT" of the median."""
    if stat is None or not stat.ok:
        if na:
            return f"n/a: {na}"
        return f"error ({error[:60]})" if error else "n/a"
    text = format(stat.median, fmt)
    if len(stat.values) > 1:
        lo, hi = min(stat.values), max(stat.values)
        text += f" ({format(lo, fmt)}-{format(hi, fmt)})"
    if rtt:
        multiple = stat.median / rtt
        text += f" = {multiple:.2f} RTT" if multiple < 10 else f" = {multiple:.1f} RTT"
    return text


def ratio(a: Stat | None, b: Stat | None) -> str:
    if a is None or b is None or not a.ok or not b.ok or b.median == 0:
        return "-"
    return f"{a.median / b.median:.2f}x"


@dataclass
class Row:
    key: str
    label: str
    unit: str
    fmt: str
    stats: dict[str, Stat | None]
    errors: dict[str, str] = field(default_factory=dict)


#: where a start's time goes: the driver's split, and sshpyk's own (from its log)
PHASES = [
    ("start_kernel_s", "… of which `start_kernel()`"),
    ("sshpyk_ssh_and_forwards_s", "…… in it (sshpyk's log): SSH connection and local forwards"),
    ("sshpyk_agent_s", "…… then the remote agent up"),
    ("sshpyk_spawn_s", "…… then the kernel spawned"),
    ("sshpyk_sockets_bound_s", "…… then the kernel's sockets bound"),
    ("kernel_info_s", "… then the first kernel_info reply"),
    ("execute_s", "… then the first execute reply"),
]
PHASE_ROWS = {
    start: [(f"{start}_{key}", label, "s", ".2f") for key, label in PHASES]
    for start in ("cold", "warm")
}

#: (sample key, label, unit, format) of the main table, in order
ROWS = [
    ("import_s", "One-time import: jupyter_client + provisioner", "s", ".3f"),
    ("cold_start_s", "Cold start → first execute reply", "s", ".2f"),
    *PHASE_ROWS["cold"],
    ("warm_start_s", "Warm start → first execute reply", "s", ".2f"),
    *PHASE_ROWS["warm"],
    ("restart_s", "Restart → first execute reply", "s", ".2f"),
    ("shutdown_s", "Shutdown (another kernel keeps the connection)", "s", ".2f"),
    ("last_shutdown_s", "Shutdown of the last kernel", "s", ".2f"),
    ("kernel_info_ms", "kernel_info round trip", "ms", ".2f"),
    ("kernel_info_p90_ms", "… p90 of the round trips", "ms", ".2f"),
    ("kernel_info_ms_gcm", f"… with `Ciphers {GCM}` (local: same as above)", "ms", ".2f"),
    ("kernel_info_cpu_ms", "… client CPU per round trip (driver + its ssh)", "ms", ".2f"),
    ("kernel_info_cpu_ms_gcm", "… client CPU per round trip, aes128-gcm", "ms", ".2f"),
    ("printed_s", "Printed output, {print_mb:g} MB: execute → idle, all received", "s", ".2f"),
    ("printed_mb_s", "Printed output, {print_mb:g} MB", "MB/s", ".1f"),
    ("printed_mb_s_gcm", f"… with `Ciphers {GCM}` (local: same as above)", "MB/s", ".1f"),
    ("printed_cpu_s", "… client CPU per {print_mb:g} MB (driver + its ssh)", "CPU s", ".2f"),
    ("printed_cpu_s_gcm", "… client CPU per {print_mb:g} MB, aes128-gcm", "CPU s", ".2f"),
    (
        "reconnect_s",
        "Reconnect after a reset ({down:g} s down) → first kernel_info reply (control)",
        "s",
        ".2f",
    ),
    ("tunnel_mib_s", "Raw tunnel, {tunnel_mib:g} MiB through one forward", "MiB/s", ".0f"),
    (
        "idle_client_cpu_s",
        "Idle {idle_kernels} kernels x {idle_seconds:g} s: client process tree CPU",
        "CPU s",
        ".2f",
    ),
    ("idle_all_cpu_s", "… CPU of everything (client, sshd, kernels)", "CPU s", ".2f"),
    ("concurrent_start_s", "{concurrent} kernels started at once: total", "s", ".1f"),
    ("concurrent_vs_single", "… ÷ the candidate's single cold start", "x", ".1f"),
    (
        "concurrent_cpu_bound_s",
        "… CPU used by everything during the starts ÷ cores (a floor for the total)",
        "s",
        ".1f",
    ),
    ("failed_starts", "… kernels that failed to start", "", ".0f"),
    ("ssh_connections", "… TCP connections to sshd, peak / at end", "", ".0f"),
    ("rss_per_kernel_mib", "… driver RSS growth per kernel", "MiB", ".2f"),
    ("concurrent_shutdown_s", "… shutdown of all of them", "s", ".1f"),
    ("proxy_connections", "SSH connections through the delay proxy / direct to sshd", "", ".0f"),
    ("leftovers", "Processes / run dirs left behind (whole run)", "", ".0f"),
    ("failed_runs", "Driver runs that failed, each retried once (whole run)", "", ".0f"),
]
#: rows whose cells also say how many RTTs the median is (on a link with latency)
IN_RTTS = {
    *(spec[0] for rows in PHASE_ROWS.values() for spec in rows),
    "cold_start_s",
    "warm_start_s",
    "restart_s",
    "shutdown_s",
    "last_shutdown_s",
    "kernel_info_ms",
    "kernel_info_p90_ms",
    "printed_s",
    "reconnect_s",
}
NO_RATIO = {
    "proxy_connections",
    "ssh_connections",
    "leftovers",
    "concurrent_vs_single",
    "failed_starts",
    "failed_runs",
}


class Report:
    """The samples of one RTT (``settings.rtt``, ms)."""

    def __init__(self, names: list[str], settings: Settings) -> None:
        self.names = names
        self.settings = settings
        self.rtt = settings.rtt
        self.samples: dict[str, dict[str, list[float]]] = {n: {} for n in names}
        self.errors: dict[str, dict[str, str]] = {n: {} for n in names}
        #: measures a candidate cannot give, with the reason ("n/a: ..." in the table)
        self.na: dict[str, dict[str, str]] = {n: {} for n in names}
        #: the local kernel's numbers were measured in another RTT's run (no network)
        self.local_copied = False
        #: twice the median delay the proxy gave each chunk (None: no proxy)
        self.link_rtt_ms: float | None = None
        self.link_note = ""
        self.facts: dict[str, dict[str, Any]] = {n: {} for n in names}
        self.tunnel: list[tunnel.TunnelResult] = []

    def add(self, name: str, key: str, values: float | list[float] | None) -> None:
        if values is None:
            return
        vals = values if isinstance(values, list) else [values]
        self.samples[name].setdefault(key, []).extend(float(v) for v in vals)

    def error(self, name: str, keys: list[str], message: str) -> None:
        for key in keys:
            self.errors[name].setdefault(key, message)

    def not_available(self, name: str, key: str, reason: str) -> None:
        self.na[name].setdefault(key, reason)

    def has_row(self, key: str) -> bool:
        if self.rtt and key.endswith("_gcm"):  # the cipher variants: loopback only
            return False
        if key == "ssh_connections":
            key = "ssh_connections_peak"
        return any(
            self.samples[n].get(key) or self.errors[n].get(key) or self.na[n].get(key)
            for n in self.names
        )

    def stat(self, name: str, key: str) -> Stat | None:
        vals = self.samples.get(name, {}).get(key)
        return Stat(vals) if vals else None

    def row(self, key: str, label: str, unit: str, fmt: str) -> Row:
        return Row(
            key,
            label,
            unit,
            fmt,
            {n: self.stat(n, key) for n in self.names},
            {n: self.errors[n].get(key, "") for n in self.names},
        )

    def n(self, key: str) -> str:
        key = "ssh_connections_peak" if key == "ssh_connections" else key
        counts = sorted({len(self.samples[n].get(key, [])) for n in self.names} - {0})
        return "/".join(str(c) for c in counts) or "0"

    def table(self) -> str:
        rows = [self.row(*spec) for spec in ROWS if self.has_row(spec[0])]
        titles = dict(TITLES)
        if self.rtt and self.local_copied:
            titles["local"] += " (no network: measured once)"
        head = ["Measure", "n"] + [titles[n] for n in self.names]
        pairs = [
            (a, b, title)
            for a, b, title in (
                ("sshpyk", "local", "sshpyk ÷ local"),
                ("sshpyk", "sshpyk125", "sshpyk ÷ 1.25"),
                ("sshpyk125", "local", "1.25 ÷ local"),
            )
            if a in self.names and b in self.names
        ]
        head += [p[2] for p in pairs]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            st = self.settings
            label = r.label.format(
                print_mb=st.print_bytes / 1e6,
                tunnel_mib=st.tunnel_bytes / 2**20,
                idle_kernels=st.idle_kernels,
                idle_seconds=st.idle_seconds,
                concurrent=st.concurrent,
                down=st.reconnect_down,
            )
            label = f"{label} ({r.unit})" if r.unit else label
            if r.key == "ssh_connections":
                cells = [self.connections_cell(n) for n in self.names]
            elif r.key == "proxy_connections":
                cells = [self.proxy_cell(n) for n in self.names]
            else:
                cells = []
                for n in self.names:
                    # the RTT in the row's unit; none for the local kernel (no network)
                    rtt = 0.0
                    if self.rtt and r.key in IN_RTTS and n != "local":
                        rtt = self.rtt if r.unit == "ms" else self.rtt / 1000
                    na = self.na[n].get(r.key, "")
                    cells.append(cell(r.stats[n], r.fmt, r.errors[n], rtt=rtt, na=na))
            ratios = [ratio(r.stats[a], r.stats[b]) for a, b, _ in pairs]
            if r.key in NO_RATIO:
                ratios = ["-"] * len(pairs)
            lines.append("| " + " | ".join([label, self.n(r.key), *cells, *ratios]) + " |")
        return "\n".join(lines)

    def proxy_cell(self, name: str) -> str:
        through = self.stat(name, "proxy_connections")
        direct = self.stat(name, "direct_connections")
        if name == "local" or through is None:
            return "n/a"
        return f"{sum(through.values):.0f} / {sum(direct.values) if direct else 0:.0f}"

    def connections_cell(self, name: str) -> str:
        peak, now = self.stat(name, "ssh_connections_peak"), self.stat(name, "ssh_connections_now")
        if name == "local":
            return "n/a"
        if peak is None or now is None:
            return "error" if self.errors[name].get("ssh_connections") else "n/a"
        return f"{max(peak.values):.0f} / {max(now.values):.0f}"

    def tunnel_table(self) -> str:
        if not self.tunnel:
            return ""
        ssh_l = [r for r in self.tunnel if r.label == tunnel.OPENSSH and r.mib_per_s]
        openssh = {r.requested: statistics.median(r.mib_per_s) for r in ssh_l}
        default_openssh = next(
            (statistics.median(r.mib_per_s) for r in ssh_l if r.requested == "default"), None
        )
        lines = [
            "| Forwarder | Cipher | n | MiB/s, median (min-max) | ÷ ssh -L, same cipher "
            "| ÷ ssh -L, OpenSSH's default cipher |",
            "|---|---|---|---|---|---|",
        ]
        for r in self.tunnel:
            stat = Stat(r.mib_per_s)
            same = openssh.get(r.requested)
            lines.append(
                f"| {r.label} | {r.cipher} | {len(r.mib_per_s)} | {cell(stat, '.0f', r.error)} | "
                + (f"{stat.median / same:.2f}x" if stat.ok and same else "-")
                + " | "
                + (f"{stat.median / default_openssh:.2f}x" if stat.ok and default_openssh else "-")
                + " |"
            )
        return "\n".join(lines)


# -- sections -------------------------------------------------------------------------


def count_proxy(report: Report, name: str, res: dict[str, Any]) -> None:
    """The run's SSH connections through the delay proxy and (should be 0) past it."""
    if "proxy_connections" in res:
        report.add(name, "proxy_connections", res["proxy_connections"])
        report.add(name, "direct_connections", res["direct_connections"])


def run_lifecycle(bench: Bench, report: Report) -> None:
    s = bench.settings
    names = [n for n in bench.names if n != "local" or not bench.local_done]
    for rep in range(s.reps):  # interleaved, so that load drift hits every candidate alike
        for name in names:
            res = bench.driver(
                name,
                "lifecycle",
                *("--cycles", str(s.cycles)),
                label=f"lifecycle {rep + 1}/{s.reps}",
                variant=bench.variant(),
            )
            count_proxy(report, name, res)
            if "error" in res:
                report.error(
                    name,
                    ["cold_start_s", "warm_start_s", "restart_s", "shutdown_s", "last_shutdown_s"],
                    res["error"],
                )
            report.add(
                name,
                "import_s",
                res.get("import_jupyter_client_s", 0) + res.get("import_provisioner_s", 0),
            )
            for key in (
                "cold_start_s",
                "warm_start_s",
                "restart_s",
                "shutdown_s",
                "last_shutdown_s",
            ):
                report.add(name, key, res.get(key))
            cold = [res["cold_phases"]] if res.get("cold_phases") else []
            for start, phases in (("cold", cold), ("warm", res.get("warm_phases") or [])):
                for phase in phases:
                    for key, value in phase.items():
                        report.add(name, f"{start}_{key}", value)


def run_latency(bench: Bench, report: Report) -> None:
    """Each candidate with its default ssh config, then the SSH candidates with
    ``Ciphers aes128-gcm@openssh.com`` (keys ending in ``_gcm``; the local kernel's
    numbers are repeated there so that the ratios read the same)."""
    s = bench.settings
    names = [n for n in bench.names if n != "local" or not bench.local_done]
    runs = [(name, bench.variant()) for name in names]
    if bench.rtt == 0:  # the cipher matters on loopback; with latency, the RTT dominates
        runs += [(name, "gcm") for name in names if name != "local"]
    for name, variant in runs:
        suffix = "_gcm" if variant == "gcm" else ""
        res = bench.driver(
            name,
            "latency",
            *("--rounds", str(s.rounds), "--print-bytes", str(s.print_bytes)),
            *("--print-reps", str(s.print_reps)),
            variant=variant,
        )
        count_proxy(report, name, res)
        keys = [k + suffix for k in ("kernel_info_ms", "printed_mb_s")]
        if not suffix:
            keys += ["kernel_info_p90_ms", "printed_s"]
        if "error" in res:
            report.error(name, keys, res["error"])
        printed = [res["printed_bytes"] / t / 1e6 for t in res.get("printed_s") or []]
        if not suffix:
            report.add(name, "printed_s", res.get("printed_s"))
            if res.get("kernel_info_ms"):
                report.add(name, "kernel_info_p90_ms", percentile(res["kernel_info_ms"], 0.9))
        for key_suffix in [suffix] + (["_gcm"] if name == "local" and bench.rtt == 0 else []):
            report.add(name, "kernel_info_ms" + key_suffix, res.get("kernel_info_ms"))
            report.add(name, "printed_mb_s" + key_suffix, printed or None)
            cpu = res.get("kernel_info_client_cpu_ms")
            report.add(name, "kernel_info_cpu_ms" + key_suffix, cpu)
            report.add(name, "printed_cpu_s" + key_suffix, res.get("printed_client_cpu_s"))


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def run_reconnect(bench: Bench, report: Report) -> None:
    """Per SSH candidate: a kernel (with jupyter_client's restarter, as Jupyter Server
    runs it); the delay proxy resets every connection and refuses new ones for
    ``reconnect_down`` s, then heals; seconds from the heal to the first kernel_info
    reply on the control channel. The driver sends a request every 0.25 s from the reset
    on and counts a reply to any of them."""
    s = bench.settings
    proxy = bench.proxies.get(bench.rtt)
    names = [n for n in bench.names if n != "local"]
    if "local" in bench.names:
        report.not_available("local", "reconnect_s", "no network")
    if proxy is None or not names:
        return

    def break_link(run: DriverRun, sync: Path) -> None:
        """Wait (bounded) for the driver's ``ready``, reset, hold down, heal."""
        for stale in sync.iterdir():  # of a failed attempt: the retry starts afresh (the
            stale.unlink()  # driver writes ``ready`` only after a kernel start, seconds on)
        deadline = run.started + s.driver_timeout
        while not (sync / "ready").exists():
            if run.proc.poll() is not None or time.monotonic() > deadline:
                return  # the driver failed before; finish_driver reports it
            time.sleep(0.02)
        proxy.reset(down=True)
        _write_atomic(sync / "down", repr(time.monotonic()))
        time.sleep(s.reconnect_down)
        proxy.heal()
        _write_atomic(sync / "healed", repr(time.monotonic()))

    for rep in range(s.reconnect_reps):
        for name in names:
            sync = bench.root / f"sync-{name}-{bench.rtt}-{rep}"
            sync.mkdir()
            res = bench.driver(
                name,
                "reconnect",
                *("--sync", str(sync), "--reconnect-limit", str(s.reconnect_limit)),
                label=f"reconnect {rep + 1}/{s.reconnect_reps}",
                variant=bench.variant(reconnect=True),
                during=functools.partial(break_link, sync=sync),
            )
            count_proxy(report, name, res)
            if "error" in res:
                report.error(name, ["reconnect_s"], res["error"])
            restarted = res.get("restarted_by_restarter") or []
            if res.get("reconnect_s") is not None and not restarted:
                report.add(name, "reconnect_s", res["reconnect_s"])
            elif res.get("reconnect_s") is not None:
                report.not_available(
                    name, "reconnect_s", f"a new kernel: the restarter did {', '.join(restarted)}"
                )
            elif res.get("reconnect_failed"):
                report.not_available(name, "reconnect_s", res["reconnect_failed"])
            report.facts[name].setdefault(f"reconnect_rtt{bench.rtt}", []).append(
                {k: res.get(k) for k in ("reconnect_s", "reconnect_failed", "outage_s")}
                | {"restarted": restarted}
            )


def _write_atomic(path: Path, text: str) -> None:
    """The driver polls for ``path``: it must never see it half written."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.rename(path)


def run_tunnel(bench: Bench, report: Report) -> None:
    s = bench.settings
    env = bench.candidates["sshpyk"].env if "sshpyk" in bench.candidates else bench._env("sshpyk")
    results = tunnel.measure_all(
        alias=bench.sshd.alias,
        ssh_config=bench.sshd.ssh_config,
        controlmaster_config=bench.ssh_config_125,
        work=bench.root,
        total=s.tunnel_bytes,
        ciphers=s.tunnel_ciphers,
        env=env,
        timeout=s.timeout,
        progress=log,
    )
    report.tunnel = results
    bench.close_master()
    bench.reap_zombies()
    for r in results:
        if r.label == tunnel.FORWARDSET and r.requested == "default":
            report.add("sshpyk", "tunnel_mib_s", r.mib_per_s)
            if r.error:
                report.error("sshpyk", ["tunnel_mib_s"], r.error)
        if r.label == tunnel.CONTROLMASTER and "sshpyk125" in report.names:
            report.add("sshpyk125", "tunnel_mib_s", r.mib_per_s)
            if r.error:
                report.error("sshpyk125", ["tunnel_mib_s"], r.error)


def run_idle(bench: Bench, report: Report) -> None:
    """The local kernel and sshpyk sit idle at the same time (their CPU is counted per
    process tree, and neither uses the other's processes); sshpyk 1.25 alone after them,
    since its remote side (sshd sessions, ``ps``) would mix with sshpyk's."""
    s = bench.settings
    args = ("--kernels", str(s.idle_kernels), "--seconds", str(s.idle_seconds))
    together = [n for n in bench.names if n in ("local", "sshpyk")]
    runs = [bench.start_driver(n, "idle", *args) for n in together]
    results = {run.name: bench.finish_driver(run) for run in runs}
    for name in together:
        bench.collect_leftovers(bench.candidates[name])
    for name in together:
        if "error" in results[name]:  # counted, then once more on its own
            bench.candidates[name].failures.append(f"idle: {results[name]['error']}")
            results[name] = bench.driver(name, "idle", *args, retry=False)
    if "sshpyk125" in bench.names:
        results["sshpyk125"] = bench.driver("sshpyk125", "idle", *args)
    for name in bench.names:
        res = results[name]
        if "error" in res:
            report.error(name, ["idle_client_cpu_s", "idle_all_cpu_s"], res["error"])
        report.add(name, "idle_client_cpu_s", res.get("client_cpu_s"))
        report.add(name, "idle_all_cpu_s", res.get("all_cpu_s"))
        report.facts[name]["idle"] = {
            k: res.get(k)
            for k in (
                "client_self_cpu_s",
                "local_kernels_cpu_s",
                "client_processes",
                "restarter_poll_interval_s",
                "idle_seconds",
            )
        }


def run_concurrent(bench: Bench, report: Report) -> None:
    s = bench.settings
    for name in bench.names:
        res = bench.driver(name, "concurrent", "--kernels", str(s.concurrent))
        if "error" in res:
            report.error(
                name,
                [
                    "concurrent_start_s",
                    "ssh_connections",
                    "rss_per_kernel_mib",
                    "concurrent_shutdown_s",
                ],
                res["error"],
            )
        if "failed_starts" in res:
            report.add(name, "failed_starts", res["failed_starts"])
            if res["failed_starts"]:
                log(f"  {TITLES[name]}: {res['failed_starts']} failed: {res['failed_start_error']}")
                report.facts[name]["failed_start_error"] = res["failed_start_error"]
        if res.get("concurrent_all_cpu_s") is not None and res.get("cores"):
            report.add(name, "concurrent_cpu_bound_s", res["concurrent_all_cpu_s"] / res["cores"])
        for key in (
            "concurrent_start_s",
            "rss_per_kernel_mib",
            "concurrent_shutdown_s",
            "ssh_connections_peak",
            "ssh_connections_now",
        ):
            report.add(name, key, res.get(key))
        cold = report.stat(name, "cold_start_s")
        if res.get("concurrent_start_s") and cold is not None:
            report.add(name, "concurrent_vs_single", res["concurrent_start_s"] / cold.median)
        report.facts[name]["concurrent"] = {
            k: res.get(k)
            for k in (
                "client_helper_processes",
                "client_helper_rss_mib",
                "driver_rss_before_mib",
                "driver_rss_after_mib",
            )
        }


# -- environment and targets ----------------------------------------------------------


def environment(python_125: str | None, load_start: tuple[float, float, float]) -> str:
    def version(python: str, module: str) -> str:
        out = subprocess.run(
            [python, "-c", f"import importlib.metadata as m; print(m.version({module!r}))"],
            capture_output=True,
            text=True,
        )
        return out.stdout.strip() or "?"

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError):
        kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))  # type: ignore[union-attr]
        mem = f"{kib / 2**20:.1f} GiB"
    ssh_v = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
    py = sys.executable
    lines = [
        f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"- machine: {os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))}), {cpu}, "
        f"{mem} RAM, "
        f"{platform.system()} {platform.release()}",
        f"- load average (1/5/15 min): {' / '.join(f'{x:.2f}' for x in load_start)} at the start, "
        f"{' / '.join(f'{x:.2f}' for x in os.getloadavg())} at the end",
        f"- python {platform.python_version()}, jupyter_client {version(py, 'jupyter_client')}, "
        f"ipykernel {version(py, 'ipykernel')}, pyzmq {version(py, 'pyzmq')}, "
        f"asyncssh {version(py, 'asyncssh')}, "
        f"sshpyk (this tree) {version(py, 'sshpyk')}, {ssh_v}",
    ]
    if python_125:
        lines.append(
            f"- sshpyk 1.25 venv: sshpyk {version(python_125, 'sshpyk')}, jupyter_client "
            f"{version(python_125, 'jupyter_client')}, pyzmq {version(python_125, 'pyzmq')}"
        )
    return "\n".join(lines)


def targets(report: Report) -> str:
    def med(name: str, key: str) -> float | None:
        s = report.stat(name, key)
        return s.median if s is not None else None

    rows = []

    def check(
        label: str,
        value: float | None,
        limit: float | None,
        text: str,
        lower_is_better: bool = True,
    ) -> None:
        if value is None or limit is None:
            rows.append(f"| {label} | {text} | not measured |")
            return
        met = value <= limit if lower_is_better else value >= limit
        rows.append(f"| {label} | {text} | {'met' if met else 'NOT met'} |")

    cold, cold_l, cold_o = (
        med("sshpyk", "cold_start_s"),
        med("local", "cold_start_s"),
        med("sshpyk125", "cold_start_s"),
    )
    rtt = report.rtt
    if cold is not None and cold_l and rtt == 0:
        check(
            "cold start ≤ 1.25x local",
            cold / cold_l,
            1.25,
            f"{cold:.2f}s vs {cold_l:.2f}s = {cold / cold_l:.2f}x",
        )
    if cold is not None and cold_o:
        check(
            "cold start ≤ 0.5x sshpyk 1.25",
            cold / cold_o,
            0.5,
            f"{cold:.2f}s vs {cold_o:.2f}s = {cold / cold_o:.2f}x",
        )
    if cold is not None and cold_l:
        limit = cold_l + 6 * rtt / 1000
        over = (
            f"; sshpyk - local = {(cold - cold_l) / (rtt / 1000):.1f} RTT"
            if rtt
            else f"; sshpyk - local = {cold - cold_l:.2f}s"
        )
        check(
            "cold start ≤ local start + 6 RTT",
            cold,
            limit,
            f"{cold:.2f}s vs {cold_l:.2f}s + 6 x {rtt} ms = {limit:.2f}s{over}",
        )
    ki, ki_l = med("sshpyk", "kernel_info_ms"), med("local", "kernel_info_ms")
    if ki is not None:
        floor = f"; the local kernel alone: {ki_l:.2f} ms" if ki_l is not None else ""
        if report.link_rtt_ms is not None:
            floor += f"; the proxy's own RTT as delivered: {report.link_rtt_ms:.2f} ms"
        check(
            "kernel_info ≤ RTT + 1 ms",
            ki,
            rtt + 1.0,
            f"{ki:.2f} ms vs {rtt} + 1 ms (+{ki - rtt:.2f} ms over the RTT{floor})",
        )
    if rtt:
        if not rows:
            return "(nothing measured that a target needs)"
        return "| Target | Measured | Status |\n|---|---|---|\n" + "\n".join(rows)
    warm, warm_l = med("sshpyk", "warm_start_s"), med("local", "warm_start_s")
    if warm is not None and warm_l:
        check(
            "warm start ≤ 1.1x local",
            warm / warm_l,
            1.1,
            f"{warm:.2f}s vs {warm_l:.2f}s = {warm / warm_l:.2f}x",
        )
    ki, ki_l = med("sshpyk", "kernel_info_ms"), med("local", "kernel_info_ms")
    if ki is not None and ki_l is not None:
        check(
            "kernel_info ≤ local + 0.5 ms",
            ki,
            ki_l + 0.5,
            f"{ki:.2f} ms vs {ki_l:.2f} ms (+{ki - ki_l:.2f} ms)",
        )
    ki_g = med("sshpyk", "kernel_info_ms_gcm")
    if ki_g is not None and ki_l is not None:
        check(
            f"kernel_info ≤ local + 0.5 ms, with `Ciphers {GCM}`",
            ki_g,
            ki_l + 0.5,
            f"{ki_g:.2f} ms vs {ki_l:.2f} ms (+{ki_g - ki_l:.2f} ms)",
        )
    ossh = [r for r in report.tunnel if r.label == tunnel.OPENSSH and r.mib_per_s]
    ours = [r for r in report.tunnel if r.label == tunnel.FORWARDSET and r.mib_per_s]
    default = [r for r in ossh if r.requested == "default"]
    if default and ours:
        default_ossh = statistics.median(default[0].mib_per_s)
        best = max(ours, key=lambda r: statistics.median(r.mib_per_s))
        b = statistics.median(best.mib_per_s)
        check(
            "raw tunnel ≥ 0.9x OpenSSH (best cipher for us vs OpenSSH's default)",
            b / default_ossh,
            0.9,
            f"ForwardSet {best.cipher} {b:.0f} MiB/s vs ssh -L {default[0].cipher} "
            f"{default_ossh:.0f} MiB/s = {b / default_ossh:.2f}x",
            lower_is_better=False,
        )
        # the same negotiated cipher: with no Ciphers line the two pick different ones
        # (OpenSSH chacha20-poly1305, sshpyk AES-GCM), so match on .cipher, not .requested
        same = next((r for r in ossh if r.cipher == best.cipher), None)
        if same is not None:
            s_med = statistics.median(same.mib_per_s)
            check(
                "raw tunnel ≥ 0.9x OpenSSH (same cipher)",
                b / s_med,
                0.9,
                f"{b:.0f} vs {s_med:.0f} MiB/s ({best.cipher}) = {b / s_med:.2f}x",
                lower_is_better=False,
            )
    idle, idle_o = med("sshpyk", "idle_client_cpu_s"), med("sshpyk125", "idle_client_cpu_s")
    if idle is not None and idle_o:
        check(
            "idle client CPU ≤ 0.1x sshpyk 1.25",
            idle / idle_o,
            0.1,
            f"{idle:.2f} vs {idle_o:.2f} CPU s = {idle / idle_o:.3f}x",
        )
    conc = med("sshpyk", "concurrent_vs_single")
    if conc is not None:
        conc_l = med("local", "concurrent_vs_single")
        extra = f" (local: {conc_l:.1f}x)" if conc_l is not None else ""
        check(
            f"{report.settings.concurrent} concurrent starts ≤ 3x a single start",
            conc,
            3.0,
            f"{conc:.1f}x{extra}",
        )
    peak = report.stat("sshpyk", "ssh_connections_peak")
    if peak is not None:
        check(
            f"SSH connections for {report.settings.concurrent} kernels = 1",
            max(peak.values),
            1,
            f"peak {max(peak.values):.0f}",
        )
    if not rows:
        return "(nothing measured that a target needs)"
    return "| Target | Measured | Status |\n|---|---|---|\n" + "\n".join(rows)


# -- main -----------------------------------------------------------------------------


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="spb-"))  # short: ControlPath must fit a socket name
    try:
        yield root
    finally:
        if keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def parse_rtts(text: str) -> list[int]:
    rtts = []
    for part in text.split(","):
        if part.strip():
            value = int(part)
            if value < 0:
                raise ValueError(f"negative RTT {value}")
            if value not in rtts:
                rtts.append(value)
    if not rtts:
        raise ValueError("no RTT")
    return rtts


def git_revision() -> str:
    """``git rev-parse --short HEAD``, + " (working tree)" when the tree is dirty."""
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    if head.returncode != 0:
        return "?"
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    )
    changed = [line[3:] for line in dirty.stdout.splitlines() if line.strip()]
    rev = head.stdout.strip()
    if changed:
        more = " …" if len(changed) > 8 else ""
        rev += f" + working tree (changed: {', '.join(changed[:8])}{more})"
    return rev


def link_summary(proxy: DelayProxy, rtt: int) -> tuple[float | None, str]:
    """What the delay proxy delivered: the per-chunk delay it actually gave."""
    if not proxy.delays:
        return None, f"the delay proxy ({rtt / 2:g} ms each way) carried no data"
    delays = sorted(d * 1000 for d in proxy.delays)
    median = statistics.median(delays)
    text = (
        f"Link: a delay proxy between the SSH clients and sshd adds {rtt / 2:g} ms to every "
        f"chunk in each direction (RTT {rtt} ms); the delay each of {len(delays)} chunks "
        f"actually got: median {median:.2f} ms, p90 {percentile(delays, 0.9):.2f} ms, "
        f"max {delays[-1]:.2f} ms (asyncio wakes at whole milliseconds plus ~0.4 ms here)."
    )
    return 2 * median, text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller, faster run for development")
    parser.add_argument(
        "--sections",
        default=",".join(DEFAULT_SECTIONS),
        help=f"comma list of {', '.join(SECTIONS)}, or all (tunnel, idle and concurrent "
        f"run on loopback only; default {','.join(DEFAULT_SECTIONS)})",
    )
    parser.add_argument(
        "--candidates", default=",".join(CANDIDATES), help=f"comma list of {', '.join(CANDIDATES)}"
    )
    parser.add_argument(
        "--rtts",
        default=",".join(str(r) for r in DEFAULT_RTTS),
        help="comma list of round-trip times in ms; 0 = loopback, >0 = through a delay proxy "
        f"(default {','.join(str(r) for r in DEFAULT_RTTS)})",
    )
    parser.add_argument("--reps", type=int, help="lifecycle processes per candidate (every RTT)")
    parser.add_argument("--idle-seconds", type=float)
    parser.add_argument("--concurrent", type=int, help="kernels started at once")
    parser.add_argument("--markdown", type=Path, help="also write the report to this file")
    parser.add_argument("--json", type=Path, help="write every sample to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs)")
    parser.add_argument(
        "--driver-log-level",
        default="WARNING",
        help="log level of the drivers' kernel managers and sshpyk (logs kept with --keep)",
    )
    args = parser.parse_args()

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if sections == ["all"]:
        sections = list(SECTIONS)
    names = [c.strip() for c in args.candidates.split(",") if c.strip()]
    bad = [s for s in sections if s not in SECTIONS] + [c for c in names if c not in CANDIDATES]
    if bad:
        parser.error(f"unknown section or candidate: {', '.join(bad)}")
    try:
        rtts = parse_rtts(args.rtts)
    except ValueError as exc:
        parser.error(f"--rtts: {exc}")
    if sys.platform != "linux":
        parser.error("the benchmarks read /proc: Linux only")
    settings = Settings.quick() if args.quick else Settings()
    if args.reps is not None:
        settings.reps = max(1, args.reps)
        settings.fixed_reps = True
    if args.idle_seconds is not None:
        settings.idle_seconds = max(1.0, args.idle_seconds)
    if args.concurrent is not None:
        settings.concurrent = max(1, args.concurrent)
    settings.driver_log_level = args.driver_log_level.upper()
    names = [n for n in CANDIDATES if n in names]
    ssh_names = [n for n in names if n != "local"]
    # a delay proxy per RTT > 0; on loopback only for the reconnect section (it resets it)
    proxied = [r for r in rtts if r > 0 and ssh_names]
    if 0 in rtts and "reconnect" in sections and ssh_names:
        proxied.insert(0, 0)

    procstat.become_subreaper()
    started = time.monotonic()
    load_start = os.getloadavg()
    date_utc = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    revision = git_revision()
    command = "python benchmarks/run.py" + "".join(f" {a}" for a in sys.argv[1:])
    reports: dict[int, Report] = {}
    with workdir(args.keep) as root:
        bench = Bench(root, settings.at(0), names, proxied)
        try:
            bench.start()
            log("warm-up: one untimed start per candidate (bytecode caches, page cache)")
            for name in names:
                bench.driver(name, "lifecycle", "--cycles", "0", label="warm-up")
            for rtt in rtts:
                bench.rtt = rtt
                bench.settings = settings.at(rtt)
                report = reports[rtt] = Report(names, bench.settings)
                log(f"RTT {rtt} ms" + (" (loopback)" if rtt == 0 else " (delay proxy)"))
                for section in SECTIONS:
                    if section not in sections or (rtt and section not in RTT_SECTIONS):
                        continue
                    if section == "tunnel" and "sshpyk" not in names:
                        continue
                    log(f"section {section} (RTT {rtt} ms)")
                    globals()[f"run_{section}"](bench, report)
                bench.local_done = bench.local_done or "local" in names
                if rtt and rtt in bench.proxies:
                    report.link_rtt_ms, report.link_note = link_summary(bench.proxies[rtt], rtt)
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            bench.stop()
        if not reports:
            return 1
        first = next(iter(reports.values()))
        for report in reports.values():  # the local kernel has no network: measured once
            if report is first or "local" not in names:
                continue
            report.samples["local"] = dict(first.samples["local"])
            report.errors["local"] = dict(first.errors["local"])
            report.na["local"] = dict(first.na["local"])
            report.local_copied = True
        for name, cand in bench.candidates.items():
            first.add(name, "leftovers", float(len(cand.leftovers)))
            first.add(name, "failed_runs", float(len(cand.failures)))
            first.facts[name]["leftovers"] = cand.leftovers
            first.facts[name]["failures"] = cand.failures
            for item in cand.leftovers:
                log(f"left behind by {TITLES[name]}: {item}")
            for item in cand.failures:
                log(f"failed run of {TITLES[name]}: {item}")
    elapsed = time.monotonic() - started
    python_125 = str(VENV_125 / "bin" / "python") if "sshpyk125" in names else None
    parts = [
        "## Environment\n",
        environment(python_125, load_start),
        f"- date (UTC, start): {date_utc}; sshpyk: `{revision}`",
        f"- command: `{command}` ({elapsed / 60:.1f} min)",
    ]
    for rtt, report in reports.items():
        s = report.settings
        title = "loopback" if rtt == 0 else f"{rtt} ms RTT"
        parts += [f"\n## Results: {title}\n"]
        intro = (
            "Medians over repeated runs, (min-max) in brackets; ratios are of medians. "
            "Start times are from `start_kernel()` to the first `execute_reply`, with the "
            "provisioner's modules already imported."
        )
        if rtt:
            intro += (
                ' "= N RTT": the median divided by the RTT. '
                f"Repetitions at this RTT, per SSH candidate: lifecycle processes {s.reps}, "
                f"kernel_info round trips {s.rounds}, printed cells {s.print_reps}, "
                f"reconnects {s.reconnect_reps}."
            )
            if report.local_copied:
                intro += " The local kernel's column is the loopback run's (it has no network)."
        elif 0 in bench.proxies:
            intro += (
                " The reconnect row goes through the delay proxy with no delay (it resets "
                "the link); everything else straight to sshd."
            )
        parts += [intro + "\n"]
        if report.link_note:
            parts += [report.link_note + "\n"]
        parts += [report.table()]
        if report.tunnel:
            parts += ["\n### Raw tunnel throughput by cipher\n", report.tunnel_table()]
        parts += [f"\n### Targets: {title}\n", targets(report)]
    text = "\n".join(parts) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    str(rtt): {
                        "samples": r.samples,
                        "errors": r.errors,
                        "not_available": r.na,
                        "facts": r.facts,
                        "tunnel": [t.__dict__ for t in r.tunnel],
                        "link": r.link_note,
                    }
                    for rtt, r in reports.items()
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

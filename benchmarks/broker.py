"""Connection sharing through the broker vs each process's own connection (issue 22, item 6).

    python benchmarks/broker.py            # RTT 0 and 100 ms, 5 runs each, 8 idle kernels for 60 s
    python benchmarks/broker.py --quick    # 2 runs each, 4 idle kernels for 20 s

One throwaway loopback OpenSSH sshd (tests/support/sshd.py), real ipykernels of this Python,
the public API only (``SSHSession.connect(alias, ssh_config=..., persist=...)``,
``session.start_kernel(options=KernelOptions(python=sys.executable, run_root=...))``,
``kernel.client()``). Every measurement runs in a fresh worker process (this script,
``--worker``; ``PYTHONPATH`` starts with this script's tree, so ``import sshpyk`` and the
agent it sends are this tree's). The broker gets a private dir (``SSHPYK_BROKER_DIR``,
short, under /tmp), and ``SSHPYK_SHARE_PERSIST`` chooses the candidate: 0 = in-process
(every process its own SSH connection and agent, the behaviour before sharing), 600 =
through the broker. Two candidates, side by side in one run, alternating (run i: the
in-process run first when i is even, the broker run first when i is odd), ``--runs`` runs
of each per RTT:

* **in-process run** (one worker, sharing off): ``SSHSession.connect`` then a first kernel
  (``start_kernel`` + ``client().wait_for_ready``): the *in-process cold start*, from
  connect to ready (a new SSH connection and a new agent). Then a second kernel of the same
  process, from ``start_kernel()`` until its client's ``wait_for_ready``: the *in-process
  warm start* (live connection, live agent). On the second kernel: 20 warm-up then
  ``--rounds`` sequential kernel_info round trips through its client (``lib/kernelio.py``),
  then the 20 MB cell (200 lines of 100,000 characters, execute to idle, every byte
  counted).
* **broker run** (two workers, sharing on, the broker stopped before the run so it starts
  cold): a first process (the holder) connects and starts a kernel (the *broker cold
  start*, connect to ready: it spawns the broker, which logs in and starts the agent). While
  the holder keeps its kernel, a second, fresh process connects and starts a kernel: the
  *second process's start*, from ``SSHSession.connect()`` until its kernel's
  ``wait_for_ready`` (it reaches the broker's existing upstream and joins the holder's
  agent), also split into: connect to the broker (``SSHSession.connect``), join
  (``kernel.timings["agent"]``: the broker's slot, the channel that attaches to the
  agent's socket, its hello) and launch (the rest: the launch request, the kernel's
  start, its forwards, until ready). Then, on the second process's kernel, the same
  kernel_info round trips and 20 MB cell. Also the broker's CPU (``/proc/PID/stat``)
  during the round trips, per round trip.

Both candidates thus measure a kernel whose agent holds one more kernel. Each figure is the
run's median (kernel_info: median and p90 of the run's round trips); the table shows the
median over the runs (min-max over the runs). kernel_info "+X ms" is the difference of
those medians; 20 MB ratio = in-process seconds / broker seconds (a throughput ratio, >= 1
is better for the broker).

RTT: at 0 the SSH client (the in-process connection, or the broker's upstream) connects
to sshd directly; at 100 ms through ``lib/proxy.py``'s DelayProxy (50 ms each way; the
ssh config's Port is the proxy's). The local hop to the broker (a unix socket) never gets
a delay. sshd's "Connection from" lines during the RTT phase must equal the proxy's
connections to sshd, and sshd's logins per run must be 1 per in-process worker, 1 per
broker run (two processes, one login): both are checked and shown.

**Idle broker** (loopback, after the RTT phases): two holder processes start
``--idle-kernels`` kernels through a fresh broker (half each), each with an
AsyncKernelClient on shell, iopub, stdin and control (``start_channels(hb=False)``, one
kernel_info answered; no heartbeat pings, as Jupyter Server), then 5 s of settling, then
the broker process's utime + stime over ``--idle-seconds``, per minute (the clock tick is
0.01 s), and its VmRSS. The sessions' own heartbeats to the agent (through the broker)
continue, as in real use.

Everything is bounded (every step of a worker, every read of its output); the script is a
child subreaper, so the brokers (double-forked) and agents stay below it; after each run,
and on exit, error, Ctrl-C or SIGTERM, the workers get SIGTERM (then SIGKILL), the broker
is stopped by its pid, whatever is still below the script but the sshd is counted (last
row) and killed, the sshd stops and the temp dir goes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(HERE))

import procstat  # noqa: E402
from lib.kernelio import printed, round_trips  # noqa: E402
from lib.stats import percentile  # noqa: E402

#: one connect, kernel start, kernel_info or close in a worker: bounded by this (s)
STEP_TIMEOUT = 120.0
#: a worker's whole life (s)
WORKER_TIMEOUT = 600.0
PERSIST_ON = 600
_TICKS = os.sysconf("SC_CLK_TCK")
#: the targets of issue 22 item 6
START_FACTOR = 1.10
KERNEL_INFO_EXTRA_MS = 0.2
PRINT_RATIO = 0.9


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the worker ------------------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    """utime + stime (all threads) of ``pid``, seconds."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / _TICKS


def broker_pid_here() -> int | None:
    """The broker's pid, from its dir (this worker's ``SSHPYK_BROKER_DIR``)."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        path = Path(os.environ["SSHPYK_BROKER_DIR"]) / "hostkey.json"
        return int(json.loads(path.read_text())["pid"])
    return None


async def bounded(what: str, awaitable: Any, timeout: float = STEP_TIMEOUT) -> Any:
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except asyncio.TimeoutError:
        raise RuntimeError(f"{what}: no result within {timeout:g}s") from None


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


async def start_ready(session: Any, options: Any) -> tuple[Any, Any]:
    """A kernel and its client, once the client's wait_for_ready returned."""
    kernel = await bounded("start_kernel", session.start_kernel(options=options))
    kc = kernel.client()
    kc.start_channels(hb=False)
    await bounded("wait_for_ready", kc.wait_for_ready(timeout=STEP_TIMEOUT))
    return kernel, kc


async def close_kernel(kernel: Any, kc: Any) -> None:
    with contextlib.suppress(Exception):
        kc.stop_channels()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(kernel.close(), 30)


async def latency(kc: Any, rounds: int, broker: int | None) -> dict[str, Any]:
    cpu0 = proc_cpu(broker) if broker else 0.0
    times = await bounded("kernel_info", round_trips(kc, rounds), STEP_TIMEOUT * 3)
    cpu1 = proc_cpu(broker) if broker else 0.0
    seconds = await bounded("20 MB cell", printed(kc), 300)
    return {
        "ki_median_ms": statistics.median(times) * 1000,
        "ki_p90_ms": percentile(times, 0.9) * 1000,
        "broker_cpu_per_ki_ms": (cpu1 - cpu0) / rounds * 1000 if broker else None,
        "print_s": seconds,
    }


async def worker_main(job: dict[str, Any]) -> None:
    import sshpyk
    from sshpyk import KernelOptions, SSHSession

    if not Path(sshpyk.__file__).resolve().is_relative_to(Path(job["tree"]).resolve()):
        raise RuntimeError(f"sshpyk came from {sshpyk.__file__}, not {job['tree']}")
    options = KernelOptions(python=sys.executable, run_root=job["run_root"])
    kind, persist = job["kind"], job["persist"]
    held: list[tuple[Any, Any]] = []
    t0 = time.perf_counter()
    async with await bounded(
        "connect",
        SSHSession.connect(job["alias"], ssh_config=job["ssh_config"], persist=persist,
                           connect_timeout=60),
    ) as session:  # fmt: skip
        connected = time.perf_counter() - t0
        try:
            first = await start_ready(session, options)
            held.append(first)
            ready = time.perf_counter() - t0
            kernel = first[0]
            agent_s = kernel.timings.get("agent", 0.0)
            split = {"connect_s": connected, "join_s": agent_s,
                     "launch_s": ready - connected - agent_s}  # fmt: skip
            if kind == "inproc":
                t1 = time.perf_counter()
                second = await start_ready(session, options)
                held.append(second)
                warm = time.perf_counter() - t1
                facts = await latency(second[1], job["rounds"], None)
                emit(cold_s=ready, warm_s=warm, **facts)
            elif kind == "second":
                facts = await latency(first[1], job["rounds"], broker_pid_here())
                emit(start_s=ready, **split, **facts)
            else:  # holder: hold kernels until told to go
                for _ in range(job["kernels"] - 1):
                    held.append(await start_ready(session, options))
                emit(cold_s=ready, **split, broker=broker_pid_here(),
                     agent=getattr(kernel.process.agent, "pid", None))  # fmt: skip
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(None, sys.stdin.readline)
        finally:
            await asyncio.shield(
                asyncio.gather(*(close_kernel(k, c) for k, c in held), return_exceptions=True)
            )
    emit(bye=True)


def worker(job_text: str) -> int:
    job = json.loads(job_text)
    if job.get("log_level"):  # sshpyk's log lines (the stages of a start) into the worker's log
        import logging

        logging.basicConfig(
            level=job["log_level"], format="%(asctime)s %(name)s %(levelname)s %(message)s"
        )

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):  # cancel: the kernels get closed
            loop.add_signal_handler(signum, task.cancel)
        await asyncio.wait_for(worker_main(job), WORKER_TIMEOUT)

    try:
        asyncio.run(main())
    except BaseException as exc:  # reported to the orchestrator, which fails the run
        emit(error=f"{type(exc).__name__}: {exc}"[:500])
        return 1
    return 0


# -- the orchestrator ------------------------------------------------------------------


class Worker:
    """This script with ``--worker JOB`` in its own process; JSON lines on stdout."""

    def __init__(self, job: dict[str, Any], env: dict[str, str], log_file: Path) -> None:
        self.log_file = log_file
        self.stderr = open(log_file, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env=env,
            text=True,
        )

    def report(self, timeout: float = STEP_TIMEOUT * 4) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if not ready:
                break
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.startswith("{"):
                fields = dict(json.loads(line))
                if "error" in fields:
                    raise RuntimeError(f"worker failed: {fields['error']} (log {self.log_file})")
                return fields
        tail = self.log_file.read_text(errors="replace")[-1500:]
        raise RuntimeError(f"worker said nothing within {timeout:g}s: {tail}")

    def finish(self, timeout: float = 60.0) -> None:
        """Let it close (a line on stdin for a holder), else SIGTERM, then SIGKILL."""
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.write("\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(45)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        finally:
            with contextlib.suppress(OSError):
                assert self.proc.stdout is not None
                self.proc.stdout.close()
            self.stderr.close()


class Bench:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        from support.broker import stop_broker
        from support.sshd import ThrowawaySSHD

        self.args = args
        self.root = root
        self.stop_broker = stop_broker
        self.sshd = ThrowawaySSHD(root / "sshd").start()
        self.broker_dir = root / "b"  # short: its socket path must fit sun_path
        self.run_root = root / "rr"
        self.run_root.mkdir()
        self.workers: list[Worker] = []
        self.leftovers = 0
        self.results: dict[int, dict[str, list[Any]]] = {}
        self.checks: dict[int, dict[str, Any]] = {}
        self.idle: dict[str, Any] = {}
        self.serial = 0

    def env(self, persist: int) -> dict[str, str]:
        env = dict(os.environ)
        env["SSHPYK_BROKER_DIR"] = str(self.broker_dir)
        env["SSHPYK_SHARE_PERSIST"] = str(persist)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env["JUPYTER_RUNTIME_DIR"] = str(self.root / "runtime")
        return env

    def worker(self, kind: str, alias: str, config: str, rounds: int = 0, kernels: int = 1
               ) -> Worker:  # fmt: skip
        self.serial += 1
        persist = 0 if kind == "inproc" else PERSIST_ON
        job = {"kind": kind, "alias": alias, "ssh_config": config, "persist": persist,
               "rounds": rounds, "kernels": kernels, "run_root": str(self.run_root),
               "tree": str(REPO / "sshpyk"), "log_level": self.args.worker_log_level}  # fmt: skip
        log_file = self.root / f"worker{self.serial:03d}-{kind}.log"
        w = Worker(job, self.env(persist), log_file)
        self.workers.append(w)
        return w

    def finish(self, *workers: Worker) -> None:
        for w in workers:
            w.finish()
            self.workers.remove(w)

    def sweep(self, wait: float = 15.0) -> int:
        """Stop the broker; wait for the agents and kernels to go; kill what stays."""
        self.stop_broker(self.broker_dir)
        keep = {os.getpid(), self.sshd.proc.pid if self.sshd.proc else -1}

        def others() -> list[int]:
            table = procstat.process_table()
            return [p for p in procstat.descendants(os.getpid(), table)
                    if p not in keep and table[p].state != "Z"]  # fmt: skip

        deadline = time.monotonic() + wait
        while others() and time.monotonic() < deadline:
            time.sleep(0.5)
        left = others()
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0] > 0:  # reap the orphans we inherited
                pass
        shutil.rmtree(self.run_root, ignore_errors=True)
        self.run_root.mkdir(exist_ok=True)
        self.leftovers += len(left)
        if left:
            log(f"left behind and killed: {len(left)} processes")
        return len(left)

    def sshd_counts(self) -> tuple[int, int]:
        text = self.sshd.log_file.read_text(errors="replace")
        return text.count("Connection from"), text.count("Accepted publickey")

    # -- the RTT phases ----------------------------------------------------------------

    def run_inproc(self, alias: str, config: str, rounds: int) -> dict[str, Any]:
        _, logins0 = self.sshd_counts()
        w = self.worker("inproc", alias, config, rounds)
        try:
            facts = w.report()
        finally:
            self.finish(w)
        facts["logins"] = self.sshd_counts()[1] - logins0
        self.sweep()
        return facts

    def run_broker(self, alias: str, config: str, rounds: int) -> dict[str, Any]:
        self.stop_broker(self.broker_dir)  # a cold broker per run
        _, logins0 = self.sshd_counts()
        holder = self.worker("holder", alias, config)
        second = None
        try:
            held = holder.report()
            second = self.worker("second", alias, config, rounds)
            facts = second.report()
        finally:
            self.finish(*filter(None, (second, holder)))
        facts["holder_cold_s"] = held["cold_s"]
        facts["logins"] = self.sshd_counts()[1] - logins0
        self.sweep()
        return facts

    def rtt_phase(self, rtt: int) -> None:
        from lib.proxy import DelayProxy, link_summary

        from support.faultproxy import proxied_ssh_config

        args = self.args
        rounds = args.rounds if rtt == 0 else max(10, args.rounds // 4)
        proxy = None
        if rtt:
            proxy = DelayProxy(self.sshd.port, rtt / 2000).start()
            alias = f"bench-rtt{rtt}"
            config = str(proxied_ssh_config(self.sshd, proxy, self.root, alias))
        else:
            alias, config = self.sshd.alias, str(self.sshd.ssh_config)
        conns0, _ = self.sshd_counts()
        samples: dict[str, list[Any]] = {"inproc": [], "broker": []}
        try:
            for i in range(args.runs):
                order = ("inproc", "broker") if i % 2 == 0 else ("broker", "inproc")
                for kind in order:
                    log(f"RTT {rtt} ms, run {i + 1}/{args.runs}: {kind}")
                    run = self.run_inproc if kind == "inproc" else self.run_broker
                    facts = run(alias, config, rounds)
                    shown = {
                        k: round(v, 4) if isinstance(v, float) else v for k, v in facts.items()
                    }
                    log(f"  {json.dumps(shown)}")
                    samples[kind].append(facts)
        finally:
            if proxy is not None:
                proxy.stop()
        conns = self.sshd_counts()[0] - conns0
        check: dict[str, Any] = {"rounds": rounds, "sshd_connections": conns}
        if proxy is not None:
            check["proxied"] = proxy.upstream_connects
            check["link"] = link_summary(proxy, rtt)[1]
        self.results[rtt] = samples
        self.checks[rtt] = check

    # -- the idle broker -----------------------------------------------------------------

    def idle_phase(self) -> None:
        args = self.args
        self.stop_broker(self.broker_dir)
        alias, config = self.sshd.alias, str(self.sshd.ssh_config)
        half = args.idle_kernels // 2
        counts = [half, args.idle_kernels - half]
        log(f"idle broker: {args.idle_kernels} kernels in {len(counts)} processes")
        holders = [self.worker("holder", alias, config, kernels=n) for n in counts if n]
        try:
            reports = [h.report(STEP_TIMEOUT * 6) for h in holders]
            broker = reports[0]["broker"]
            agents = {r["agent"] for r in reports}
            time.sleep(5)
            cpu0, t0 = proc_cpu(broker), time.monotonic()
            holder_cpu0 = [proc_cpu(h.proc.pid) for h in holders]
            time.sleep(args.idle_seconds)
            cpu1, t1 = proc_cpu(broker), time.monotonic()
            holder_cpu1 = [proc_cpu(h.proc.pid) for h in holders]
            rss_kib = 0
            with open(f"/proc/{broker}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss_kib = int(line.split()[1])
            minutes = (t1 - t0) / 60
            self.idle = {
                "kernels": args.idle_kernels,
                "processes": len(holders),
                "agents": len(agents),
                "seconds": t1 - t0,
                "cpu_per_min": (cpu1 - cpu0) / minutes,
                "holder_cpu_per_min": [
                    (b - a) / minutes for a, b in zip(holder_cpu0, holder_cpu1, strict=True)
                ],
                "rss_mib": rss_kib / 1024,
            }
        finally:
            self.finish(*holders)
            self.sweep()

    def close(self) -> None:
        for w in list(self.workers):
            with contextlib.suppress(Exception):
                w.proc.terminate()
            self.finish(w)
        self.sweep(wait=10)
        self.sshd.stop()


# -- the report --------------------------------------------------------------------------


def med(values: list[float]) -> float:
    return statistics.median(values)


def cell(values: list[float], fmt: str, scale: float = 1.0) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "n/a"
    text = format(med(values), fmt)
    if len(values) > 1:
        text += f" ({format(min(values), fmt)}-{format(max(values), fmt)})"
    return text


def met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def rtt_table(rtt: int, samples: dict[str, list[Any]], check: dict[str, Any]) -> list[str]:
    ip, br = samples["inproc"], samples["broker"]

    def col(rows: list[dict[str, Any]], key: str) -> list[float]:
        return [r[key] for r in rows]

    warm, second = med(col(ip, "warm_s")), med(col(br, "start_s"))
    ki_ip, ki_br = med(col(ip, "ki_median_ms")), med(col(br, "ki_median_ms"))
    p90_ip, p90_br = med(col(ip, "ki_p90_ms")), med(col(br, "ki_p90_ms"))
    pr_ip, pr_br = med(col(ip, "print_s")), med(col(br, "print_s"))
    n = len(ip)
    lines = [
        f"### RTT {rtt} ms ({n} runs of each, alternating; {check['rounds']} kernel_info round"
        " trips per run)",
        "",
        "| Metric | in-process (sharing off) | through the broker | target | met? |",
        "|---|---|---|---|---|",
        f"| first process cold start, connect → ready (s) | {cell(col(ip, 'cold_s'), '.3f')} |"
        f" {cell(col(br, 'holder_cold_s'), '.3f')} | (context) | |",
        f"| in-process warm start / second process's start (s) | {cell(col(ip, 'warm_s'), '.3f')}"
        f" | {cell(col(br, 'start_s'), '.3f')} = {second / warm:.2f}x |"
        f" ≤ {START_FACTOR:.2f}x | {met(second <= START_FACTOR * warm)} |",
        f"| … second process: connect to the broker (s) | | {cell(col(br, 'connect_s'), '.4f')}"
        " | | |",
        f"| … second process: join the agent (s) | | {cell(col(br, 'join_s'), '.4f')} | | |",
        f"| … second process: launch until ready (s) | | {cell(col(br, 'launch_s'), '.3f')} | | |",
        f"| kernel_info round trip, median (ms) | {cell(col(ip, 'ki_median_ms'), '.2f')} |"
        f" {cell(col(br, 'ki_median_ms'), '.2f')} = {ki_br - ki_ip:+.2f} ms |"
        f" ≤ +{KERNEL_INFO_EXTRA_MS} ms | {met(ki_br - ki_ip <= KERNEL_INFO_EXTRA_MS)} |",
        f"| kernel_info round trip, p90 (ms) | {cell(col(ip, 'ki_p90_ms'), '.2f')} |"
        f" {cell(col(br, 'ki_p90_ms'), '.2f')} = {p90_br - p90_ip:+.2f} ms | | |",
        f"| broker CPU per kernel_info round trip (ms) | |"
        f" {cell(col(br, 'broker_cpu_per_ki_ms'), '.3f')} | | |",
        f"| 20 MB printed, execute → idle (s) | {cell(col(ip, 'print_s'), '.3f')} |"
        f" {cell(col(br, 'print_s'), '.3f')} = {pr_ip / pr_br:.2f}x throughput |"
        f" ≥ {PRINT_RATIO}x | {met(pr_ip / pr_br >= PRINT_RATIO)} |",
        f"| sshd logins per run | {cell(col(ip, 'logins'), '.0f')} (1 process) |"
        f" {cell(col(br, 'logins'), '.0f')} (2 processes) | broker: 1 |"
        f" {met(all(r['logins'] == 1 for r in br))} |",
    ]
    if "proxied" in check:
        lines.append(
            f"| SSH connections: through the delay proxy / sshd saw | {check['proxied']} /"
            f" {check['sshd_connections']} | | equal | "
            f"{met(check['proxied'] == check['sshd_connections'])} |"
        )
        lines += ["", check["link"]]
    return lines


def report(bench: Bench, args: argparse.Namespace, load0: str, started: float) -> str:
    stamp = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}"
    out = [
        f"Machine: {platform.node()}, {os.cpu_count()} cores, {platform.platform()}, Python"
        f" {platform.python_version()}; {stamp} UTC.",
        f"Command: `python benchmarks/broker.py {' '.join(sys.argv[1:])}`; took"
        f" {time.monotonic() - started:.0f} s.",
        f"Load average at start: {load0}; at the end: {loadavg()}.",
        "",
    ]
    for rtt in sorted(bench.results):
        out += [*rtt_table(rtt, bench.results[rtt], bench.checks[rtt]), ""]
    if bench.idle:
        idle = bench.idle
        holders = ", ".join(f"{v:.3f}" for v in idle["holder_cpu_per_min"])
        out += [
            f"### Idle broker (loopback): {idle['kernels']} kernels held by {idle['processes']}"
            f" processes on {idle['agents']} agent(s), {idle['seconds']:.0f} s idle",
            "",
            "| Metric | value | target | met? |",
            "|---|---|---|---|",
            f"| broker CPU, utime + stime (CPU s per minute) | {idle['cpu_per_min']:.3f} |"
            " none in the issue (the agent's, issue 20: ≤ 0.05) |"
            f" {'yes' if idle['cpu_per_min'] <= 0.05 else '**no**'} (vs 0.05) |",
            f"| broker RSS (MiB) | {idle['rss_mib']:.1f} | | |",
            f"| each holder process's CPU (CPU s per minute) | {holders} | | |",
            "",
        ]
    out.append(f"Processes left behind (killed by the sweeps): {bench.leftovers}.")
    return "\n".join(out)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 runs, 4 idle kernels for 20 s")
    p.add_argument("--rtts", default="0,100", help="round-trip times in ms (0 = loopback)")
    p.add_argument("--runs", type=int, help="runs per candidate per RTT (5; quick 2)")
    p.add_argument("--rounds", type=int,
                   help="kernel_info round trips per run at RTT 0 (200; quick 100); a quarter"
                   " at RTT > 0")  # fmt: skip
    p.add_argument("--idle-kernels", type=int, help="8; quick 4; 0 = no idle phase")
    p.add_argument("--idle-seconds", type=float, help="60; quick 20")
    p.add_argument("--markdown", type=Path, help="also write the report there")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (worker logs)")
    p.add_argument(
        "--worker-log-level",
        default="",
        help="e.g. DEBUG: the workers' logging, into their logs (kept with --keep)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    q = args.quick
    args.runs = args.runs or (2 if q else 5)
    args.rounds = args.rounds or (100 if q else 200)
    args.idle_kernels = (4 if q else 8) if args.idle_kernels is None else args.idle_kernels
    args.idle_seconds = args.idle_seconds or (20.0 if q else 60.0)
    args.rtt_list = [int(x) for x in args.rtts.split(",") if x.strip()]
    return args


def main() -> int:
    args = parse_args()
    if args.worker:
        return worker(args.worker)
    procstat.become_subreaper()
    started, load0 = time.monotonic(), loadavg()
    root = Path(tempfile.mkdtemp(prefix="spk-br-", dir="/tmp"))
    bench = None

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        bench = Bench(args, root)
        for rtt in args.rtt_list:
            bench.rtt_phase(rtt)
        if args.idle_kernels:
            bench.idle_phase()
        text = report(bench, args, load0, started)
        print(text)
        if args.markdown:
            args.markdown.write_text(text + "\n")
        return 0
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        return 130
    finally:
        if bench is not None:
            bench.close()
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""The remote agent at scale: a baseline tree and this tree side by side (issue 20).

    python benchmarks/agent_scale.py            # 8, 32, 64 kernels; 60 s idle; 5 runs
    python benchmarks/agent_scale.py --quick    # 8 kernels, 20 s idle, 2 runs

One throwaway loopback sshd (tests/support/sshd.py); per candidate a worker process (this script,
``--worker``) whose ``PYTHONPATH`` starts with the candidate's tree, so ``import sshpyk``
is that tree's package, and so is the agent code it sends to the remote. The baseline is
``git archive <--baseline>`` of ``sshpyk/`` in the temp dir (nothing in .git changes);
"this tree" is the repository this script is in. Each worker drives the public API
(``SSHSession.connect``, ``session.start_kernel``, ``kernel.client()``) against real
ipykernels of this Python and reads the agent process from /proc:

* scale (one worker per candidate, one after the other): kernels are started 8 at a
  time up to each ``--kernels`` count; each gets an AsyncKernelClient on shell, iopub,
  stdin and control (``start_channels(hb=False)``, one ``kernel_info`` reply) plus a
  connected heartbeat socket that sends nothing, so every relay stream exists and no
  traffic flows. At each count, after 2 s: the agent's threads (``/proc/PID/task``, the
  most of 10 samples over 2 s) and RSS. At ``--idle-kernels``: 5 s of settling, then
  the agent's CPU (utime + stime of ``/proc/PID/stat``) over ``--idle-seconds``,
  reported per minute.
* latency (``--runs`` workers per candidate, the candidates alternating): a fresh
  session and one kernel, 20 warm-up then ``--rounds`` sequential kernel_info round
  trips (the run's median), then a cell printing 200 lines of 100,000 characters
  (20 MB), execute to idle with every byte received (seconds). The table shows the
  median of the runs' values (min-max over the runs).

Prints a Markdown table (metric | candidates... | target | met?); ``met?`` judges the
last candidate, against the first one for the "no worse than baseline" targets.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(HERE))

import procstat  # noqa: E402
from lib.kernelio import printed, round_trips  # noqa: E402

BASELINE = "f615df6"
KERNELS = (8, 32, 64)
IDLE_KERNELS = 32
#: kernels started at once (64 ipykernels take about a minute of CPU on 2 cores)
CONCURRENCY = 8
#: one kernel start, one kernel_info, one kernel close: each bounded by this (s)
STEP_TIMEOUT = 120.0
#: the targets of issue 20
MAX_THREADS = 8
MAX_IDLE_CPU_PER_MIN = 0.05
_TICKS = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the worker: runs in the candidate's interpreter, its tree first on sys.path -------


def agent_facts(pid: int) -> dict[str, float]:
    """Threads, RSS (MiB) and CPU seconds (utime + stime, all threads) of ``pid``."""
    threads = len(os.listdir(f"/proc/{pid}/task"))
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    rss_kib = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss_kib = int(line.split()[1])
    return {
        "threads": threads,
        "rss_mib": rss_kib / 1024,
        "cpu_s": (int(rest[11]) + int(rest[12])) / _TICKS,
    }


def agent_pid(kernel: Any) -> int:
    """The pid of the agent that supervises ``kernel`` (the remote is this host): the
    client's record of it (``kernel.process.agent.pid``), else the kernel's parent (a
    direct kernel is the agent's child)."""
    process = getattr(kernel, "process", None)
    pid = getattr(getattr(process, "agent", None), "pid", None)
    if isinstance(pid, int) and pid > 0 and os.path.exists(f"/proc/{pid}"):
        return pid
    kernel_pid = getattr(process, "pid", 0)
    if kernel_pid:
        with contextlib.suppress(OSError):
            with open(f"/proc/{kernel_pid}/stat") as f:
                return int(f.read().rsplit(")", 1)[1].split()[1])
    raise RuntimeError("cannot tell the agent's pid (no process.agent.pid, no kernel pid)")


def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode("utf-8", "replace")[:160]


async def bounded(what: str, awaitable: Any, timeout: float = STEP_TIMEOUT) -> Any:
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except asyncio.TimeoutError:
        raise RuntimeError(f"{what}: no result within {timeout:g}s") from None


@dataclass
class Served:
    kernel: Any
    client: Any = None
    hb: Any = None


async def start_served(session: Any, options: Any) -> Served:
    """A kernel with a client on every channel: shell, iopub, stdin and control through
    jupyter_client, one kernel_info answered; the heartbeat socket connected, silent."""
    served = Served(await bounded("start_kernel", session.start_kernel(options=options)))
    try:
        served.client = served.kernel.client()
        served.client.start_channels(hb=False)
        served.hb = served.client.connect_hb()
        await bounded("kernel_info", served.client.wait_for_ready(timeout=STEP_TIMEOUT))
    except BaseException:
        await asyncio.shield(close_served(served))
        raise
    return served


async def close_served(served: Served) -> None:
    with contextlib.suppress(Exception):
        if served.hb is not None:
            served.hb.close(linger=0)
        if served.client is not None:
            served.client.stop_channels()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(served.kernel.close(), 30)


async def close_all(served: list[Served]) -> None:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(item: Served) -> None:
        async with gate:
            await close_served(item)

    await asyncio.wait_for(asyncio.gather(*(one(s) for s in served), return_exceptions=True), 300)


async def sample_peak(pid: int, peak: dict[str, int]) -> None:
    """The most threads seen, every 0.1 s until cancelled."""
    while True:  # ends when cancelled (after the starts)
        with contextlib.suppress(OSError):
            peak["threads"] = max(peak["threads"], len(os.listdir(f"/proc/{pid}/task")))
        await asyncio.sleep(0.1)


async def worker_scale(job: dict[str, Any], result: dict[str, Any], save: Any) -> None:
    from sshpyk import KernelOptions, SSHSession

    options = KernelOptions(kernel_name="python3", python=sys.executable, run_root=job["run_root"])
    stages = sorted(set(job["kernels"]) | {job["idle_kernels"]})
    result.update(stages=[], failed_starts=0, start_errors=[])
    peak = {"threads": 0}
    served: list[Served] = []
    async with await SSHSession.connect(job["alias"], ssh_config=job["ssh_config"]) as session:
        try:
            gate = asyncio.Semaphore(CONCURRENCY)

            async def start_one() -> None:
                async with gate:
                    try:
                        served.append(await start_served(session, options))
                    except Exception as exc:
                        result["failed_starts"] += 1
                        if len(result["start_errors"]) < 3:
                            result["start_errors"].append(f"{type(exc).__name__}: {exc}"[:300])

            for count in stages:
                t0 = time.monotonic()
                missing = count - len(served) - result["failed_starts"]
                first = served[0] if served else None
                if first is None and missing > 0:  # the agent's pid comes with a kernel
                    await start_one()
                    missing -= 1
                    first = served[0] if served else None
                if first is None:
                    raise RuntimeError(f"no kernel started: {result['start_errors']}")
                pid = result["agent_pid"] = agent_pid(first.kernel)
                result["agent_cmdline"] = cmdline(pid)
                sampler = asyncio.ensure_future(sample_peak(pid, peak))
                try:
                    await asyncio.gather(*(start_one() for _ in range(max(0, missing))))
                finally:
                    sampler.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await sampler
                others = {agent_pid(s.kernel) for s in served} - {pid}
                if others:
                    raise RuntimeError(f"kernels on more than one agent: {pid}, {others}")
                stage: dict[str, Any] = {
                    "kernels": count,
                    "running": len(served),
                    "start_s": time.monotonic() - t0,
                    "peak_threads_so_far": peak["threads"],
                }
                await asyncio.sleep(2.0)
                samples = []
                for _ in range(10):
                    samples.append(agent_facts(pid))
                    await asyncio.sleep(0.2)
                stage["threads"] = max(s["threads"] for s in samples)
                stage["rss_mib"] = samples[-1]["rss_mib"]
                log(
                    f"  {len(served)} kernels: agent {pid} {stage['threads']} threads, "
                    f"RSS {stage['rss_mib']:.1f} MiB (started in {stage['start_s']:.1f}s)"
                )
                if count == job["idle_kernels"]:
                    await asyncio.sleep(5.0)
                    before, t_idle = agent_facts(pid)["cpu_s"], time.monotonic()
                    await asyncio.sleep(job["idle_seconds"])
                    used, seconds = agent_facts(pid)["cpu_s"] - before, time.monotonic() - t_idle
                    stage["idle"] = {
                        "seconds": seconds,
                        "cpu_s": used,
                        "cpu_s_per_min": used * 60 / seconds,
                    }
                    log(f"  idle {seconds:.0f}s with {len(served)} kernels: agent {used:.2f} CPU s")
                result["stages"].append(stage)
                save()
        finally:
            t0 = time.monotonic()
            await close_all(served)
            result["close_s"] = time.monotonic() - t0


async def worker_latency(job: dict[str, Any], result: dict[str, Any], save: Any) -> None:
    from sshpyk import KernelOptions, SSHSession

    options = KernelOptions(kernel_name="python3", python=sys.executable, run_root=job["run_root"])
    async with await SSHSession.connect(job["alias"], ssh_config=job["ssh_config"]) as session:
        served = await start_served(session, options)
        try:
            result["agent_pid"] = agent_pid(served.kernel)
            result["agent_cmdline"] = cmdline(result["agent_pid"])
            times = await round_trips(served.client, job["rounds"])
            result["kernel_info_ms"] = statistics.median(times) * 1000
            result["print_s"] = await bounded("20 MB cell", printed(served.client), 360)
        finally:
            await close_served(served)


def worker(mode: str, job_file: Path) -> int:
    """One candidate's measurement; the result (partial after a failure, with "error") is
    written to the job's ``out`` file after every stage."""
    job = json.loads(job_file.read_text())
    out = Path(job["out"])
    result: dict[str, Any] = {"mode": mode}

    def save() -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.rename(out)

    async def main() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        assert task is not None
        for signum in (signal.SIGTERM, signal.SIGINT):  # cancel: the kernels get closed
            loop.add_signal_handler(signum, task.cancel)
        run = worker_scale if mode == "scale" else worker_latency
        await run(job, result, save)

    try:
        import sshpyk

        result["sshpyk"] = str(Path(sshpyk.__file__).resolve().parent)
        if not result["sshpyk"].startswith(job["tree"]):
            raise RuntimeError(f"imported sshpyk from {result['sshpyk']}, not {job['tree']}")
        asyncio.run(main())
    except (Exception, asyncio.CancelledError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"[:500] or type(exc).__name__
    save()
    return 0 if "error" not in result else 1


# -- the parent: sshd, trees, workers, leftovers, the table ----------------------------


@dataclass
class Candidate:
    key: str  # "baseline" or "this"
    title: str
    tree: Path
    latency: list[dict[str, Any]] = field(default_factory=list)
    scale: dict[str, Any] = field(default_factory=dict)
    leftovers: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def git(*args: str) -> str:
    out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout.strip()


def baseline_tree(sha: str, root: Path) -> Path:
    """``sshpyk/`` as of ``sha``, unpacked under ``root`` (from ``git archive``)."""
    full = git("rev-parse", "--verify", f"{sha}^{{commit}}")
    tree = root / f"baseline-{full[:7]}"
    tree.mkdir()
    archive = root / "baseline.tar"
    git("archive", "--format=tar", "-o", str(archive), full, "sshpyk")
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(tree, filter="data")
        else:  # Python < 3.12 without the backported filter
            tar.extractall(tree)  # our own repository's archive
    archive.unlink()
    return tree


def this_revision() -> str:
    """HEAD, and whether sshpyk/ differs from it."""
    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "sshpyk")
    except RuntimeError:
        return "?"
    return head + (" + uncommitted changes in sshpyk/" if dirty else "")


class Bench:
    def __init__(self, root: Path, args: argparse.Namespace) -> None:
        from support.sshd import ThrowawaySSHD

        self.root = root
        self.args = args
        self.sshd = ThrowawaySSHD(root / "sshd")
        self.me = os.getpid()
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self, cand: Candidate) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(cand.tree)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(self.root / "pycache" / cand.key)
        for name in ("data", "runtime"):
            path = self.root / f"jupyter-{name}"
            path.mkdir(mode=0o700, exist_ok=True)
            env[f"JUPYTER_{name.upper()}_DIR"] = str(path)
        env["JUPYTER_PLATFORM_DIRS"] = "1"
        env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
        return env

    def run_worker(
        self, cand: Candidate, mode: str, job: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        n = len(list(self.root.glob("job-*.json")))
        out = self.root / f"out-{n}.json"
        run_root = self.root / f"run-{n}"
        run_root.mkdir(mode=0o700)
        job = {
            **job,
            "out": str(out),
            "run_root": str(run_root),
            "tree": str(cand.tree.resolve()),
            "alias": self.sshd.alias,
            "ssh_config": str(self.sshd.ssh_config),
        }
        job_file = self.root / f"job-{n}.json"
        job_file.write_text(json.dumps(job))
        logfile = self.root / f"worker-{n}-{cand.key}-{mode}.log"  # its stdout
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, str(job_file)]
        t0 = time.monotonic()
        with open(logfile, "wb") as log_f:
            # stderr (its progress, warnings) is ours; its own session: Ctrl-C reaches
            # only us, and we stop it (SIGTERM: it closes its kernels)
            self.proc = subprocess.Popen(
                cmd, env=self.env(cand), stdout=log_f, start_new_session=True
            )
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop_worker()
        self.proc = None  # (still set on Ctrl-C: main() stops it)
        result: dict[str, Any] = {}
        if out.exists():
            result = json.loads(out.read_text())
        if not result or (time.monotonic() - t0 >= timeout and "error" not in result):
            result["error"] = f"worker gave no result within {timeout:g}s"
        cand.leftovers += self.sweep(run_root)
        if "error" in result:
            cand.errors.append(f"{mode}: {result['error']}")
            log(f"  {cand.title} {mode}: {result['error']}")
        return result

    def stop_worker(self) -> None:
        """SIGTERM (the worker closes its kernels, bounded), then SIGKILL its group."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(45)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def sweep(self, run_root: Path | None = None, wait: float = 15.0) -> list[str]:
        """Our descendants but the sshd (the agent, kernels, sshd sessions) still there
        ``wait`` s after a worker ended, and run dirs left in ``run_root``: killed and
        removed, and returned. We are a subreaper: orphans stay below us."""
        keep = {self.me} | ({self.sshd.proc.pid} if self.sshd.proc is not None else set())
        found = sweep_descendants(self.me, keep, wait)
        if run_root is not None and run_root.exists():
            for path in sorted(run_root.iterdir()):
                found.append(f"run dir {path.name}")
            shutil.rmtree(run_root, ignore_errors=True)
        return found


def sweep_descendants(me: int, keep: set[int], wait: float) -> list[str]:
    """Our descendants but ``keep`` still there after ``wait`` s: killed, and returned
    (their command lines)."""
    deadline = time.monotonic() + wait
    while True:  # bounded by the deadline
        reap_zombies(me)
        table = procstat.process_table()
        extra = [p for p in procstat.descendants(me, table) if p not in keep]
        extra = [p for p in extra if table[p].state != "Z"]
        if not extra or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    found = [table[p].cmdline[:120] for p in extra]
    for pid in extra:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    reap_zombies(me)
    return found


def reap_zombies(me: int) -> None:
    """Reap orphans reparented to us once they exit (no Popen of ours is pending)."""
    for info in procstat.process_table().values():
        if info.ppid == me and info.state == "Z":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(info.pid, os.WNOHANG)


def measure(bench: Bench, cands: list[Candidate], args: argparse.Namespace) -> None:
    latency_job = {"rounds": args.rounds}
    for run in range(args.runs):  # alternating, so that drift hits both alike
        order = cands if run % 2 == 0 else cands[::-1]
        for cand in order:
            t0 = time.monotonic()
            res = bench.run_worker(cand, "latency", latency_job, timeout=300)
            cand.latency.append(res)
            if "error" not in res:
                log(
                    f"latency {run + 1}/{args.runs} {cand.title}: kernel_info "
                    f"{res['kernel_info_ms']:.2f} ms, 20 MB {res['print_s']:.2f} s "
                    f"({time.monotonic() - t0:.0f}s)"
                )
    scale_job = {
        "kernels": args.kernels,
        "idle_kernels": args.idle_kernels,
        "idle_seconds": args.idle_seconds,
    }
    most = max([*args.kernels, args.idle_kernels])
    timeout = 120 + 15 * most + args.idle_seconds + 60
    for cand in cands:  # one after the other: 64 ipykernels are ~4 GB
        log(f"scale: {cand.title}")
        cand.scale = bench.run_worker(cand, "scale", scale_job, timeout=timeout)


# -- the table ---------------------------------------------------------------------------


def spread(values: list[float], fmt: str) -> str:
    if not values:
        return "n/a"
    text = format(statistics.median(values), fmt)
    if len(values) > 1:
        text += f" ({format(min(values), fmt)}-{format(max(values), fmt)})"
    return text


def table(cands: list[Candidate], args: argparse.Namespace) -> str:
    tested, reference = cands[-1], cands[0] if len(cands) > 1 else None
    head = ["Metric", *(c.title for c in cands), "Target", "Met?"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def stage(cand: Candidate, count: int) -> dict[str, Any] | None:
        return next((s for s in cand.scale.get("stages", []) if s["kernels"] == count), None)

    def verdict(ok: bool | None) -> str:
        return "-" if ok is None else ("met" if ok else "NOT met")

    def row(metric: str, cells: list[str], target: str = "-", ok: bool | None = None) -> None:
        lines.append("| " + " | ".join([metric, *cells, target, verdict(ok)]) + " |")

    def scale_cell(cand: Candidate, count: int, key: str, fmt: str) -> str:
        st = stage(cand, count)
        if st is None:
            return f"error ({cand.scale.get('error', 'not measured')[:80]})"
        text = format(st[key], fmt)
        if st["running"] != count:
            text += f" ({st['running']} of {count} running)"
        return text

    for count in args.kernels:
        st = stage(tested, count)
        ok = st["threads"] <= MAX_THREADS if st else None
        cells = [scale_cell(c, count, "threads", "d") for c in cands]
        row(f"agent threads, {count} kernels with clients", cells, f"≤ {MAX_THREADS}", ok)
    for count in args.kernels:
        cells = [scale_cell(c, count, "rss_mib", ".1f") for c in cands]
        row(f"agent RSS, {count} kernels (MiB)", cells)
    peaks = [
        str(max((s["peak_threads_so_far"] for s in c.scale.get("stages", [])), default="n/a"))
        for c in cands
    ]
    row(f"agent threads, most seen while starting {CONCURRENCY} at a time", peaks)
    idle = [
        next((s["idle"] for s in c.scale.get("stages", []) if "idle" in s), None) for c in cands
    ]
    cells = [
        f"{i['cpu_s_per_min']:.3f} ({i['cpu_s']:.2f} in {i['seconds']:.0f} s)" if i else "n/a"
        for i in idle
    ]
    ok = idle[-1]["cpu_s_per_min"] <= MAX_IDLE_CPU_PER_MIN if idle[-1] else None
    row(
        f"agent CPU, {args.idle_kernels} idle kernels (CPU s per minute)",
        cells,
        f"≤ {MAX_IDLE_CPU_PER_MIN}",
        ok,
    )
    for key, metric, fmt in (
        ("kernel_info_ms", f"kernel_info round trip (ms; median of {args.rounds})", ".2f"),
        ("print_s", "20 MB printed by a cell (s)", ".3f"),
    ):
        values = [[r[key] for r in c.latency if key in r] for c in cands]
        cells = [
            spread(v, fmt) + (f", {len(v)} of {args.runs} runs" if len(v) < args.runs else "")
            for v in values
        ]
        ok = None
        if reference is not None and values[0] and values[-1]:
            # no worse within noise: our median at most the baseline's slowest run
            ok = statistics.median(values[-1]) <= max(values[0])
        target = "≤ the first column's slowest run" if reference is not None else "-"
        row(metric + f", median of {args.runs} runs (min-max)", cells, target, ok)
    row(
        "kernels that failed to start (scale)",
        [str(c.scale.get("failed_starts", "n/a")) for c in cands],
    )
    row("processes / run dirs left behind", [str(len(c.leftovers)) for c in cands])
    return "\n".join(lines)


def environment(args: argparse.Namespace, cands: list[Candidate], elapsed: float) -> str:
    import importlib.metadata as md

    versions = ", ".join(
        f"{m} {md.version(m)}" for m in ("jupyter_client", "ipykernel", "pyzmq", "asyncssh")
    )
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; "
        f"{len(os.sched_getaffinity(0))} cores; load at the end {load}",
        f"- python {platform.python_version()}, {versions}",
        f"- baseline: {args.baseline} (`git archive`); this tree: {this_revision()}",
        "- candidates: " + "; ".join(f"{c.title}: {c.tree}" for c in cands),
        f"- command: `python benchmarks/agent_scale.py {' '.join(sys.argv[1:])}` "
        f"({elapsed / 60:.1f} min)",
    ]
    for cand in cands:
        for item in cand.errors:
            lines.append(f"- {cand.title}: {item}")
        for item in cand.leftovers:
            lines.append(f"- left behind by {cand.title}: {item}")
        for err in cand.scale.get("start_errors", []):
            lines.append(f"- {cand.title}, a failed start: {err}")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 kernels, 20 s idle, 2 runs")
    parser.add_argument("--kernels", help="comma list of kernel counts (default 8,32,64)")
    parser.add_argument("--idle-kernels", type=int, help="kernels during the idle CPU reading")
    parser.add_argument("--idle-seconds", type=float)
    parser.add_argument("--runs", type=int, help="latency runs per candidate (default 5)")
    parser.add_argument("--rounds", type=int, default=200, help="kernel_info round trips a run")
    parser.add_argument("--baseline", default=BASELINE, help=f"commit (default {BASELINE})")
    parser.add_argument(
        "--candidates",
        default="baseline,this",
        help="comma list of baseline and this (the last one is judged; "
        "baseline,baseline tests the script on the baseline alone)",
    )
    parser.add_argument("--markdown", type=Path, help="also write the report to this file")
    parser.add_argument("--json", type=Path, help="write every result to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (worker logs)")
    args = parser.parse_args()
    if sys.platform != "linux":
        parser.error("the agent is read from /proc: Linux only")
    try:
        kernels = [int(k) for k in args.kernels.split(",")] if args.kernels else None
    except ValueError:
        parser.error("--kernels: a comma list of numbers")
    args.kernels = sorted(set(kernels or ([8] if args.quick else list(KERNELS))))
    if not args.kernels or min(args.kernels) < 1 or max(args.kernels) > 256:
        parser.error("--kernels: between 1 and 256")
    if args.idle_kernels is None:
        args.idle_kernels = min(IDLE_KERNELS, max(args.kernels))
    args.idle_kernels = max(1, min(256, args.idle_kernels))
    if args.idle_seconds is None:
        args.idle_seconds = 20.0 if args.quick else 60.0
    args.idle_seconds = max(1.0, min(600.0, args.idle_seconds))
    if args.runs is None:
        args.runs = 2 if args.quick else 5
    args.runs = max(1, min(50, args.runs))
    args.rounds = max(1, min(10_000, args.rounds))
    args.candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    if not args.candidates or set(args.candidates) - {"baseline", "this"}:
        parser.error("--candidates: a comma list of baseline and this")
    return args


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        return worker(sys.argv[2], Path(sys.argv[3]))
    args = parse_args()
    from support.sshd import find_sshd

    if find_sshd() is None:
        print("error: OpenSSH sshd not found (apt-get install openssh-server)", file=sys.stderr)
        return 1
    procstat.become_subreaper()
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="spk-agentscale-", dir="/tmp"))
    bench = Bench(root, args)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # cleanup below
    cands: list[Candidate] = []
    try:
        short = git("rev-parse", "--short", args.baseline)
        trees = {"this": REPO}
        if "baseline" in args.candidates:
            trees["baseline"] = baseline_tree(args.baseline, root)
        for n, key in enumerate(args.candidates):
            title = f"baseline {short}" if key == "baseline" else "this tree"
            if args.candidates.count(key) > 1:
                title += f" ({args.candidates[: n + 1].count(key)})"
            cands.append(Candidate(key, title, trees[key]))
        bench.sshd.start()
        log(f"sshd on 127.0.0.1:{bench.sshd.port}; temp dir {root}")
        measure(bench, cands, args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        bench.stop_worker()
        leftovers = bench.sweep(wait=5.0)
        if leftovers and cands:
            cands[-1].leftovers += leftovers
        bench.sshd.stop()
        signal.signal(signal.SIGTERM, previous)
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    text = (
        "## Agent at scale\n\n"
        + environment(args, cands, time.monotonic() - started)
        + "\n\n"
        + table(cands, args)
        + "\n"
    )
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({c.title: c.__dict__ for c in cands}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

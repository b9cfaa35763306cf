"""One benchmark driver process, run by ``run.py`` in the candidate's own interpreter.

The same file drives every candidate: a local ipykernel, this sshpyk (working tree)
and sshpyk 1.25 from PyPI (in its own venv). It only uses jupyter_client's public API
(``AsyncKernelManager``, ``AsyncIOLoopKernelManager`` for the restarter) and the
stdlib, so the numbers compare what a Jupyter client sees. It writes one JSON
document to ``--out``.

Modes:
  lifecycle   import cost, cold start, then warm start / restart / shutdown cycles
  latency     kernel_info round trips and printed-output throughput
  idle        CPU used by the client process tree while kernels sit idle (restarter polling)
  concurrent  many kernels started at once: total time, SSH connections, RSS per kernel
  reconnect   a kernel whose link run.py resets: seconds from the heal to the first
              kernel_info reply on the control channel (handshake through ``--sync``)
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import logging
import os
import queue
import re
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import procstat

# Provisioner module per candidate: imported up front so that "cold start" excludes
# the one-time import cost, which is reported on its own.
PROVISIONER_MODULES = {
    "local": "jupyter_client.provisioning.local_provisioner",
    "sshpyk": "sshpyk.provisioner",
    "sshpyk125": "sshpyk.provisioning",
}


def _imports(kind: str) -> dict[str, float]:
    """Import what a client needs, timing jupyter_client and the provisioner apart."""
    import importlib

    t0 = time.perf_counter()
    importlib.import_module("jupyter_client.manager")
    importlib.import_module("jupyter_client.ioloop")
    importlib.import_module("jupyter_client.asynchronous")
    t1 = time.perf_counter()
    importlib.import_module(PROVISIONER_MODULES[kind])
    t2 = time.perf_counter()
    return {"import_jupyter_client_s": t1 - t0, "import_provisioner_s": t2 - t1}


class _Steps(logging.Handler):
    """Captures the log lines in which this sshpyk (and asyncssh under it) says where a
    start's time went: sshpyk's own split ("ready in"), and a timeline of milestones
    (issue 26), each step the time from the milestone before it that was seen."""

    PATTERNS = {
        "pre_launch": re.compile(r"SSH connection and local forwards ready in ([\d.]+)s"),
        "ready": re.compile(
            r"ready in ([\d.]+)s: agent ([\d.]+)s, spawn ([\d.]+)s, sockets bound ([\d.]+)s"
        ),
    }
    #: (step key, what ends it: a logger name prefix and a message regex), in order; a
    #: step's time is from the last milestone seen before it (or start_kernel())
    MILESTONES = [
        ("ssh_setup", "asyncssh", re.compile(r"(Connecting to SSH server|Opening SSH conn)")),
        ("ssh_tcp", "asyncssh", re.compile(r"  Local address")),
        ("ssh_version_kexinit", "asyncssh", re.compile(r"Received key exchange request")),
        ("ssh_kex", "asyncssh", re.compile(r"Completed key exchange")),
        ("ssh_service", "asyncssh", re.compile(r"Beginning auth for user")),
        ("ssh_auth_none", "asyncssh", re.compile(r"Trying public key auth")),
        ("ssh_auth_query", "asyncssh", re.compile(r"Signing request")),
        ("ssh_auth_sign", "asyncssh", re.compile(r"Auth for user .* succeeded")),
        ("forwards", "", re.compile(r"SSH connection and local forwards ready")),
        ("channel_open", "asyncssh", re.compile(r"  Command: ")),
        ("code_asked", "sshpyk", re.compile(r"sending the agent's code")),
        ("agent_hello", "sshpyk", re.compile(r"agent pid \S+ up")),
        ("launch", "", re.compile(r"ready in [\d.]+s: agent")),
    ]

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.found: dict[str, float] = {}
        self.t0 = time.perf_counter()
        self.seen: list[tuple[str, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        now = time.perf_counter()
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to report
            return
        for key, logger, pattern in self.MILESTONES:
            if record.name.startswith(logger) and pattern.search(message):
                if key not in dict(self.seen):
                    self.seen.append((key, now))
                break
        if m := self.PATTERNS["pre_launch"].search(message):
            self.found["ssh_and_forwards_s"] = float(m.group(1))
        elif m := self.PATTERNS["ready"].search(message):
            for i, key in enumerate(("launch_s", "agent_s", "spawn_s", "sockets_bound_s"), 1):
                self.found[key] = float(m.group(i))

    def take(self) -> dict[str, float]:
        found, self.found = self.found, {}
        seen, self.seen = self.seen, []
        steps = {}
        last = self.t0
        for key, at in sorted(seen, key=lambda s: s[1]):
            steps[f"step_{key}_s"] = at - last
            last = at
        self.t0 = time.perf_counter()
        return {**{f"sshpyk_{k}": v for k, v in found.items()}, **steps}


STEPS = _Steps()


# -- talking to a kernel ----------------------------------------------------------------


async def _await_shell(kc: Any, accept: Callable[[dict[str, Any]], bool], timeout: float) -> Any:
    """The first shell message ``accept`` likes, or queue.Empty after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise queue.Empty
        msg = await kc.get_shell_msg(timeout=remaining)
        if accept(msg):
            return msg


def _reply_to(msg_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda msg: bool(msg["parent_header"].get("msg_id") == msg_id)


async def wait_ready(kc: Any, timeout: float, km: Any = None) -> None:
    """kernel_info until a reply comes (resent every 0.5 s, as a request sent into a
    connection that is being replaced can be lost). With ``km``, a kernel that died
    (e.g. a local kernel whose port was taken) fails at once."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        kc.kernel_info()
        try:
            await _await_shell(
                kc,
                lambda m: m["msg_type"] == "kernel_info_reply",
                min(0.5, max(0.01, deadline - loop.time())),
            )
            return
        except queue.Empty:
            # as jupyter_client's wait_for_ready: poll only after a silence (polling
            # costs sshpyk 1.25 several ssh commands)
            if km is not None and not await km.is_alive():
                raise RuntimeError("the kernel died while starting") from None
    raise TimeoutError(f"no kernel_info_reply within {timeout:g}s")


async def execute(kc: Any, code: str, timeout: float) -> dict[str, Any]:
    msg_id = kc.execute(code, store_history=False)
    try:
        reply = await _await_shell(kc, _reply_to(msg_id), timeout)
    except queue.Empty:
        raise TimeoutError(f"no execute_reply within {timeout:g}s") from None
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"execute failed: {reply['content']}")
    return dict(reply)


async def first_reply(
    kc: Any, timeout: float, km: Any = None, phases: dict[str, float] | None = None
) -> None:
    """Ready (kernel_info answered), then the first cell's execute_reply. ``phases``
    gets the seconds each of the two took."""
    t0 = time.perf_counter()
    await wait_ready(kc, timeout, km)
    t1 = time.perf_counter()
    await execute(kc, "pass", timeout)
    if phases is not None:
        phases["kernel_info_s"] = t1 - t0
        phases["execute_s"] = time.perf_counter() - t1


class Kernel:
    """A kernel manager and its client, as a Jupyter frontend holds them."""

    def __init__(self, name: str, restarter: bool = False) -> None:
        from jupyter_client.ioloop import AsyncIOLoopKernelManager
        from jupyter_client.manager import AsyncKernelManager

        cls = AsyncIOLoopKernelManager if restarter else AsyncKernelManager
        self.km = cls(kernel_name=name)
        self.kc: Any = None
        #: where the last start's time went: start_kernel(), the first kernel_info reply
        #: (resent every 0.5 s), the first execute reply
        self.phases: dict[str, float] = {}

    async def start(self, timeout: float, with_client: bool = True) -> float:
        """Start; return the seconds until the first execute reply."""
        STEPS.take()
        t0 = time.perf_counter()
        await asyncio.wait_for(self.km.start_kernel(), timeout)
        self.phases = {"start_kernel_s": time.perf_counter() - t0, **STEPS.take()}
        self.kc = self.km.client()
        self.kc.start_channels(hb=False)
        await first_reply(self.kc, timeout, self.km, self.phases)
        seconds = time.perf_counter() - t0
        if not with_client:
            self.kc.stop_channels()
            self.kc = None
        return seconds

    async def restart(self, timeout: float) -> float:
        t0 = time.perf_counter()
        await asyncio.wait_for(self.km.restart_kernel(), timeout)
        await first_reply(self.kc, timeout, self.km)
        return time.perf_counter() - t0

    async def shutdown(self, timeout: float) -> float:
        if self.kc is not None:
            self.kc.stop_channels()
            self.kc = None
        t0 = time.perf_counter()
        await asyncio.wait_for(self.km.shutdown_kernel(), timeout)
        return time.perf_counter() - t0

    async def close_quietly(self) -> None:
        """Best-effort cleanup after a failure (bounded)."""
        try:
            if self.kc is not None:
                self.kc.stop_channels()
                self.kc = None
            if self.km.has_kernel:
                await asyncio.wait_for(self.km.shutdown_kernel(now=True), 60)
        except Exception as exc:  # cleanup of an already failed run: report, go on
            print(f"cleanup failed: {exc!r}", file=sys.stderr)

    def local_pid(self) -> int | None:
        process = getattr(self.km.provisioner, "process", None)
        return getattr(process, "pid", None)


# -- modes ------------------------------------------------------------------------------


async def lifecycle(args: argparse.Namespace, out: dict[str, Any]) -> None:
    """Cold start (first kernel: no SSH connection yet), then ``--cycles`` times a warm
    start (the first kernel keeps the connection open), a restart and a shutdown; last the
    shutdown of the first kernel, which closes the connection."""
    holder = Kernel(args.kernel)
    kernels = [holder]
    try:
        out["cold_start_s"] = await holder.start(args.timeout)
        out["cold_phases"] = holder.phases
        for key in ("warm_start_s", "restart_s", "shutdown_s", "warm_phases"):
            out[key] = []
        for _ in range(args.cycles):
            kernel = Kernel(args.kernel)
            kernels.append(kernel)
            out["warm_start_s"].append(await kernel.start(args.timeout))
            out["warm_phases"].append(kernel.phases)
            out["restart_s"].append(await kernel.restart(args.timeout))
            out["shutdown_s"].append(await kernel.shutdown(args.timeout))
            kernels.remove(kernel)
        out["last_shutdown_s"] = await holder.shutdown(args.timeout)
        kernels.remove(holder)
    finally:
        for kernel in kernels:
            await kernel.close_quietly()


async def latency(args: argparse.Namespace, out: dict[str, Any]) -> None:
    kernel = Kernel(args.kernel)
    try:
        await kernel.start(args.timeout)
        kc = kernel.kc
        await kc.wait_for_ready(timeout=args.timeout)  # also proves IOPub is subscribed
        for _ in range(20):  # warm-up
            await wait_ready(kc, args.timeout)
        rounds = []
        cpu0 = _client_cpu()
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            await _await_shell(kc, _reply_to(kc.kernel_info()), 10)
            rounds.append(time.perf_counter() - t0)
        out["kernel_info_client_cpu_ms"] = (_client_cpu() - cpu0) / args.rounds * 1000
        out["kernel_info_ms"] = [r * 1000 for r in rounds]

        line_chars = 100_000  # 99,999 "x" and a newline per print
        lines = max(1, args.print_bytes // line_chars)
        code = f"s = 'x' * {line_chars - 1}\nfor _ in range({lines}):\n    print(s)\n"
        await printed(kc, "print('warm-up')", 0, args.timeout)
        out["printed_bytes"] = lines * line_chars
        cpu0 = _client_cpu()
        out["printed_s"] = [
            await printed(kc, code, lines * line_chars, args.timeout)
            for _ in range(args.print_reps)
        ]
        out["printed_client_cpu_s"] = (_client_cpu() - cpu0) / args.print_reps
        await kernel.shutdown(args.timeout)
    finally:
        await kernel.close_quietly()


def _client_cpu() -> float:
    """CPU seconds of this process and its descendants (an ssh ControlMaster included:
    we are its subreaper), not counting local kernels (a local candidate's children)."""
    me = os.getpid()
    table = procstat.process_table()
    kernels = [p for p in procstat.descendants(me, table) if "ipykernel" in table[p].cmdline]
    return procstat.cpu_seconds(me, kernels, table)


async def printed(kc: Any, code: str, expected: int, timeout: float) -> float:
    """Seconds from execute_request to the kernel's idle status, all stream text received."""
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    deadline = loop.time() + timeout
    msg_id = kc.execute(code, store_history=False)
    received = 0
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError(f"output not complete within {timeout:g}s ({received} bytes)")
        msg = await kc.get_iopub_msg(timeout=remaining)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            received += len(msg["content"]["text"])
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    seconds = time.perf_counter() - t0
    if expected and received != expected:
        raise RuntimeError(f"received {received} bytes of output, expected {expected}")
    return seconds


async def start_many(
    args: argparse.Namespace, count: int, restarter: bool, out: dict[str, Any] | None = None
) -> list[Kernel]:
    """Start ``count`` kernels at once. Any failure raises, unless ``out`` is given: then
    the failures are counted there and the kernels that did start are returned."""
    kernels = [Kernel(args.kernel, restarter=restarter) for _ in range(count)]
    results = await asyncio.gather(
        *(k.start(args.timeout, with_client=False) for k in kernels), return_exceptions=True
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    failed = [k for k, r in zip(kernels, results, strict=True) if isinstance(r, BaseException)]
    if errors and out is None:
        await asyncio.gather(*(k.close_quietly() for k in kernels))
        raise RuntimeError(f"{len(errors)} of {count} kernels failed to start: {errors[0]!r}")
    if errors and out is not None:
        out["failed_starts"] = len(errors)
        out["failed_start_error"] = f"{type(errors[0]).__name__}: {errors[0]}"[:300]
        await asyncio.gather(*(k.close_quietly() for k in failed))
    return [k for k in kernels if k not in failed]


async def shutdown_all(kernels: list[Kernel], timeout: float) -> float:
    t0 = time.perf_counter()
    results = await asyncio.gather(*(k.shutdown(timeout) for k in kernels), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        await asyncio.gather(*(k.close_quietly() for k in kernels))
        raise RuntimeError(f"{len(errors)} kernels failed to shut down: {errors[0]!r}")
    return time.perf_counter() - t0


async def idle(args: argparse.Namespace, out: dict[str, Any]) -> None:
    """``--kernels`` kernels, each with jupyter_client's restarter polling it (as Jupyter
    Server runs them), left idle for ``--seconds``. CPU is read from /proc."""
    me = os.getpid()
    kernels: list[Kernel] = []
    try:
        kernels = await start_many(args, args.kernels, restarter=True)
        for kernel in kernels:
            kernel.km.start_restarter()
        poll_interval = kernels[0].km._restarter.time_to_dead if kernels else 0
        await asyncio.sleep(args.settle)
        local_kernels = [p for k in kernels if (p := k.local_pid()) is not None]
        before = procstat.process_table()
        t0 = time.perf_counter()
        await asyncio.sleep(args.seconds)
        wall = time.perf_counter() - t0
        after = procstat.process_table()
        out["idle_seconds"] = wall
        out["idle_kernels"] = len(kernels)
        out["restarter_poll_interval_s"] = poll_interval
        out["client_cpu_s"] = procstat.cpu_seconds(me, local_kernels, after) - procstat.cpu_seconds(
            me, local_kernels, before
        )
        out["client_self_cpu_s"] = (after[me].cpu_self - before[me].cpu_self) if me in after else 0
        if local_kernels:
            out["local_kernels_cpu_s"] = sum(
                procstat.cpu_seconds(p, (), after) - procstat.cpu_seconds(p, (), before)
                for p in local_kernels
            )
        if args.kind == "local" or args.all_root:
            out["all_cpu_s"] = _everything_cpu(args, me, after) - _everything_cpu(args, me, before)
        tree = procstat.descendants(me, after)
        out["client_processes"] = sorted(
            {after[p].cmdline.split(" ")[0].rsplit("/", 1)[-1] for p in tree if p != me} - {""}
        )
        for kernel in kernels:
            kernel.km.stop_restarter()
        out["shutdown_all_s"] = await shutdown_all(kernels, args.timeout)
        kernels = []
    finally:
        for kernel in kernels:
            kernel.km.stop_restarter()
        await asyncio.gather(*(k.close_quietly() for k in kernels))


def _everything_cpu(
    args: argparse.Namespace, me: int, table: dict[int, procstat.ProcInfo]
) -> float:
    """CPU so far of every process serving this candidate's kernels.

    A local kernel uses no other process: this tree, kernels included. Otherwise all that
    run.py started (this client, sshd and its sessions, remote agents and kernels,
    orphans reparented to it) but run.py itself and other drivers running at the same
    time (run.py only ever runs a local-kernel driver beside this one)."""
    if args.kind == "local" or not args.all_root:
        return procstat.cpu_seconds(me, (), table)
    return _all_cpu(args.all_root, me, table)


def _all_cpu(root: int, me: int, table: dict[int, procstat.ProcInfo]) -> float:
    others = [
        info.pid
        for info in table.values()
        if info.ppid == root and info.pid != me and "driver.py" in info.cmdline
    ]
    total = procstat.cpu_seconds(root, others, table)
    if root in table:  # not run.py itself, nor the drivers it reaped (cutime)
        total -= table[root].cpu_self + table[root].cpu_children
    return total


class ConnectionSampler:
    """Counts ESTABLISHED TCP connections to the sshd port every 50 ms (a thread)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.port:
                self.peak = max(self.peak, procstat.established_to_port(self.port))
            self._stop.wait(0.05)

    def __enter__(self) -> ConnectionSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


async def concurrent(args: argparse.Namespace, out: dict[str, Any]) -> None:
    """``--kernels`` kernels started at once with asyncio.gather."""
    me = os.getpid()
    rss0 = procstat.rss_bytes(me)
    kernels: list[Kernel] = []
    try:
        with ConnectionSampler(args.sshd_port) as sampler:
            before = procstat.process_table()
            t0 = time.perf_counter()
            kernels = await start_many(args, args.kernels, restarter=False, out=out)
            out["concurrent_start_s"] = time.perf_counter() - t0
            after = procstat.process_table()
            out["concurrent_all_cpu_s"] = _everything_cpu(args, me, after) - _everything_cpu(
                args, me, before
            )
            out["cores"] = len(os.sched_getaffinity(0))
            out.setdefault("failed_starts", 0)
            out["ssh_connections_now"] = (
                procstat.established_to_port(args.sshd_port) if args.sshd_port else None
            )
        out["ssh_connections_peak"] = sampler.peak if args.sshd_port else None
        out["concurrent_kernels"] = len(kernels)
        rss1 = procstat.rss_bytes(me)
        out["driver_rss_before_mib"] = rss0 / 2**20
        out["driver_rss_after_mib"] = rss1 / 2**20
        out["rss_per_kernel_mib"] = (rss1 - rss0) / 2**20 / max(1, len(kernels))
        table = procstat.process_table()
        local_kernels = {p for k in kernels if (p := k.local_pid()) is not None}
        skip: set[int] = set()
        for pid in local_kernels:
            skip.update(procstat.descendants(pid, table))
        helpers = [p for p in procstat.descendants(me, table) if p != me and p not in skip]
        out["client_helper_processes"] = len(helpers)
        out["client_helper_rss_mib"] = sum(table[p].rss for p in helpers) / 2**20
        out["concurrent_shutdown_s"] = await shutdown_all(kernels, args.timeout)
        kernels = []
    finally:
        await asyncio.gather(*(k.close_quietly() for k in kernels))


def _wait_file(path: Path, timeout: float) -> str:
    """The text of ``path`` once run.py has written it (polled every 5 ms, bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return path.read_text()
        time.sleep(0.005)
    raise TimeoutError(f"run.py did not write {path.name} within {timeout:g}s")


async def _first_control_reply(kc: Any, resend: float, limit: float) -> float | None:
    """Send kernel_info_request on the control channel every ``resend`` s until a reply to
    any of them arrives (a request sent into a dead link may be answered late, or never);
    the time.monotonic() of that reply, None after ``limit`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    sent: set[str] = set()
    while loop.time() < deadline:
        request = kc.session.msg("kernel_info_request")
        sent.add(request["header"]["msg_id"])
        kc.control_channel.send(request)
        until = min(deadline, loop.time() + resend)
        while (remaining := until - loop.time()) > 0:
            try:
                msg = await kc.control_channel.get_msg(timeout=remaining)
            except queue.Empty:
                break
            if msg["parent_header"].get("msg_id") in sent:
                return time.monotonic()
    return None


async def reconnect(args: argparse.Namespace, out: dict[str, Any]) -> None:
    """One kernel, managed as Jupyter Server manages it (``AsyncIOLoopKernelManager`` and
    its restarter polling ``is_alive()``: sshpyk 1.25 reopens its forwards from there).
    Handshake with run.py through files in ``--sync``: we write ``ready``; run.py resets
    the link and holds it down (``down``), then heals it and writes ``healed`` with its
    time.monotonic() (one clock for both processes on Linux). From ``down`` on we send
    kernel_info on the control channel every ``--resend`` s; the result is the first
    reply's time minus the heal's."""
    sync = Path(args.sync)
    kernel = Kernel(args.kernel, restarter=True)
    restarts: list[str] = []
    try:
        await kernel.start(args.timeout)
        kc = kernel.kc
        await kc.wait_for_ready(timeout=args.timeout)
        for _ in range(5):  # the control channel is connected and answers
            if await _first_control_reply(kc, 1.0, 10.0) is None:
                raise TimeoutError("no kernel_info reply on the control channel before the reset")
        kernel.km.add_restart_callback(lambda: restarts.append("restart"), "restart")
        kernel.km.add_restart_callback(lambda: restarts.append("dead"), "dead")
        kernel.km.start_restarter()
        out["restarter_poll_interval_s"] = kernel.km._restarter.time_to_dead
        (sync / "ready").write_text("")
        await asyncio.to_thread(_wait_file, sync / "down", 30)
        replied = await _first_control_reply(kc, args.resend, args.reconnect_limit)
        healed = float(await asyncio.to_thread(_wait_file, sync / "healed", 30))
        out["outage_s"] = healed - float((sync / "down").read_text())
        out["restarted_by_restarter"] = restarts
        if replied is None:
            out["reconnect_failed"] = (
                f"no kernel_info reply within {args.reconnect_limit - out['outage_s']:.0f}s of the "
                "heal" + (f" (restarter: {', '.join(restarts)})" if restarts else "")
            )
        else:
            out["reconnect_s"] = replied - healed
        kernel.km.stop_restarter()
        if replied is not None:
            out["shutdown_s"] = await kernel.shutdown(args.timeout)
    finally:
        kernel.km.stop_restarter()
        await kernel.close_quietly()


MODES = {
    "lifecycle": lifecycle,
    "latency": latency,
    "idle": idle,
    "concurrent": concurrent,
    "reconnect": reconnect,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=sorted(MODES))
    parser.add_argument("--kind", choices=sorted(PROVISIONER_MODULES), required=True)
    parser.add_argument("--kernel", required=True, help="kernelspec name")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--timeout", type=float, default=120.0, help="per operation")
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--print-bytes", type=int, default=20_000_000)
    parser.add_argument("--print-reps", type=int, default=3)
    parser.add_argument("--kernels", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument("--sshd-port", type=int, default=0)
    parser.add_argument("--all-root", type=int, default=0, help="pid of run.py")
    parser.add_argument("--sync", default="", help="reconnect: the handshake dir with run.py")
    parser.add_argument("--resend", type=float, default=0.25, help="reconnect: resend period")
    parser.add_argument(
        "--reconnect-limit", type=float, default=40.0, help="reconnect: give up after S s"
    )
    parser.add_argument(
        "--log-level", default="WARNING", help="of the kernel managers' and sshpyk's log"
    )
    parser.add_argument(
        "--stacks-after", type=float, default=0, help="dump all stacks to stderr after S s"
    )
    args = parser.parse_args()
    if args.stacks_after > 0:  # run.py kills a stuck driver later: the log then says where
        faulthandler.dump_traceback_later(args.stacks_after, exit=False)
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")
    level = logging.getLevelName(args.log_level.upper())
    level = level if isinstance(level, int) else logging.WARNING
    for handler in logging.getLogger().handlers:  # stderr: as asked
        handler.setLevel(level)
    for name in ("traitlets", "sshpyk", "asyncssh"):  # and the provisioner's, asyncssh's
        logger = logging.getLogger(name)
        # DEBUG for STEPS' milestones (asyncssh's at its debug level 1: no packets)
        logger.setLevel(min(level, logging.DEBUG if name != "traitlets" else logging.INFO))
        logger.addHandler(STEPS)

    # Orphans (an ssh ControlMaster that daemonizes) stay in our tree and are counted.
    out: dict[str, Any] = {"mode": args.mode, "kind": args.kind, "python": sys.version.split()[0]}
    out["subreaper"] = procstat.become_subreaper()
    out.update(_imports(args.kind))
    # local kernels are our children: let them use the installed packages' bytecode
    os.environ.pop("PYTHONPYCACHEPREFIX", None)
    import jupyter_client

    out["jupyter_client"] = jupyter_client.__version__
    try:
        asyncio.run(MODES[args.mode](args, out))
    except BaseException as exc:
        out["error"] = f"{type(exc).__name__}: {exc}".strip()
        traceback.print_exc()
    args.out.write_text(json.dumps(out, indent=1))
    if "error" not in out:
        summary = {k: v for k, v in out.items() if isinstance(v, (int, float))}
        for key, value in out.items():
            if isinstance(value, list) and value and isinstance(value[0], (int, float)):
                summary[key + "_median"] = statistics.median(value)
        print(json.dumps(summary))
    return 1 if "error" in out else 0


if __name__ == "__main__":
    sys.exit(main())

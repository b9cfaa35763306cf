"""The sections: one function per section runs its drivers through the :class:`Bench`
and puts their samples into the :class:`Report` of the RTT being measured."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tunnel

from .common import BENCHMARKS, TITLES, log
from .report import HANDSHAKE_STEPS, Report
from .runner import Bench, DriverRun
from .stats import percentile

__all__ = ["RUNNERS", "count_proxy"]


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
            for phase in cold:  # the SSH handshake: TCP connect to auth success (issue 26)
                steps = [phase.get(f"step_{key}_s") for key in HANDSHAKE_STEPS]
                if all(v is not None for v in steps):
                    report.add(name, "ssh_handshake_s", sum(steps))


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


#: section name -> its function, in the order run.py runs them
def run_spare(bench: Bench, report: Report) -> None:
    """Warm spare kernels (``prestart``): benchmarks/prestart.py at this RTT, with its own
    throwaway sshd and delay proxy; sshpyk only."""
    if "sshpyk" not in bench.names:
        return
    s = bench.settings
    out = bench.root / f"prestart-{bench.rtt}.json"
    reps = max(2, min(s.reps, 3))
    command = [sys.executable, str(BENCHMARKS / "prestart.py"), "--rtts", str(bench.rtt)]
    command += ["--reps", str(reps), "--json", str(out)]
    log(f"spare: prestart.py at {bench.rtt} ms, {reps} reps")
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=s.driver_timeout, check=False
    )
    if done.returncode != 0 or not out.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        report.error("sshpyk", ["spare_start_s", "spare_fresh_s"], tail[0])
        return
    (row,) = json.loads(out.read_text())
    for value in row["spare"]:
        report.add("sshpyk", "spare_start_s", value)
    for value in row["fresh"]:
        report.add("sshpyk", "spare_fresh_s", value)


RUNNERS: dict[str, Callable[[Bench, Report], None]] = {
    "lifecycle": run_lifecycle,
    "latency": run_latency,
    "reconnect": run_reconnect,
    "tunnel": run_tunnel,
    "idle": run_idle,
    "concurrent": run_concurrent,
    "spare": run_spare,
}

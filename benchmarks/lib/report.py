"""The report: :class:`Report` holds the samples of one RTT and draws its tables;
:func:`environment` and :func:`git_revision` say what ran where."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tunnel

from .common import GCM, REPO, TITLES
from .settings import Settings
from .stats import Stat, cell, ratio

__all__ = [
    "HANDSHAKE_STEPS",
    "IN_RTTS",
    "NO_RATIO",
    "ROWS",
    "Report",
    "Row",
    "environment",
    "git_revision",
]


@dataclass
class Row:
    key: str
    label: str
    unit: str
    fmt: str
    stats: dict[str, Stat | None]
    errors: dict[str, str] = field(default_factory=dict)


#: a cold start step by step (issue 26), from the log lines of sshpyk and asyncssh (the
#: driver's STEPS.MILESTONES): each row is the time from the milestone before it
TIMELINE = [
    ("ssh_setup", "…… step by step: ssh config, keys, until the TCP connect"),
    ("ssh_tcp", "…… TCP handshake"),
    ("ssh_version_kexinit", "…… SSH version exchange, KEXINIT"),
    ("ssh_kex", "…… key exchange (ECDH), NEWKEYS"),
    ("ssh_service", "…… service request (ssh-userauth)"),
    ("ssh_auth_none", "…… auth `none` probe"),
    ("ssh_auth_query", "…… public key query (PK_OK)"),
    ("ssh_auth_sign", "…… signed public key auth"),
    ("forwards", "…… local forwards, sshpyk's connection set-up"),
    ("channel_open", "…… agent: channel open"),
    ("code_asked", "…… agent: exec, loader, cache miss: code asked for"),
    ("agent_hello", "…… agent: exec + loader + code (cache or upload) + hello"),
    ("launch", "…… launch (sent with the hello) until the kernel's sockets are bound"),
]

#: the steps of TIMELINE that make the SSH handshake (TCP connect to auth success)
HANDSHAKE_STEPS = [key for key, _ in TIMELINE if key.startswith("ssh_") and key != "ssh_setup"]

#: where a start's time goes: the driver's split, and sshpyk's own (from its log)
PHASES = [
    ("start_kernel_s", "… of which `start_kernel()`"),
    ("sshpyk_ssh_and_forwards_s", "…… in it (sshpyk's log): SSH connection and local forwards"),
    ("sshpyk_agent_s", "…… then the remote agent up"),
    ("sshpyk_spawn_s", "…… then the kernel spawned"),
    ("sshpyk_sockets_bound_s", "…… then the kernel's sockets bound"),
    *[(f"step_{key}_s", label) for key, label in TIMELINE],
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
    ("ssh_handshake_s", "… the SSH handshake in it: TCP connect to auth success", "s", ".2f"),
    ("warm_start_s", "Warm start → first execute reply", "s", ".2f"),
    *PHASE_ROWS["warm"],
    ("restart_s", "Restart → first execute reply", "s", ".2f"),
    ("spare_start_s", "Warm spare start → first kernel_info reply (prestart.py)", "s", ".3f"),
    ("spare_fresh_s", "… the same without a spare (a fresh kernel, prestart.py)", "s", ".3f"),
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
    "ssh_handshake_s",
    "spare_start_s",
    "spare_fresh_s",
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

    def as_json(self) -> dict[str, Any]:
        """Every sample, error and fact (``--json``)."""
        return {
            "samples": self.samples,
            "errors": self.errors,
            "not_available": self.na,
            "facts": self.facts,
            "tunnel": [t.__dict__ for t in self.tunnel],
            "link": self.link_note,
        }

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

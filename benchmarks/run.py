"""Side-by-side benchmarks: a local ipykernel, this sshpyk, and sshpyk 1.25 from PyPI.

    python benchmarks/run.py            # RTT 0, 20 and 100 ms (about 8 minutes on 2 cores)
    python benchmarks/run.py --quick    # a smaller run for development (about 4 minutes)
    python benchmarks/run.py --rtts 0 --sections all   # loopback, every section

One throwaway OpenSSH sshd on 127.0.0.1 (tests/support/sshd.py) serves both SSH candidates;
the "remote" Python is this machine's, so all three run the same ipykernel. Each
candidate is driven by ``driver.py`` in its own interpreter: this Python for the local
kernel and for sshpyk (the working tree), ``benchmarks/.venv-sshpyk125`` (made here on
first use) for sshpyk 1.25. For each ``--rtts`` value r > 0 both SSH candidates reach
the sshd through a delay proxy (``lib/proxy.py``, r/2 ms each way); the local kernel
has no network and is measured once. The script prints one Markdown report
(environment, then per RTT the table and its targets) and writes it to ``--markdown``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(HERE))

import procstat  # noqa: E402
from lib.common import CANDIDATES, TITLES, BenchError, log  # noqa: E402
from lib.proxy import link_summary  # noqa: E402
from lib.report import Report, environment, git_revision  # noqa: E402
from lib.runner import Bench, workdir  # noqa: E402
from lib.sections import RUNNERS  # noqa: E402
from lib.settings import DEFAULT_RTTS, DEFAULT_SECTIONS, RTT_SECTIONS, SECTIONS, Settings  # noqa: E402
from lib.targets import targets_table  # noqa: E402
from lib.venv125 import VENV_125  # noqa: E402

__all__ = ["main"]


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


def parse_args() -> tuple[argparse.Namespace, list[str], list[str], list[int], Settings]:
    """The arguments, and from them: sections, candidates, RTTs and settings."""
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
    parser.add_argument(
        "--share-persist",
        type=float,
        default=0.0,
        help="sshpyk's connection_persist: 0 (default), each driver logs in itself; > 0, "
        "through a connection broker of this run's (a cold start then starts it)",
    )
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
    settings.share_persist = max(0.0, args.share_persist)
    names = [n for n in CANDIDATES if n in names]
    return args, sections, names, rtts, settings


def measure(
    bench: Bench, settings: Settings, sections: list[str], rtts: list[int]
) -> dict[int, Report]:
    """Warm-up, then every RTT's sections; the reports of the RTTs measured so far."""
    reports: dict[int, Report] = {}
    names = bench.names
    bench.start()
    log("warm-up: one untimed start per candidate (bytecode caches, page cache)")
    for name in names:
        bench.driver(name, "lifecycle", "--cycles", "0", label="warm-up")
    for rtt in rtts:
        bench.rtt = rtt
        bench.settings = settings.at(rtt)
        report = reports[rtt] = Report(names, bench.settings)
        log(f"RTT {rtt} ms" + (" (loopback)" if rtt == 0 else " (delay proxy)"))
        for section, run_section in RUNNERS.items():
            if section not in sections or (rtt and section not in RTT_SECTIONS):
                continue
            if section == "tunnel" and "sshpyk" not in names:
                continue
            log(f"section {section} (RTT {rtt} ms)")
            run_section(bench, report)
        bench.local_done = bench.local_done or "local" in names
        if rtt and rtt in bench.proxies:
            report.link_rtt_ms, report.link_note = link_summary(bench.proxies[rtt], rtt)
    return reports


def complete(reports: dict[int, Report], bench: Bench) -> None:
    """The local kernel's samples into every RTT's report (it has no network: measured
    once), and the whole run's leftovers and failed runs into the first report."""
    first = next(iter(reports.values()))
    for report in reports.values():
        if report is first or "local" not in bench.names:
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


def results(report: Report, reset_on_loopback: bool) -> str:
    """One RTT's part of the report: what the numbers are, the table, the targets."""
    s, rtt = report.settings, report.rtt
    title = "loopback" if rtt == 0 else f"{rtt} ms RTT"
    parts = [f"\n## Results: {title}\n"]
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
    elif reset_on_loopback:
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
    parts += [f"\n### Targets: {title}\n", targets_table(report)]
    return "\n".join(parts)


def main() -> int:
    args, sections, names, rtts, settings = parse_args()
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
            reports = measure(bench, settings, sections, rtts)
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
        complete(reports, bench)
    elapsed = time.monotonic() - started
    python_125 = str(VENV_125 / "bin" / "python") if "sshpyk125" in names else None
    parts = [
        "## Environment\n",
        environment(python_125, load_start),
        f"- date (UTC, start): {date_utc}; sshpyk: `{revision}`",
        f"- command: `{command}` ({elapsed / 60:.1f} min)",
    ]
    parts += [results(report, reset_on_loopback=0 in bench.proxies) for report in reports.values()]
    text = "\n".join(parts) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(
            json.dumps({str(rtt): r.as_json() for rtt, r in reports.items()}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

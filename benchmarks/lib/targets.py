"""The targets of each RTT's report: :data:`TARGETS`, one row per target, evaluated by
:func:`targets_table`.

A row names the section whose numbers it reads, where it applies (every RTT, or loopback
only), the measure (``column.key``: the median of a Report column's samples, or a
derived measure of :func:`measures`), how it is compared (alone, as a ratio to a
reference, or against a reference plus an allowance), the limit, and the text of the
"Measured" cell. The text is a ``str.format`` template over these fields:

========  ===============================================================================
v         the measure;  ``r``: the reference;  ``x``: v / r;  ``d``: v - r
limit     what v (or x, for a ratio) is compared with: ``limit``, + ``per_rtt`` x the RTT,
          + r for ``vs="+"``
over      v - the RTT (in the target's unit);  ``d_rtt``: d in RTTs (only at RTT > 0)
rtt       the RTT in ms;  ``concurrent``: kernels started at once (the settings)
local...  every column's medians by key (``{local.kernel_info_ms}``), ``tunnel.*`` and
          ``link.rtt_ms`` (the delay proxy's own RTT as delivered)
========  ===============================================================================

``notes`` are appended to the text, each only when every field it names was measured. A
target whose measure or reference was not measured gets no row.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import tunnel

from .common import GCM
from .report import Report

__all__ = ["TARGETS", "Target", "measures", "targets_table"]

#: where a target applies
EVERY_RTT, LOOPBACK = "every RTT", "loopback"


@dataclass(frozen=True)
class Target:
    section: str
    where: str  # EVERY_RTT or LOOPBACK
    label: str  # may name {concurrent}
    measure: str  # "column.key" (see measures())
    op: str  # "<=" or ">="
    limit: float
    text: str
    #: "": v op limit; "x": v / reference op limit; "+": v op reference + limit
    vs: str = ""
    reference: str = ""
    #: the limit grows by this many RTTs (in ``unit``)
    per_rtt: float = 0.0
    unit: str = "s"
    notes: tuple[str, ...] = ()


TARGETS = [
    Target(
        "lifecycle",
        LOOPBACK,
        "cold start ≤ 1.25x local",
        "sshpyk.cold_start_s",
        "<=",
        1.25,
        "{v:.2f}s vs {r:.2f}s = {x:.2f}x",
        vs="x",
        reference="local.cold_start_s",
    ),
    Target(
        "lifecycle",
        EVERY_RTT,
        "cold start ≤ 0.5x sshpyk 1.25",
        "sshpyk.cold_start_s",
        "<=",
        0.5,
        "{v:.2f}s vs {r:.2f}s = {x:.2f}x",
        vs="x",
        reference="sshpyk125.cold_start_s",
    ),
    Target(
        "lifecycle",
        EVERY_RTT,
        "cold start ≤ local start + 6 RTT",
        "sshpyk.cold_start_s",
        "<=",
        0.0,
        "{v:.2f}s vs {r:.2f}s + 6 x {rtt} ms = {limit:.2f}s; sshpyk - local = {d:.2f}s",
        vs="+",
        reference="local.cold_start_s",
        per_rtt=6,
        notes=(" = {d_rtt:.1f} RTT",),
    ),
    # issue 26: round trips on real links
    Target(
        "lifecycle",
        EVERY_RTT,
        "cold start ≤ local + SSH handshake + 3 RTT (issue 26)",
        "sshpyk.cold_start_s",
        "<=",
        0.0,
        "{v:.2f}s vs {local.cold_start_s:.2f}s + {sshpyk.ssh_handshake_s:.2f}s + 3 x {rtt} ms"
        " = {limit:.2f}s",
        vs="+",
        reference="derived.cold_floor",
        per_rtt=3,
        notes=(" (sshpyk = local + handshake + {d_rtt:.1f} RTT)",),
    ),
    Target(
        "reconnect",
        EVERY_RTT,
        "reconnect after a reset ≤ SSH handshake + 2 RTT (issue 26)",
        "sshpyk.reconnect_s",
        "<=",
        0.0,
        "{v:.2f}s vs {r:.2f}s + 2 x {rtt} ms = {limit:.2f}s",
        vs="+",
        reference="sshpyk.ssh_handshake_s",
        per_rtt=2,
    ),
    Target(
        "spare",
        EVERY_RTT,
        "warm spare start ≤ 3 RTT + 50 ms (issue 26)",
        "sshpyk.spare_start_s",
        "<=",
        0.05,
        "{v:.3f}s vs 3 x {rtt} ms + 50 ms = {limit:.3f}s",
        per_rtt=3,
    ),
    Target(
        "latency",
        EVERY_RTT,
        "kernel_info ≤ RTT + 1 ms",
        "sshpyk.kernel_info_ms",
        "<=",
        1.0,
        "{v:.2f} ms vs {rtt} + 1 ms: +{over:.2f} ms over the RTT",
        per_rtt=1,
        unit="ms",
        notes=(
            "; the local kernel alone: {local.kernel_info_ms:.2f} ms",
            "; the proxy's own RTT as delivered: {link.rtt_ms:.2f} ms",
        ),
    ),
    Target(
        "lifecycle",
        LOOPBACK,
        "warm start ≤ 1.1x local",
        "sshpyk.warm_start_s",
        "<=",
        1.1,
        "{v:.2f}s vs {r:.2f}s = {x:.2f}x",
        vs="x",
        reference="local.warm_start_s",
    ),
    Target(
        "latency",
        LOOPBACK,
        "kernel_info ≤ local + 0.5 ms",
        "sshpyk.kernel_info_ms",
        "<=",
        0.5,
        "{v:.2f} ms vs {r:.2f} ms (+{d:.2f} ms)",
        vs="+",
        reference="local.kernel_info_ms",
        unit="ms",
    ),
    Target(
        "latency",
        LOOPBACK,
        f"kernel_info ≤ local + 0.5 ms, with `Ciphers {GCM}`",
        "sshpyk.kernel_info_ms_gcm",
        "<=",
        0.5,
        "{v:.2f} ms vs {r:.2f} ms (+{d:.2f} ms)",
        vs="+",
        reference="local.kernel_info_ms",
        unit="ms",
    ),
    Target(
        "tunnel",
        LOOPBACK,
        "raw tunnel ≥ 0.9x OpenSSH (best cipher for us vs OpenSSH's default)",
        "tunnel.best",
        ">=",
        0.9,
        "ForwardSet {tunnel.best_cipher} {v:.0f} MiB/s vs ssh -L {tunnel.openssh_cipher} "
        "{r:.0f} MiB/s = {x:.2f}x",
        vs="x",
        reference="tunnel.openssh",
        unit="MiB/s",
    ),
    Target(
        "tunnel",
        LOOPBACK,
        "raw tunnel ≥ 0.9x OpenSSH (same cipher)",
        "tunnel.best",
        ">=",
        0.9,
        "{v:.0f} vs {r:.0f} MiB/s ({tunnel.best_cipher}) = {x:.2f}x",
        vs="x",
        reference="tunnel.openssh_same",
        unit="MiB/s",
    ),
    Target(
        "idle",
        LOOPBACK,
        "idle client CPU ≤ 0.1x sshpyk 1.25",
        "sshpyk.idle_client_cpu_s",
        "<=",
        0.1,
        "{v:.2f} vs {r:.2f} CPU s = {x:.3f}x",
        vs="x",
        reference="sshpyk125.idle_client_cpu_s",
    ),
    Target(
        "concurrent",
        LOOPBACK,
        "{concurrent} concurrent starts ≤ 3x a single start",
        "sshpyk.concurrent_vs_single",
        "<=",
        3.0,
        "{v:.1f}x",
        unit="x",
        notes=(" (local: {local.concurrent_vs_single:.1f}x)",),
    ),
    Target(
        "concurrent",
        LOOPBACK,
        "SSH connections for {concurrent} kernels = 1",
        "concurrent.ssh_connections_peak",
        "<=",
        1,
        "peak {v:.0f}",
        unit="",
    ),
]


class _Measures(SimpleNamespace):
    """Medians by key; a key that was not measured is an AttributeError (the note that
    names it is left out)."""


def measures(report: Report) -> dict[str, _Measures]:
    """Every measure a target may name, by namespace: one per column (the median of each
    key), ``tunnel`` (best/best_cipher: this ForwardSet's best median and its negotiated
    cipher; openssh/openssh_cipher: ``ssh -L`` with OpenSSH's default cipher;
    openssh_same: ``ssh -L`` with the cipher of our best), ``concurrent``
    (ssh_connections_peak: sshpyk's peak over the runs) and ``link`` (rtt_ms)."""
    found: dict[str, _Measures] = {}
    for name in report.names:
        found[name] = _Measures(
            **{
                key: statistics.median(values)
                for key, values in report.samples[name].items()
                if values
            }
        )
    tun = _Measures()
    ossh = [r for r in report.tunnel if r.label == tunnel.OPENSSH and r.mib_per_s]
    ours = [r for r in report.tunnel if r.label == tunnel.FORWARDSET and r.mib_per_s]
    default = [r for r in ossh if r.requested == "default"]
    if default and ours:
        best = max(ours, key=lambda r: statistics.median(r.mib_per_s))
        tun.best, tun.best_cipher = statistics.median(best.mib_per_s), best.cipher
        tun.openssh = statistics.median(default[0].mib_per_s)
        tun.openssh_cipher = default[0].cipher
        # the same negotiated cipher: with no Ciphers line the two pick different ones
        # (OpenSSH chacha20-poly1305, sshpyk AES-GCM), so match on .cipher, not .requested
        same = next((r for r in ossh if r.cipher == best.cipher), None)
        if same is not None:
            tun.openssh_same = statistics.median(same.mib_per_s)
    found["tunnel"] = tun
    conc = _Measures()
    peak = report.stat("sshpyk", "ssh_connections_peak")
    if peak is not None:
        conc.ssh_connections_peak = max(peak.values)
    found["concurrent"] = conc
    link = _Measures()
    if report.link_rtt_ms is not None:
        link.rtt_ms = report.link_rtt_ms
    found["link"] = link
    derived = _Measures()
    local, ours = found.get("local"), found.get("sshpyk")
    if hasattr(local, "cold_start_s") and hasattr(ours, "ssh_handshake_s"):
        derived.cold_floor = local.cold_start_s + ours.ssh_handshake_s
    found["derived"] = derived
    return found


def _lookup(found: dict[str, _Measures], name: str) -> Any:
    space, _, key = name.partition(".")
    return getattr(found.get(space), key, None)


def evaluate(target: Target, report: Report, found: dict[str, _Measures]) -> str | None:
    """The target's table row, or None when it does not apply or was not measured."""
    rtt = report.rtt
    if target.where == LOOPBACK and rtt:
        return None
    v = _lookup(found, target.measure)
    r = _lookup(found, target.reference) if target.reference else None
    if v is None or (target.reference and not r):  # not measured (or a zero reference)
        return None
    rtt_unit = {"s": rtt / 1000, "ms": float(rtt)}.get(target.unit, 0.0)
    fields: dict[str, Any] = {**found, "v": v, "rtt": rtt, "over": v - rtt_unit}
    fields["concurrent"] = report.settings.concurrent
    limit = target.limit + target.per_rtt * rtt_unit
    compared = v
    if r is not None:
        fields.update(r=r, x=v / r, d=v - r)
        if rtt_unit:
            fields["d_rtt"] = (v - r) / rtt_unit
        if target.vs == "x":
            compared = v / r
        elif target.vs == "+":
            limit += r
    fields["limit"] = limit
    met = compared <= limit if target.op == "<=" else compared >= limit
    text = target.text.format(**fields)
    for note in target.notes:
        try:
            text += note.format(**fields)
        except (AttributeError, KeyError):  # a field it names was not measured
            pass
    label = target.label.format(**fields)
    return f"| {label} | {text} | {'met' if met else 'NOT met'} |"


def targets_table(report: Report) -> str:
    """The Markdown table of the targets that apply to the report's RTT."""
    found = measures(report)
    rows = [row for t in TARGETS if (row := evaluate(t, report, found)) is not None]
    if not rows:
        return "(nothing measured that a target needs)"
    return "| Target | Measured | Status |\n|---|---|---|\n" + "\n".join(rows)

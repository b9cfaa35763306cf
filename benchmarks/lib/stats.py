"""Statistics of the samples and how a table cell shows them."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

__all__ = ["Stat", "cell", "percentile", "ratio"]


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


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]

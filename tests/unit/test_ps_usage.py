"""`sshpyk ps`'s cost columns (sshpyk/diagnostics/inventory.py): CPU, MEM, GPU, IDLE and
CLIENT from the agent's numbers (see sshpyk/agent/remote/usage.py), humanised."""

from __future__ import annotations

import asyncio
from typing import Any

from sshpyk.diagnostics.inventory import (
    HostKernels,
    HostTarget,
    _ps,
    duration,
    ps_table,
    size,
)

MIB = 1 << 20


def test_units() -> None:
    assert [duration(s) for s in (None, 0, 3.7, 59, 60, 245, 7200, 2 * 86400 + 5)] == [
        "-",
        "0s",
        "3s",
        "59s",
        "1m",
        "4m",
        "2h",
        "2d",
    ]
    assert [size(b) for b in (None, 0, 512 * 1024, 231 * MIB, 3.8 * 1024 * MIB, 12 << 30)] == [
        "-",
        "0KiB",
        "512KiB",
        "231MiB",
        "3.8GiB",
        "12GiB",
    ]


def _kernel(kid: str, **more: Any) -> dict[str, Any]:
    return {"kernel_id": kid, "launcher": "direct", "run_dir": f"/r/{kid}", "alive": True, **more}


def test_usage_columns() -> None:
    gpu = {
        "index": 0,
        "uuid": "GPU-a",
        "used_memory_bytes": 3864 * MIB,
        "utilization_percent": 27.0,
    }
    hosts = [
        HostKernels(
            "h",
            [
                _kernel(
                    "a",
                    cpu_percent=101.4,
                    rss_bytes=250 * MIB,
                    gpu=[gpu, {**gpu, "index": 1, "utilization_percent": None}],
                    idle_s=245.0,
                    client="provisioner",
                ),
                _kernel("b", cpu_percent=0.0, rss_bytes=80 * MIB, gpu=[], client="argv"),
                _kernel("c", alive=False, cpu_percent=None, rss_bytes=None, gpu=None),
            ],
        )
    ]
    header, *rows = ps_table(hosts, usage=True)
    at = header.index("CPU")
    assert header[at : at + 6] == ["CPU", "MEM", "GPU", "IDLE", "CLIENT", "PORTS"]
    assert [row[at : at + 5] for row in rows] == [
        ["101%", "250MiB", "0:3.8GiB 27%, 1:3.8GiB", "4m", "provisioner"],
        ["0%", "80MiB", "none", "-", "argv"],  # no GPU held; idle_s not known
        ["-", "-", "-", "-", "-"],
    ]
    assert "CPU" not in ps_table(hosts)[0]  # kill's confirmation: no costs


class _Agent:
    def __init__(self) -> None:
        self.asked: list[bool] = []

    async def ps(
        self, run_root: Any = None, *, all_users: bool = False, usage: bool = False
    ) -> list[dict[str, Any]]:
        self.asked.append(usage)
        return [_kernel("a")]


def test_only_ps_asks_for_usage() -> None:
    agent = _Agent()
    asyncio.run(_ps(agent, HostTarget("h")))  # type: ignore[arg-type]
    asyncio.run(_ps(agent, HostTarget("h"), usage=True))  # type: ignore[arg-type]
    assert agent.asked == [False, True]

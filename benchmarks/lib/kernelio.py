"""What the latency benchmarks do with a kernel client: kernel_info round trips and
a cell that prints 20 MB (agent_scale.py, relay.py, slurm_relay.py)."""

from __future__ import annotations

import time
from typing import Any

LINES, WIDTH = 200, 100_000
CELL = f"for _ in range({LINES}):\n    print('x' * {WIDTH - 1})"


async def round_trips(kc: Any, rounds: int) -> list[float]:
    """Seconds of ``rounds`` sequential kernel_info round trips, after 20 warm-up ones."""
    times = []
    for n in range(20 + rounds):
        t0 = time.perf_counter()
        msg_id = kc.kernel_info()
        for _ in range(100):  # a reply comes within a few messages (bounded)
            reply = await kc.get_shell_msg(timeout=30)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        else:
            raise RuntimeError("no kernel_info reply among 100 shell messages")
        if n >= 20:
            times.append(time.perf_counter() - t0)
    return times


async def printed(kc: Any) -> float:
    """Seconds for the 20 MB cell, execute until idle with every byte received."""
    expected = LINES * WIDTH
    t0 = time.perf_counter()
    msg_id = kc.execute(CELL)
    got = 0
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        msg = await kc.get_iopub_msg(timeout=120)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            got += len(msg["content"]["text"])
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    seconds = time.perf_counter() - t0
    if got != expected:
        raise RuntimeError(f"received {got} of {expected} bytes")
    return seconds

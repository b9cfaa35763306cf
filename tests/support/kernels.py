"""Helpers to drive kernels through jupyter_client in tests."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from jupyter_client.manager import AsyncKernelManager


async def start_manager(kernel_name: str, **kw: Any) -> tuple[AsyncKernelManager, Any]:
    km = AsyncKernelManager(kernel_name=kernel_name, **kw)
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
    except BaseException:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
        raise
    return km, kc


async def stop_manager(km: AsyncKernelManager, kc: Any) -> None:
    kc.stop_channels()
    if km.has_kernel:
        await km.shutdown_kernel()


async def run_cell(kc: Any, code: str, timeout: float = 60) -> tuple[dict[str, Any], str]:
    """Execute ``code``; return (execute_reply content, everything printed to stdout)."""
    out: list[str] = []

    def hook(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
            out.append(msg["content"]["text"])

    reply = await kc.execute_interactive(code, output_hook=hook, timeout=timeout)
    return reply["content"], "".join(out)


async def interrupt_sleep(km: AsyncKernelManager, kc: Any) -> tuple[str, float]:
    """Run time.sleep(60), interrupt it; return (reply status/ename, seconds to reply)."""
    msg_id = kc.execute("import time; time.sleep(60)")
    # Wait until the kernel is busy with it, so the interrupt lands in the sleep.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        msg = await kc.get_iopub_msg(timeout=20)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "execute_input":
            break
    await asyncio.sleep(0.3)
    started = time.monotonic()
    await km.interrupt_kernel()
    while True:
        reply = await kc.get_shell_msg(timeout=15)
        if reply["parent_header"].get("msg_id") == msg_id:
            break
    content = reply["content"]
    return f"{content['status']}/{content.get('ename', '')}", time.monotonic() - started

"""The direct launcher, local side: the kernel is a process next to the agent.

The agent (``sshpyk.agent.remote.direct``) starts the kernel in its own process group
and reports ``ready`` once its five sockets are bound; the kernel is then reached with
``direct-streamlocal`` (ipc) or ``direct-tcpip`` (tcp) channels to the host itself.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from .launcher import Launcher, register

if TYPE_CHECKING:
    from ..agent.process import KernelProcess
    from .kernel import RemoteKernel

__all__ = ["DirectLauncher"]


@register
class DirectLauncher(Launcher):
    """Runs the kernel on the host the agent runs on."""

    name = "direct"
    help = "the kernel runs on the host"

    async def wait_ready(self, kernel: RemoteKernel, process: KernelProcess) -> None:
        """The kernel's sockets bound, then (once per connection) sshd's forwarding
        of the transport checked against one of them."""
        started = time.monotonic()
        if process.relay:
            # the channels go through the relay socket, which listens from the start:
            # its forwarding is checked while the kernel starts (no round trip after)
            check = asyncio.ensure_future(kernel.session.check_forwarding("ipc", process.relay))
            try:
                await process.wait_ready()
                await check
            finally:
                check.cancel()
        else:
            await process.wait_ready()
            await kernel.session.check_forwarding(process.transport, process.endpoints["hb"])
        kernel.timings["ready"] = time.monotonic() - started

    def ready_line(
        self, process: KernelProcess, timings: dict[str, float]
    ) -> tuple[str, tuple[Any, ...]]:
        return (
            "remote pid %s (%s transport) ready in %.3fs: "
            "agent %.3fs, spawn %.3fs, sockets bound %.3fs",
            (
                process.pid,
                process.transport,
                timings.get("total", 0.0),
                timings.get("agent", 0.0),
                timings.get("spawn", 0.0),
                timings.get("ready", 0.0),
            ),
        )

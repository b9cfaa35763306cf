"""The last stages: the launcher's own check of the host (a scheduler's login node), and
a test kernel started and answering kernel_info. The fix suggested for an error of a
launcher's is the launcher's (``Launcher.fix``)."""

from __future__ import annotations

import asyncio
import time

from ..errors import (
    ForwardingRefusedError,
    KernelStartError,
    KernelStartTimeoutError,
    LaunchFailedError,
    SSHPykError,
)
from ..kernels.kernel import KernelOptions
from ..kernels.launcher import launcher_for
from .report import Diagnosis, Status

__all__ = ["stage_kernel", "stage_launcher"]


async def stage_launcher(d: Diagnosis) -> None:
    """The launcher's own check of the host (a scheduler's: its commands work on the
    login node and accept the job options; no job is submitted)."""
    t = d.target
    launcher = launcher_for(t.launcher)
    assert d.agent is not None and launcher.check_stage is not None
    stage = launcher.check_stage[0]
    started = time.monotonic()
    try:
        info = await asyncio.wait_for(launcher.check_host(d.agent, t.kernel_options()), d.timeout)
    except (SSHPykError, asyncio.TimeoutError) as exc:
        detail = str(exc) or f"no answer within {d.timeout:g}s"
        fix = launcher.fix(exc, t.change, t.alias) or (
            f"run `sshpyk -vvv check {t.kernel or t.alias}` for the full log"
        )
        d.fail(stage, time.monotonic() - started, detail, fix)
    d.record(stage, Status.OK, time.monotonic() - started, launcher.host_summary(info))


async def stage_kernel(d: Diagnosis) -> None:
    t = d.target
    if not d.test_kernel:
        d.record("kernel", Status.SKIP, None, "skipped (--no-kernel)")
        return
    assert d.session is not None
    options = t.kernel_options()
    started = time.monotonic()
    limit = options.total_start_timeout + d.timeout
    try:
        detail = await asyncio.wait_for(_test_kernel(d, options), limit)
    except (SSHPykError, asyncio.TimeoutError, RuntimeError) as exc:
        if isinstance(exc, asyncio.TimeoutError):
            detail = f"no answer within {limit:g}s"
        else:
            detail = str(exc)
        own = launcher_for(t.launcher).fix(exc, t.change, t.alias)
        if own:
            fix = own
        elif isinstance(exc, KernelStartTimeoutError):
            fix = "give it more time: " + t.change("--start-timeout 120")
        elif isinstance(exc, ForwardingRefusedError):
            fix = "see the forwarding stages above"
        elif isinstance(exc, LaunchFailedError) and t.cwd:
            fix = f"create {t.cwd} on the host, or " + t.change("--remote-cwd DIR")
        elif isinstance(exc, KernelStartError):
            fix = (
                "the kernel's output is above; start it by hand on the host to see more: "
                f"`ssh {t.alias}` then `jupyter kernel --kernel={t.kernel_name}`"
            )
        else:
            fix = f"run `sshpyk -vvv check {t.kernel or t.alias}` for the full log"
        d.fail("kernel", time.monotonic() - started, detail, fix)
    d.record("kernel", Status.OK, time.monotonic() - started, detail)


async def _test_kernel(d: Diagnosis, options: KernelOptions) -> str:
    assert d.session is not None
    kernel = await d.session.start_kernel(options=options)
    try:
        process = kernel.process
        started = time.monotonic()
        client = kernel.client()
        client.start_channels()
        try:
            await client.wait_for_ready(timeout=d.timeout)
        finally:
            client.stop_channels()
        answered = time.monotonic() - started
        assert process is not None
        where = launcher_for(process.launcher).describe(process)
        detail = f"{where} ({process.host}), " if where else ""
        detail += (
            f"pid {process.pid}, {process.transport} transport, started in "
            f"{kernel.timings.get('total', 0.0):.2f}s"
        )
        if "queue" in kernel.timings:
            detail += f" (queue {kernel.timings['queue']:.2f}s)"
        return detail + f", answered kernel_info in {answered:.2f}s"
    finally:
        await kernel.close()

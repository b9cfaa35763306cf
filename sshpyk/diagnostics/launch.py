"""The last stages: the launcher's own check on the login node (SLURM), and a test
kernel started and answering kernel_info."""

from __future__ import annotations

import asyncio
import time

from ..errors import (
    ForwardingRefusedError,
    KernelStartError,
    KernelStartTimeoutError,
    SSHPykError,
)
from ..kernel import KernelOptions
from ..slurm import slurm_summary
from .report import Diagnosis, Status

__all__ = ["stage_kernel", "stage_slurm"]


async def stage_slurm(d: Diagnosis) -> None:
    """srun and sinfo work on the login node, and ``srun --test-only`` accepts the
    kernelspec's SLURM arguments (no job is submitted)."""
    t = d.target
    assert d.agent is not None
    started = time.monotonic()
    try:
        info = await asyncio.wait_for(d.agent.slurm_info(t.slurm_args), d.timeout)
    except (SSHPykError, asyncio.TimeoutError) as exc:
        detail = str(exc) or f"no answer within {d.timeout:g}s"
        if "not found on the PATH" in detail:
            fix = (
                "install SLURM's client commands on the login node, or load them first: "
                + t.change("--pre-command 'module load slurm'")
            )
        elif "rejects the SLURM arguments" in detail:
            fix = "fix the job options: " + t.change('--slurm-args "--partition=..."')
        else:
            fix = f"see what SLURM says: `ssh {t.alias} sinfo`"
        d.fail("slurm", time.monotonic() - started, detail, fix)
    partitions = ", ".join(
        f"{p['partition']} {p['avail']} ({p['nodes']} {p['state']})"
        for p in info.get("partitions") or []
    )
    detail = f"{info.get('version')}, srun at {info.get('srun')}"
    detail += f"; partitions: {partitions or 'none'}"
    if info.get("test"):
        detail += f"; {info['test']}"
    d.record("slurm", Status.OK, time.monotonic() - started, detail)


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
        if isinstance(exc, KernelStartTimeoutError) and "SLURM" in str(exc):
            fix = "let it wait longer in the queue: " + t.change("--slurm-queue-timeout 3600")
            fix += ", or pick a less busy partition (`sinfo`)"
        elif isinstance(exc, KernelStartTimeoutError):
            fix = "give it more time: " + t.change("--start-timeout 120")
        elif isinstance(exc, ForwardingRefusedError):
            fix = "see the forwarding stages above"
        elif isinstance(exc, KernelStartError):
            fix = (
                "the kernel's output is above; start it by hand on the host to see more: "
                f"`ssh {t.alias}` then `jupyter kernel --kernel={t.kernel_name}`"
            )
        elif "working directory" in str(exc):
            fix = "create it on the host, or " + t.change("--remote-cwd DIR")
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
        if process.launcher == "slurm":
            return (
                f"SLURM {slurm_summary(process.slurm)} ({process.host}), kernel pid "
                f"{process.slurm.get('node_pid')}, started in "
                f"{kernel.timings.get('total', 0.0):.2f}s (queue "
                f"{kernel.timings.get('queue', 0.0):.2f}s), answered kernel_info in "
                f"{answered:.2f}s"
            )
        return (
            f"pid {process.pid}, {process.transport} transport, started in "
            f"{kernel.timings.get('total', 0.0):.2f}s, answered kernel_info in "
            f"{answered:.2f}s"
        )
    finally:
        await kernel.close()

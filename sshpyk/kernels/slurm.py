"""The SLURM launcher, local side: the log lines for queue and walltime events, the
wait for the job and the check of the relay sockets on the login node.

With ``launcher: slurm`` the remote agent runs on the login node and submits each
kernel with ``srun`` (``sshpyk.agent.remote.slurm`` says why srun and not sbatch). On
its compute node the kernel binds only private sockets (ipc in a 0700 run dir, or tcp
on 127.0.0.1); its traffic is relayed to five unix sockets in the kernel's 0700 run dir
on the login node over one TCP connection from the agent to the node side,
authenticated with a secret sent over srun's stdin ("the relay"). Seen from here a
SLURM kernel is an ipc kernel on the login node: the local forwards reach it with
``direct-streamlocal`` channels on the one SSH connection, and nothing of the kernel
listens on the cluster network.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import asyncssh

from ..config import parse_slurm_args
from ..errors import ForwardingRefusedError, KernelStartTimeoutError, translating
from .launcher import Launcher, register

if TYPE_CHECKING:
    from ..agent.client import RemoteAgent
    from ..agent.process import EventListener, KernelProcess
    from ..kernelspec import SSHKernelSpec
    from ..ssh.session import Session
    from .kernel import KernelOptions, RemoteKernel

__all__ = [
    "SlurmLauncher",
    "check_relay",
    "duration",
    "parse_slurm_args",
    "slurm_logger",
    "slurm_summary",
]


def duration(seconds: float | None) -> str:
    """``45s``, ``4m05s``, ``2h03m``, ``1d02h``."""
    if seconds is None:
        return "?"
    total = max(0, round(seconds))
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    if total < 86400:
        return f"{total // 3600}h{total % 3600 // 60:02d}m"
    return f"{total // 86400}d{total % 86400 // 3600:02d}h"


def slurm_summary(info: dict[str, Any]) -> str:
    """``job 123 RUNNING on node7`` / ``job 123 PENDING (Resources)`` from a SLURM dict."""
    job = info.get("job_id") or "?"
    state = info.get("state") or info.get("slurm_state") or "?"
    text = f"job {job} {state}"
    if info.get("node"):
        text += f" on {info['node']}"
    reason = info.get("reason") or info.get("slurm_reason")
    if reason and state != "RUNNING":
        text += f" ({reason})"
    return text


def slurm_logger(logger: Any, alias: str, kernel_id: str) -> EventListener:
    """A listener that logs a SLURM kernel's events: the queue (INFO, on every change
    and every status interval), the job's start (INFO), the walltime warning (WARNING).
    ``logger`` is a :class:`logging.Logger` (the provisioner passes its ``self.log``)."""

    def listen(process: KernelProcess, event: dict[str, Any]) -> None:
        prefix = f"[{alias}] kernel {kernel_id}: SLURM job {event.get('job_id') or '?'}"
        if event.get("warning") == "walltime":
            logger.warning(
                "%s on %s reaches its time limit in %s: save your work, SLURM will "
                "stop the kernel then",
                prefix,
                event.get("node") or "?",
                duration(event.get("time_left")),
            )
        elif event.get("allocation") == "reused":
            logger.info("%s restarted in the same allocation (no queueing)", prefix)
        elif event.get("allocation") == "ended":
            logger.warning(
                "%s: its allocation has ended (time limit?), the restart asks SLURM for a "
                "new one and may queue",
                prefix,
            )
        elif event.get("state") == "RUNNING" and "endpoints" in event:
            logger.info(
                "%s running on %s (%s) after %s in the queue",
                prefix,
                event.get("node") or "?",
                event.get("host") or "?",
                duration(event.get("waited")),
            )
        else:
            reason = event.get("reason")
            logger.info(
                "%s %s for %s%s",
                prefix,
                str(event.get("state") or "pending").lower(),
                duration(event.get("waited")),
                f" (reason: {reason})" if reason else "",
            )

    return listen


async def check_relay(session: Session, path: str) -> None:
    """Open (and close) a ``direct-streamlocal`` channel to one of the kernel's relay
    sockets on the login node (the node's agent connects it to the kernel): fails
    clearly if sshd refuses unix socket forwarding."""
    conn = await session.connection()
    with translating(session.alias, config=session.ssh_config):
        try:
            _, writer = await conn.open_unix_connection(path)
        except asyncssh.ChannelOpenError as exc:
            raise ForwardingRefusedError(
                f"sshd on {session.alias!r} refuses unix socket forwarding ({exc.reason}): "
                "the slurm launcher relays the kernel through unix sockets on the login "
                "node, set AllowStreamLocalForwarding yes in its sshd_config"
            ) from exc
        writer.close()


@register
class SlurmLauncher(Launcher):
    """Runs the kernel as a SLURM job (``srun``) from a login node."""

    name = "slurm"
    # a stop may wait for srun, then for the job to leave the queue
    stop_timeout = 30.0

    def start_timeout(self, options: KernelOptions) -> float:
        """The queue (bounded by the agent's queue timeout), then the kernel's start."""
        return options.slurm_queue_timeout + options.start_timeout

    async def prepare(self, agent: RemoteAgent) -> None:
        """Send the SLURM launcher's remote code to the agent (once per agent)."""
        await agent.load("slurm")

    def event_listener(self, logger: Any, alias: str, kernel_id: str) -> EventListener:
        return slurm_logger(logger, alias, kernel_id)

    async def wait_ready(self, kernel: RemoteKernel, process: KernelProcess) -> None:
        """The job's queue (bounded by the agent's queue timeout), then the kernel's own
        start on its node (bounded by start_timeout), then the relay sockets."""
        started = time.monotonic()
        await process.running.wait()
        kernel.timings["queue"] = time.monotonic() - started
        started = time.monotonic()
        timeout = kernel.options.start_timeout
        try:
            await asyncio.wait_for(process.wait_ready(), timeout)
        except asyncio.TimeoutError:
            raise KernelStartTimeoutError(
                f"kernel {kernel.options.kernel_name!r} on {kernel.session.alias!r}: SLURM "
                f"{slurm_summary(process.details)}, but the kernel did not bind its sockets "
                f"within {timeout:g}s (raise --start-timeout?)"
            ) from None
        await check_relay(kernel.session, process.endpoints["hb"])  # login node unix socket
        kernel.timings["ready"] = time.monotonic() - started

    def describe(self, process: KernelProcess) -> str:
        return f"SLURM {slurm_summary(process.details)}"

    check_stage = ("slurm", "SLURM (login node)")

    async def check_host(self, agent: RemoteAgent, options: KernelOptions) -> dict[str, Any]:
        """srun and sinfo work on the login node, and ``srun --test-only`` accepts the
        job options (no job is submitted): SLURM's version, srun, the partitions."""
        return await agent.slurm_info(options.slurm_args)

    def host_summary(self, info: dict[str, Any]) -> str:
        partitions = ", ".join(
            f"{p.get('partition')} {p.get('avail')} ({p.get('nodes')} {p.get('state')})"
            for p in info.get("partitions") or []
        )
        summary = f"{info.get('version')}, srun at {info.get('srun')}"
        summary += f"; partitions: {partitions or 'none'}"
        if info.get("test"):
            summary += f"; {info['test']}"
        return summary

    def remote_transport(self, transport: str) -> str:
        """Always ipc: the forwards reach the relay's unix sockets on the login node,
        whatever the kernel binds on its node."""
        return "ipc"

    def ready_line(
        self, process: KernelProcess, timings: dict[str, float]
    ) -> tuple[str, tuple[Any, ...]]:
        return (
            "SLURM %s, kernel pid %s ready in %.3fs: queue %.3fs, sockets bound %.3fs",
            (
                slurm_summary(process.details),
                process.details.get("node_pid"),
                timings.get("total", 0.0),
                timings.get("queue", 0.0),
                timings.get("ready", 0.0),
            ),
        )

    def info(self, process: KernelProcess) -> dict[str, Any]:
        return {"slurm": {k: process.details.get(k) for k in ("job_id", "node", "host", "state")}}

    # -- sshpyk list ------------------------------------------------------------------

    check_field = "slurm_args"

    def command_tail(self, spec: SSHKernelSpec) -> str:
        srun = f"srun {spec.slurm_args} " if spec.slurm_args else "srun "
        return f" -> {srun}{spec.remote_python} <sshpyk node>"

    def listing_lines(
        self, spec: SSHKernelSpec, remote: dict[str, Any], marked: Callable[[object], str]
    ) -> list[tuple[str, str]]:
        """The launcher's settings; with live checks, SLURM on the login node and the
        jobs running this kernelspec's kernels there (job id, node, state)."""
        warning = spec.slurm_walltime_warning
        lines = [
            ("Launcher", marked("slurm (srun on the login node)")),
            ("SLURM Args", spec.slurm_args or "(none)"),
            ("SLURM Queue Limit", f"{spec.slurm_queue_timeout:g}s"),
            ("SLURM Time Warning", f"{warning:g}s before the limit" if warning else "off"),
            ("SLURM Status Every", f"{spec.slurm_status_interval:g}s while queued"),
        ]
        info = remote.get(self.name)
        if info:
            partitions = ", ".join(
                f"{p.get('partition')} {p.get('avail')} ({p.get('nodes')} {p.get('state')})"
                for p in info.get("partitions") or []
            )
            lines.append(("SLURM", f"{info.get('version')}; partitions: {partitions or 'none'}"))
        jobs = remote.get(f"{self.name}_jobs")
        if jobs is not None:
            running = ", ".join(
                f"{slurm_summary(j)} (kernel {str(j.get('kernel_id'))[:8]})" for j in jobs
            )
            lines.append(("SLURM Jobs", running or "none"))
        return lines

    def live_kernel(self, entry: dict[str, Any], options: KernelOptions) -> dict[str, Any] | None:
        """The job of a kernel submitted with the same SLURM arguments."""
        if entry.get("slurm_args") != options.slurm_args:
            return None
        return {
            "kernel_id": entry.get("kernel_id"),
            "job_id": entry.get("job_id"),
            "node": entry.get("node"),
            "state": entry.get("slurm_state"),
            "reason": entry.get("slurm_reason"),
        }

    # -- sshpyk ps --------------------------------------------------------------------

    ps_columns = ("JOB ID", "NODE", "JOB STATE")

    def ps_cells(self, entry: dict[str, Any]) -> list[str]:
        """The job's id, node and state (with squeue's reason while it is not running)."""
        state = str(entry.get("slurm_state") or "?")
        if entry.get("slurm_reason") and state != "RUNNING":
            state += f" ({entry['slurm_reason']})"
        elif state == "RUNNING" and entry.get("time_left") is not None:
            state += f" ({duration(entry['time_left'])} left)"  # the job's time limit
        return [str(entry.get("job_id") or "-"), str(entry.get("node") or "-"), state]

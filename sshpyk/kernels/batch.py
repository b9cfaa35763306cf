"""What every batch scheduler's launcher shares, local side: its options, its error
kinds, the log lines for queue and walltime events, the wait for the job, the check
of the relay sockets on the login host, and its lines in ``list``, ``ps`` and
``check``.

A batch launcher (one module per scheduler, a :class:`BatchLauncher`) runs the
remote agent on a login host that submits each kernel to the scheduler; the agent's
side is ``sshpyk.agent.remote.batch`` and one module per scheduler. On its execution
host the kernel binds only private sockets (ipc in a 0700 run dir, or tcp on
127.0.0.1); its traffic is relayed to five unix sockets in the kernel's 0700 run dir
on the login host over one authenticated TCP connection from the agent to the node
side ("the relay", ``agent/remote/relay.py``). Seen from here a batch kernel is an
ipc kernel on the login host: the local forwards reach it with ``direct-streamlocal``
channels on the one SSH connection, and nothing of the kernel listens on the cluster
network.

A subclass says which scheduler it is (:attr:`BatchLauncher.scheduler` and a few
words for messages), declares its options with :func:`batch_options` and its error
kinds with :func:`batch_error_kinds`, and describes its ``check`` answer
(:meth:`Launcher.host_summary`, :meth:`BatchLauncher.host_line`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import asyncssh

from ..config import ConfigField, launcher_field
from ..errors import (
    ForwardingRefusedError,
    KernelStartError,
    KernelStartTimeoutError,
    QueueTimeoutError,
    SchedulerArgsError,
    SchedulerError,
    SchedulerMissingError,
    SSHPykError,
    translating,
)
from .launcher import Launcher

if TYPE_CHECKING:
    from ..agent.client import RemoteAgent
    from ..agent.process import EventListener, KernelProcess
    from ..kernelspec import SSHKernelSpec
    from ..ssh.session import Session
    from .kernel import KernelOptions, RemoteKernel

__all__ = [
    "BATCH_REMOTE_MODULES",
    "BatchLauncher",
    "batch_error_kinds",
    "batch_options",
    "check_relay",
    "duration",
    "job_logger",
    "job_summary",
]

#: the agent's modules every batch launcher needs, in dependency order: the node
#: connection, the node side, the login side's shared machinery
BATCH_REMOTE_MODULES = ("relay", "node", "batchjobs", "batch")


def batch_options(
    name: str, scheduler: str, *, args_help: str, parse: Callable[[str], list[str]]
) -> tuple[ConfigField, ...]:
    """The options of batch launcher ``name`` (``<name>_args``, ``_queue_timeout``,
    ``_walltime_warning``, ``_status_interval``): what the remote batch side reads from
    the launch request."""
    return (
        launcher_field(
            f"{name}_args",
            "",
            help=args_help,
            label=f"{scheduler} arguments",
            metavar="ARGS",
            clearable=True,
            checked=True,
            parse=parse,
            launcher=name,
            kernel=f"{name}_args",
            request=True,
        ),
        launcher_field(
            f"{name}_queue_timeout",
            600.0,
            help=f"Seconds a {scheduler} job may wait in the queue before it is cancelled "
            "(on top of --start-timeout).",
            label=f"{scheduler} queue timeout",
            positive=True,
            launcher=name,
            kernel=f"{name}_queue_timeout",
            request=True,
        ),
        launcher_field(
            f"{name}_walltime_warning",
            300.0,
            help=f"Log a warning this many seconds before the {scheduler} job's time limit "
            "(0: never).",
            label=f"{scheduler} walltime warning",
            minimum=0.0,
            launcher=name,
            kernel=f"{name}_walltime_warning",
            request=True,
        ),
        launcher_field(
            f"{name}_status_interval",
            30.0,
            help=f"While a {scheduler} job waits in the queue, log its state at least this "
            "often (seconds).",
            label=f"{scheduler} status interval",
            positive=True,
            launcher=name,
            omit_default=True,
            kernel=f"{name}_status_interval",
            request=True,
        ),
    )


def batch_error_kinds(name: str) -> dict[str, type[SSHPykError]]:
    """The error kinds the remote side of batch launcher ``name`` reports (see
    ``agent/remote/batch.py``), and their classes."""
    return {
        f"{name}_missing": SchedulerMissingError,
        f"{name}_error": SchedulerError,
        f"{name}_args": SchedulerArgsError,
        f"{name}_queue_timeout": QueueTimeoutError,
        f"{name}_failed": KernelStartError,
    }


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


def job_summary(info: dict[str, Any]) -> str:
    """``job 123 RUNNING on node7`` / ``job 123 PENDING (Resources)`` from a job's
    fields (an event's details, or a ``ps`` entry: ``<launcher>_state``)."""
    job = info.get("job_id") or "?"
    state = info.get("state") or "?"
    text = f"job {job} {state}"
    if info.get("node"):
        text += f" on {info['node']}"
    reason = info.get("reason")
    if reason and state != "RUNNING":
        text += f" ({reason})"
    return text


def job_logger(logger: Any, alias: str, kernel_id: str, scheduler: str) -> EventListener:
    """A listener that logs a batch kernel's ``job`` events: the queue (INFO, on every
    change and every status interval), the job's start (INFO), the walltime warning
    (WARNING). ``logger`` is a :class:`logging.Logger` (the provisioner's ``self.log``)."""

    def listen(process: KernelProcess, event: dict[str, Any]) -> None:
        prefix = f"[{alias}] kernel {kernel_id}: {scheduler} job {event.get('job_id') or '?'}"
        if event.get("warning") == "walltime":
            logger.warning(
                "%s on %s reaches its time limit in %s: save your work, %s will "
                "stop the kernel then",
                prefix,
                event.get("node") or "?",
                duration(event.get("time_left")),
                scheduler,
            )
        elif event.get("allocation") == "reused":
            logger.info("%s restarted in the same allocation (no queueing)", prefix)
        elif event.get("allocation") == "ended":
            logger.warning(
                "%s: its allocation has ended (time limit?), the restart asks %s for a "
                "new one and may queue",
                prefix,
                scheduler,
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


async def check_relay(session: Session, path: str, launcher: str) -> None:
    """Open (and close) a ``direct-streamlocal`` channel to one of the kernel's relay
    sockets on the login host (the agent connects it to the kernel): fails clearly if
    sshd refuses unix socket forwarding."""
    conn = await session.connection()
    with translating(session.alias, config=session.ssh_config):
        try:
            _, writer = await conn.open_unix_connection(path)
        except asyncssh.ChannelOpenError as exc:
            raise ForwardingRefusedError(
                f"sshd on {session.alias!r} refuses unix socket forwarding ({exc.reason}): "
                f"the {launcher} launcher relays the kernel through unix sockets on the "
                "login node, set AllowStreamLocalForwarding yes in its sshd_config"
            ) from exc
        writer.close()


class BatchLauncher(Launcher):
    """A kernel run as a batch job from a login host (see the module doc)."""

    #: the scheduler's name in messages
    scheduler: ClassVar[str]
    #: how ``list`` says the agent runs the kernel ("srun on the login node")
    runs_as: ClassVar[str]
    #: an example of the job arguments, for suggested fixes ('"--partition=..."')
    args_example: ClassVar[str]
    #: what to load in a pre-command when the scheduler's commands are missing
    module_name: ClassVar[str]
    #: the command that shows the cluster's state, for suggested fixes ("sinfo")
    status_command: ClassVar[str]
    #: where a job may queue less, for the queue timeout's fix
    busy_hint: ClassVar[str]
    # a stop may wait for the step, then for the job to leave the queue
    stop_timeout = 30.0
    #: the remote modules: the shared batch machinery, then the scheduler's own
    remote_modules: ClassVar[tuple[str, ...]] = BATCH_REMOTE_MODULES

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.check_stage = (cls.name, f"{cls.scheduler} (login node)")
        cls.check_field = f"{cls.name}_args"

    def option(self, options: KernelOptions, suffix: str) -> Any:
        """This launcher's option ``<name>_<suffix>`` of ``options``."""
        return getattr(options, f"{self.name}_{suffix}")

    def start_timeout(self, options: KernelOptions) -> float:
        """The queue (bounded by the agent's queue timeout), then the kernel's start."""
        return float(self.option(options, "queue_timeout")) + options.start_timeout

    def event_listener(self, logger: Any, alias: str, kernel_id: str) -> EventListener:
        return job_logger(logger, alias, kernel_id, self.scheduler)

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
                f"kernel {kernel.options.kernel_name!r} on {kernel.session.alias!r}: "
                f"{self.scheduler} {job_summary(process.details)}, but the kernel did not "
                f"bind its sockets within {timeout:g}s (raise --start-timeout?)"
            ) from None
        await check_relay(kernel.session, process.endpoints["hb"], self.name)
        kernel.timings["ready"] = time.monotonic() - started

    def describe(self, process: KernelProcess) -> str:
        return f"{self.scheduler} {job_summary(process.details)}"

    async def check_host(self, agent: RemoteAgent, options: KernelOptions) -> dict[str, Any]:
        """The scheduler's commands work on the login host and accept the job options
        (tested without running a job): what the agent's probe found."""
        await self.prepare(agent)
        return await agent.probe(self.name, self.option(options, "args"))

    def host_line(self, info: dict[str, Any]) -> str:
        """``list``'s line on the scheduler, from :meth:`check_host`'s answer."""
        return str(info.get("version") or "")

    def remote_transport(self, transport: str) -> str:
        """Always ipc: the forwards reach the relay's unix sockets on the login host,
        whatever the kernel binds on its node."""
        return "ipc"

    def ready_line(
        self, process: KernelProcess, timings: dict[str, float]
    ) -> tuple[str, tuple[Any, ...]]:
        return (
            f"{self.scheduler} %s, kernel pid %s ready in %.3fs: queue %.3fs, sockets bound %.3fs",
            (
                job_summary(process.details),
                process.details.get("node_pid"),
                timings.get("total", 0.0),
                timings.get("queue", 0.0),
                timings.get("ready", 0.0),
            ),
        )

    def info(self, process: KernelProcess) -> dict[str, Any]:
        return {self.name: {k: process.details.get(k) for k in ("job_id", "node", "host", "state")}}

    def fix(self, exc: BaseException, change: Callable[[str], str], alias: str) -> str | None:
        """The fixes of the batch errors, in this scheduler's words."""
        if isinstance(exc, SchedulerMissingError):
            return (
                f"install {self.scheduler}'s client commands on the login node, or load "
                f"them first: " + change(f"--pre-command 'module load {self.module_name}'")
            )
        if isinstance(exc, SchedulerArgsError):
            return "fix the job options: " + change(f"--{self.name}-args {self.args_example}")
        if isinstance(exc, SchedulerError):
            return f"see what {self.scheduler} says: `ssh {alias} {self.status_command}`"
        if isinstance(exc, QueueTimeoutError):
            return (
                "let it wait longer in the queue: "
                + change(f"--{self.name}-queue-timeout 3600")
                + f", or pick {self.busy_hint}"
            )
        return None

    def kill_note(self, entry: dict[str, Any]) -> str:
        job = entry.get("job_id")
        return f"; cancelled {self.scheduler} job {job}" if job else ""

    # -- sshpyk list ------------------------------------------------------------------

    def command_tail(self, spec: SSHKernelSpec) -> str:
        step = self.runs_as.split()[0]
        args = getattr(spec, f"{self.name}_args")
        return f" -> {step} {args + ' ' if args else ''}{spec.remote_python} <sshpyk node>"

    def listing_lines(
        self, spec: SSHKernelSpec, remote: dict[str, Any], marked: Callable[[object], str]
    ) -> list[tuple[str, str]]:
        """The launcher's settings; with live checks, the scheduler on the login host
        and the jobs running this kernelspec's kernels there (job id, node, state)."""
        s = self.scheduler
        warning = getattr(spec, f"{self.name}_walltime_warning")
        lines = [
            ("Launcher", marked(f"{self.name} ({self.runs_as})")),
            (f"{s} Args", getattr(spec, f"{self.name}_args") or "(none)"),
            (f"{s} Queue Limit", f"{getattr(spec, f'{self.name}_queue_timeout'):g}s"),
            (f"{s} Time Warning", f"{warning:g}s before the limit" if warning else "off"),
            (
                f"{s} Status Every",
                f"{getattr(spec, f'{self.name}_status_interval'):g}s while queued",
            ),
        ]
        info = remote.get(self.name)
        if info:
            lines.append((s, self.host_line(info)))
        jobs = remote.get(f"{self.name}_jobs")
        if jobs is not None:
            running = ", ".join(
                f"{job_summary(j)} (kernel {str(j.get('kernel_id'))[:8]})" for j in jobs
            )
            lines.append((f"{s} Jobs", running or "none"))
        return lines

    def live_kernel(self, entry: dict[str, Any], options: KernelOptions) -> dict[str, Any] | None:
        """The job of a kernel submitted with the same job arguments."""
        if entry.get(f"{self.name}_args") != self.option(options, "args"):
            return None
        return {
            "kernel_id": entry.get("kernel_id"),
            "job_id": entry.get("job_id"),
            "node": entry.get("node"),
            "state": entry.get(f"{self.name}_state"),
            "reason": entry.get(f"{self.name}_reason"),
        }

    # -- sshpyk ps --------------------------------------------------------------------

    ps_columns = ("JOB ID", "NODE", "JOB STATE")

    def ps_cells(self, entry: dict[str, Any]) -> list[str]:
        """The job's id, node and state (with the scheduler's reason while it is not
        running, the time left once it runs)."""
        state = str(entry.get(f"{self.name}_state") or "?")
        reason = entry.get(f"{self.name}_reason")
        if reason and state != "RUNNING":
            state += f" ({reason})"
        elif state == "RUNNING" and entry.get("time_left") is not None:
            state += f" ({duration(entry['time_left'])} left)"  # the job's time limit
        return [str(entry.get("job_id") or "-"), str(entry.get("node") or "-"), state]

"""``sshpyk list``'s live checks: alias reachable, remote python usable, remote
kernelspec present (and for batch kernelspecs, the scheduler on the login node and the jobs
running there): one connection per host, every host concurrently, each bounded by a
timeout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..agent.client import RemoteAgent
from ..config import DEFAULTS
from ..errors import RemoteJupyterClientMissingError, SSHPykError
from ..kernels.kernel import KernelOptions
from ..kernels.launcher import LAUNCHERS, launcher_for
from ..kernels.session import SSHSession
from ..kernelspec import SSHKernelSpec
from ..ssh.hosts import config_path
from .report import Status

__all__ = ["KernelStatus", "check_kernels"]


@dataclass
class KernelStatus:
    """The live checks of one SSH kernelspec: host alias, remote python, remote kernel."""

    alias: Status = Status.SKIP
    python: Status = Status.SKIP
    kernel: Status = Status.SKIP
    #: the launcher's own check of the host (Launcher.check_host; a scheduler's
    #: commands work and accept the job arguments), for launchers with a check
    launcher: Status = Status.SKIP
    #: the name of the launcher of the kernelspec (whose check ``launcher`` is)
    launcher_name: str | None = None
    #: the remote python's facts and kernelspec (from the agent), when reached; for
    #: launchers with a check also its answer under the launcher's name (a
    #: scheduler's version, queues) and its running kernels under name + "_jobs"
    remote: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """Keyed like the kernelspec fields they check."""
        return {
            "ssh_host_alias": self.alias.value,
            "remote_python": self.python.value,
            "remote_kernel_name": self.kernel.value,
            **{
                launcher.check_field: (
                    self.launcher if launcher.name == self.launcher_name else Status.SKIP
                ).value
                for launcher in LAUNCHERS.values()
                if launcher.check_field
            },
            "remote": dict(self.remote),
            "error": self.error,
            "seconds": round(self.seconds, 4),
        }

    def _not_reached(self, why: str, status: Status = Status.WARN) -> None:
        """Mark what was not decided yet (after a failure or a timeout)."""
        if self.error is None:
            self.error = why
        for key in ("alias", "python", "kernel"):
            if getattr(self, key) is Status.SKIP:
                setattr(self, key, status)
                status = Status.WARN  # only the first undecided check failed


async def _check_one(session: SSHSession, spec: SSHKernelSpec, status: KernelStatus) -> None:
    try:
        agent = await session.agent(spec.remote_python, spec.pre_command)
    except SSHPykError as exc:
        status.python = Status.FAIL
        status._not_reached(str(exc))
        return
    status.remote = {k: agent.info.get(k) for k in ("python", "python_version", "jupyter_client")}
    try:
        status.remote["kernelspec"] = await agent.inspect(spec.remote_kernel_name)
    except RemoteJupyterClientMissingError as exc:
        status.python = Status.FAIL
        status._not_reached(str(exc))
        return
    except SSHPykError as exc:
        status.python = Status.OK
        status.kernel = Status.FAIL
        status.error = str(exc)
        return
    status.python = status.kernel = Status.OK
    launcher = launcher_for(spec.launcher)
    if launcher.check_stage is not None:
        await _check_launcher(agent, spec, status)


async def _check_launcher(agent: RemoteAgent, spec: SSHKernelSpec, status: KernelStatus) -> None:
    """The launcher's check of the host (a scheduler on the login node), and the kernels
    of this kernelspec it runs there (a scheduler's: their jobs)."""
    launcher = launcher_for(spec.launcher)
    options = KernelOptions.from_config(spec)
    try:
        status.remote[launcher.name] = await launcher.check_host(agent, options)
    except SSHPykError as exc:
        status.launcher = Status.FAIL
        status.error = str(exc)
        return
    status.launcher = Status.OK
    await launcher.prepare(agent)
    jobs = []
    for k in await agent.ps(spec.remote_run_root):
        mine = k.get("launcher") == launcher.name and k.get("alive")
        if mine and k.get("kernel_name") == spec.remote_kernel_name:
            job = launcher.live_kernel(k, options)
            if job is not None:
                jobs.append(job)
    status.remote[f"{launcher.name}_jobs"] = jobs


async def _check_host(
    alias: str, config: str | None, specs: list[SSHKernelSpec], statuses: dict[str, KernelStatus]
) -> None:
    started = time.monotonic()
    try:
        persist = DEFAULTS.connection_persist
        async with await SSHSession.connect(alias, ssh_config=config, persist=persist) as session:
            for spec in specs:
                statuses[spec.name].alias = Status.OK
            await asyncio.gather(*(_check_one(session, s, statuses[s.name]) for s in specs))
    except SSHPykError as exc:
        for spec in specs:
            if statuses[spec.name].alias is Status.SKIP:
                statuses[spec.name]._not_reached(str(exc), Status.FAIL)
    finally:
        for spec in specs:
            statuses[spec.name].seconds = time.monotonic() - started


async def check_kernels(
    specs: Iterable[SSHKernelSpec],
    *,
    timeout: float = 20.0,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, KernelStatus]:
    """Check SSH kernelspecs live: one connection per host, all hosts concurrently.

    Each host gets ``timeout`` seconds; whatever it did not answer by then is marked
    (!) with a timeout message. ``progress(done, total, alias)`` is called as hosts
    finish. Returns a status per kernel name; never raises SSHPykError.
    """
    hosts: dict[tuple[str, str | None], list[SSHKernelSpec]] = {}
    statuses: dict[str, KernelStatus] = {}
    for spec in specs:
        statuses[spec.name] = KernelStatus(launcher_name=spec.launcher)
        try:
            config = config_path(spec.ssh_config)
        except SSHPykError as exc:
            statuses[spec.name].alias = Status.FAIL
            statuses[spec.name]._not_reached(str(exc))
            continue
        hosts.setdefault((spec.ssh_host_alias, config), []).append(spec)
    done = 0

    async def one(alias: str, config: str | None, host_specs: list[SSHKernelSpec]) -> None:
        nonlocal done
        try:
            await asyncio.wait_for(_check_host(alias, config, host_specs, statuses), timeout)
        except asyncio.TimeoutError:
            for spec in host_specs:
                statuses[spec.name]._not_reached(f"no answer from {alias!r} within {timeout:g}s")
                statuses[spec.name].seconds = timeout
        done += 1
        if progress is not None:
            progress(done, len(hosts), alias)

    await asyncio.gather(*(one(alias, config, s) for (alias, config), s in hosts.items()))
    return statuses

"""The launcher contract: how a kernel is started and brought up, per launcher.

A launcher is one way to run a kernel on the remote host: ``direct`` (a process next to
the agent) or ``slurm`` (a job on a compute node). Each has one module on each side: here
(:mod:`sshpyk.kernels.direct`, :mod:`sshpyk.kernels.slurm`) and in the agent
(``sshpyk.agent.remote.direct``, ``sshpyk.agent.remote.slurm``). A new scheduler is one
:class:`Launcher` subclass registered with :func:`register`, its options in
:class:`~sshpyk.config.KernelConfig` (``Option.launcher`` set to its name) and its remote
module; nothing else names a launcher.

:class:`~sshpyk.kernels.kernel.RemoteKernel` calls the hooks in this order for each
launch: :meth:`Launcher.start_timeout` (the bound on the whole start),
:meth:`Launcher.prepare`, :meth:`Launcher.event_listener`, the agent's launch, then
:meth:`Launcher.wait_ready`; :meth:`Launcher.describe` names the kernel's state in
errors and logs, :attr:`Launcher.stop_timeout` bounds its stop.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, ClassVar

from ..config import LAUNCHERS as LAUNCHER_NAMES
from ..config import config_fields
from ..errors import SSHPykError

if TYPE_CHECKING:
    from ..agent.client import RemoteAgent
    from ..agent.process import EventListener, KernelProcess
    from .kernel import KernelOptions, RemoteKernel

__all__ = ["LAUNCHERS", "Launcher", "launcher_for", "register"]


class Launcher(abc.ABC):
    """One way to run a kernel; stateless (one instance serves every kernel)."""

    #: the ``launcher`` value of kernel.json (one of :data:`sshpyk.config.LAUNCHERS`)
    name: ClassVar[str]
    #: seconds :meth:`KernelProcess.stop` may take (a job may have to leave a queue)
    stop_timeout: ClassVar[float] = 10.0

    @classmethod
    def request_fields(cls) -> tuple[str, ...]:
        """The launch-request fields of this launcher's own, from the config model:
        the KernelConfig options whose ``Option.launcher`` is :attr:`name`."""
        return tuple(
            f.option.kernel
            for f in config_fields()
            if f.option.request
            and f.option.kernel
            and f.option.kernel != "launcher"
            and f.option.launcher == cls.name
        )

    def start_timeout(self, options: KernelOptions) -> float:
        """The bound on a whole start with ``options``, from the request to the kernel's
        sockets (a queue wait included). Default: ``options.start_timeout``."""
        return options.start_timeout

    async def prepare(self, agent: RemoteAgent) -> None:  # noqa: B027 (a hook)
        """Called before each launch on ``agent``: load what the agent needs to run this
        launcher's kernels (its remote code). Default: nothing."""

    def event_listener(self, logger: Any, alias: str, kernel_id: str) -> EventListener | None:
        """What logs the launcher's events of one kernel (queue, start, walltime) on
        ``logger`` (the provisioner's ``self.log``), or None. Default: None."""
        return None

    @abc.abstractmethod
    async def wait_ready(self, kernel: RemoteKernel, process: KernelProcess) -> None:
        """Called once the agent started ``process`` for ``kernel`` (the forwards already
        point at it): return once the kernel is reachable through them, raising an
        SSHPykError if it cannot be. Records its stages' durations in
        ``kernel.timings`` (``ready``; ``queue`` for a queue)."""

    def describe(self, process: KernelProcess) -> str:
        """A few words on where the kernel is, for errors and logs ("job 12 PENDING
        (Resources)"); "" if there is nothing to say. Default: ""."""
        return ""

    def ready_line(
        self, process: KernelProcess, timings: dict[str, float]
    ) -> tuple[str, tuple[Any, ...]]:
        """The log line (format, args) that says the kernel is ready, after the host
        alias and kernel id: where it runs and how long each stage took."""
        return "remote pid %s ready in %.3fs", (process.pid, timings.get("total", 0.0))

    def info(self, process: KernelProcess) -> dict[str, Any]:
        """What the provisioner's info adds about the kernel (a JSON-able dict, merged
        into it). Default: nothing."""
        return {}

    # -- diagnostics (sshpyk check, add/edit validation) ------------------------------

    #: (key, title) of this launcher's own ``sshpyk check`` stage, run just before the
    #: test kernel with :meth:`check_host`; None: no stage of its own
    check_stage: ClassVar[tuple[str, str] | None] = None

    async def check_host(self, agent: RemoteAgent, options: KernelOptions) -> dict[str, Any]:
        """Whether the host of ``agent`` can run this launcher's kernels with ``options``
        (no kernel is started): what it found (a JSON-able dict), or an SSHPykError
        saying what is missing. Used by :attr:`check_stage`, ``sshpyk list``'s live
        checks and ``sshpyk add``/``edit``. Default: nothing to check, ``{}``."""
        return {}

    def host_summary(self, info: dict[str, Any]) -> str:
        """:meth:`check_host`'s answer in one line. Default: ""."""
        return ""

    def remote_transport(self, transport: str) -> str:
        """What the local forwards connect to on the host for a kernel whose kernelspec
        asks for ``transport``: ``ipc`` (unix sockets), ``tcp`` (127.0.0.1 ports), or
        ``auto`` (the agent decides at launch, as for the kernel itself). Default:
        ``transport``."""
        return transport


#: every launcher, by name (filled by :func:`register`; sshpyk.kernels imports them)
LAUNCHERS: dict[str, Launcher] = {}


def register(cls: type[Launcher]) -> type[Launcher]:
    """Class decorator: make ``cls`` the launcher of its :attr:`~Launcher.name`."""
    LAUNCHERS[cls.name] = cls()
    return cls


def launcher_for(name: str | None) -> Launcher:
    """The launcher called ``name`` (None: the default, direct)."""
    key = name or LAUNCHER_NAMES[0]
    try:
        return LAUNCHERS[key]
    except KeyError:
        raise SSHPykError(f"unknown launcher {key!r} (one of {', '.join(LAUNCHERS)})") from None

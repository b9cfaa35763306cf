"""The launcher contract: how a kernel is started and brought up, per launcher.

A launcher is one way to run a kernel on the remote host: ``direct`` (a process next to
the agent) or a batch scheduler's (a job on an execution host). Each has one module on
each side: here (:mod:`sshpyk.kernels.direct`, one per scheduler) and in the agent
(``sshpyk.agent.remote.direct``, ...). A launcher is a :class:`Launcher` subclass
registered with :func:`register`, which is the only place it plugs in: its name and
:attr:`Launcher.help` (the ``launcher`` option's choices), its
:attr:`Launcher.options` (through the one config model: kernel.json, the provisioner,
``add``/``edit`` and the launch request derive from them), its
:attr:`Launcher.error_kinds` (remote error kinds -> classes of the one tree), its
:attr:`Launcher.remote_modules` (what :meth:`Launcher.prepare` sends to the agent),
its diagnostics and its ``ps`` columns (below). Nothing else names a launcher;
schedulers share :mod:`sshpyk.kernels.batch`.

:class:`~sshpyk.kernels.kernel.RemoteKernel` calls the hooks in this order for each
launch: :meth:`Launcher.start_timeout` (the bound on the whole start),
:meth:`Launcher.prepare`, :meth:`Launcher.event_listener`, the agent's launch, then
:meth:`Launcher.wait_ready`; :meth:`Launcher.describe` names the kernel's state in
errors and logs, :attr:`Launcher.stop_timeout` bounds its stop.

The diagnostics ask the launcher too: ``sshpyk check`` (:attr:`Launcher.check_stage`,
:meth:`Launcher.check_host`, :meth:`Launcher.fix`), ``sshpyk list``
(:meth:`Launcher.command_tail`, :meth:`Launcher.listing_lines`,
:meth:`Launcher.live_kernel`, :attr:`Launcher.check_field`), ``sshpyk ps``/``kill``
(:meth:`Launcher.prepare`, :attr:`Launcher.ps_columns`, :meth:`Launcher.ps_cells`,
:meth:`Launcher.kill_note`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from ..agent.kinds import add_error_classes, remove_error_classes
from ..config import DEFAULTS, ConfigField, config_fields
from ..errors import SSHPykError
from ..options import register_launcher, unregister_launcher

if TYPE_CHECKING:
    from ..agent.client import RemoteAgent
    from ..agent.process import EventListener, KernelProcess
    from ..kernelspec import SSHKernelSpec
    from .kernel import KernelOptions, RemoteKernel

__all__ = ["LAUNCHERS", "Launcher", "find_launcher", "launcher_for", "register", "unregister"]


class Launcher(abc.ABC):
    """One way to run a kernel; stateless (one instance serves every kernel)."""

    #: the ``launcher`` value of kernel.json and of the launch request
    name: ClassVar[str]
    #: what it does, in a few words (the ``launcher`` option's help)
    help: ClassVar[str]
    #: its own kernel options (:func:`sshpyk.config.launcher_field`, ``launcher`` set
    #: to :attr:`name`): kernel.json keys, provisioner traits, ``add``/``edit`` flags and,
    #: where ``request``, launch request fields; attributes of KernelConfig and
    #: KernelOptions
    options: ClassVar[tuple[ConfigField, ...]] = ()
    #: the error kinds its remote side reports, and the class of the tree each maps to
    error_kinds: ClassVar[dict[str, type[SSHPykError]]] = {}
    #: the agent's modules it needs beyond the core, in dependency order (sent once per
    #: agent by :meth:`prepare`)
    remote_modules: ClassVar[tuple[str, ...]] = ()
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

    async def prepare(self, agent: RemoteAgent) -> None:
        """Called before each launch on ``agent``, and before ``ps``/``kill`` on a host
        that may run this launcher's kernels: load what the agent needs to run, list
        and kill them. Default: send :attr:`remote_modules` (once per agent)."""
        if self.remote_modules:
            await agent.load(self.name, self.remote_modules)

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

    def fix(self, exc: BaseException, change: Callable[[str], str], alias: str) -> str | None:
        """What ``sshpyk check`` suggests for ``exc``, an error of this launcher's (its
        :attr:`check_stage`, or the test kernel's start): one line, or None for the
        generic advice. ``change(option)`` says how the user changes an option of the
        kernelspec; ``alias`` is the host. Default: None."""
        return None

    def remote_transport(self, transport: str) -> str:
        """What the local forwards connect to on the host for a kernel whose kernelspec
        asks for ``transport``: ``ipc`` (unix sockets), ``tcp`` (127.0.0.1 ports), or
        ``auto`` (the agent decides at launch, as for the kernel itself). Default:
        ``transport``."""
        return transport

    # -- sshpyk list ------------------------------------------------------------------

    #: the kernelspec field under which ``sshpyk list --json`` reports the status of
    #: :meth:`check_host` (``checks[check_field]``, "skip" for other launchers'
    #: kernels); None: not reported
    check_field: ClassVar[str | None] = None

    def command_tail(self, spec: SSHKernelSpec) -> str:
        """What ``sshpyk list``'s one-line command adds after the agent for ``spec``
        (" -> srun ..."): how the agent runs the kernel. Default: ""."""
        return ""

    def listing_lines(
        self, spec: SSHKernelSpec, remote: dict[str, Any], marked: Callable[[object], str]
    ) -> list[tuple[str, str]]:
        """``sshpyk list``'s (label, value) lines on this launcher's settings of
        ``spec``, after Local Transport. With live checks ``remote`` holds
        :meth:`check_host`'s answer under :attr:`name` and the :meth:`live_kernel`
        entries under ``name + "_jobs"`` (absent without them, or when not reached);
        ``marked(value)`` prefixes ``value`` with the status of :meth:`check_host`.
        Default: none."""
        return []

    def live_kernel(self, entry: dict[str, Any], options: KernelOptions) -> dict[str, Any] | None:
        """``sshpyk list``'s live check, for a launcher with a :attr:`check_stage`: a
        ``ps`` ``entry`` of a running kernel of this launcher with ``options``'s remote
        kernel name, as recorded under ``remote[name + "_jobs"]`` (a JSON-able dict), or
        None if it was not started with ``options``'s launcher options. Default: None."""
        return None

    # -- sshpyk ps --------------------------------------------------------------------

    #: the titles of the columns ``sshpyk ps`` adds when this launcher's kernels are
    #: listed (other kernels get "-" there)
    ps_columns: ClassVar[tuple[str, ...]] = ()

    def ps_cells(self, entry: dict[str, Any]) -> list[str]:
        """One cell per :attr:`ps_columns` for ``entry`` (a ``ps`` answer entry of one
        of this launcher's kernels). Default: none."""
        return []

    def kill_note(self, entry: dict[str, Any]) -> str:
        """What ``sshpyk kill`` adds to its line on a killed kernel (a ``kill`` answer
        entry), e.g. "; cancelled <scheduler> job 12". Default: ""."""
        return ""


#: every launcher, by name (filled by :func:`register`; sshpyk.kernels imports them)
LAUNCHERS: dict[str, Launcher] = {}


def register(cls: type[Launcher]) -> type[Launcher]:
    """Class decorator: make ``cls`` the launcher of its :attr:`~Launcher.name`, with
    its options in the config model and its error kinds in the table of kinds."""
    if cls.name in LAUNCHERS:
        raise ValueError(f"a launcher named {cls.name!r} is already registered")
    register_launcher(cls.name, cls.help, cls.options)
    add_error_classes(cls.error_kinds)
    LAUNCHERS[cls.name] = cls()
    return cls


def unregister(name: str) -> None:
    """Undo :func:`register` (a launcher registered for a while: a test's double)."""
    launcher = LAUNCHERS.pop(name, None)
    if launcher is not None:
        unregister_launcher(name)
        remove_error_classes(launcher.error_kinds)


def launcher_for(name: str | None) -> Launcher:
    """The launcher called ``name`` (None: the default, direct)."""
    key = name or DEFAULTS.launcher
    try:
        return LAUNCHERS[key]
    except KeyError:
        raise SSHPykError(f"unknown launcher {key!r} (one of {', '.join(LAUNCHERS)})") from None


def find_launcher(name: str | None) -> Launcher | None:
    """The launcher called ``name`` (None: the default, direct), or None when there is
    none of that name (a ``ps`` entry or a kernel.json of another sshpyk version)."""
    return LAUNCHERS.get(name or DEFAULTS.launcher)

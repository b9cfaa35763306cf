"""The vocabulary of ``sshpyk check``: stage statuses and results, what is checked
(:class:`CheckTarget`), and :class:`Diagnosis`, the state the stages share and record
their results in."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NoReturn

from ..agent.client import RemoteAgent
from ..kernels.kernel import KernelOptions
from ..kernels.launcher import LAUNCHERS
from ..kernels.session import SSHSession
from ..kernelspec import SSHKernelSpec
from ..ssh.hosts import HostOptions, HostSettings

__all__ = [
    "ALL_STAGES",
    "STAGES",
    "CheckTarget",
    "Diagnosis",
    "StageFailedError",
    "StageResult",
    "Status",
    "one_line",
]


class Status(enum.Enum):
    OK = "ok"
    FAIL = "fail"
    WARN = "warn"
    SKIP = "skip"

    @property
    def mark(self) -> str:
        return _MARKS[self]


_MARKS = {Status.OK: "(v)", Status.FAIL: "(x)", Status.WARN: "(!)", Status.SKIP: "(-)"}

#: (key, title) of every stage of ``sshpyk check``, in order
STAGES: tuple[tuple[str, str], ...] = (
    ("config", "config resolution"),
    ("tcp", "TCP connect"),
    ("hostkey", "host key"),
    ("auth", "authentication"),
    ("python", "remote python"),
    ("jupyter_client", "jupyter_client"),
    ("kernelspec", "remote kernelspec"),
    ("forwarding", "TCP forwarding"),
    ("ipc", "ipc (unix sockets)"),
    ("kernel", "test kernel"),
)
#: every stage any target may run: the common ones, then each launcher's own
ALL_STAGES: tuple[tuple[str, str], ...] = (
    *STAGES,
    *(launcher.check_stage for launcher in LAUNCHERS.values() if launcher.check_stage),
)
_TITLES = dict(ALL_STAGES)


@dataclass
class StageResult:
    stage: str
    status: Status
    seconds: float | None
    detail: str
    fix: str | None = None

    @property
    def title(self) -> str:
        return _TITLES[self.stage]

    def as_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "title": self.title,
            "status": self.status.value,
            "seconds": None if self.seconds is None else round(self.seconds, 4),
            "detail": self.detail,
            "fix": self.fix,
        }


_OPTIONS = KernelOptions()


@dataclass
class CheckTarget:
    """What to check: a host alias alone, or everything an SSH kernelspec needs (the
    fields named as in :class:`~sshpyk.kernel.KernelOptions`, with its defaults)."""

    alias: str
    ssh_config: str | None = None
    python: str = _OPTIONS.python
    kernel_name: str = _OPTIONS.kernel_name
    pre_command: str | None = _OPTIONS.pre_command
    transport: str = _OPTIONS.transport
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = _OPTIONS.cwd
    run_root: str | None = _OPTIONS.run_root
    start_timeout: float = _OPTIONS.start_timeout
    launcher: str = _OPTIONS.launcher
    #: the launchers' own options (KernelOptions.launcher_options: parsed, by their
    #: kernel names)
    launcher_options: dict[str, Any] = field(default_factory=dict)
    #: the local kernelspec being checked, if any (used in suggested fixes)
    kernel: str | None = None

    @classmethod
    def from_spec(cls, spec: SSHKernelSpec) -> CheckTarget:
        options = asdict(KernelOptions.from_config(spec))
        own = {f.name for f in fields(cls)}
        return cls(
            alias=spec.ssh_host_alias,
            ssh_config=spec.ssh_config,
            kernel=spec.name,
            **{k: v for k, v in options.items() if k in own},
        )

    def kernel_options(self) -> KernelOptions:
        """The test kernel's options: this target's, the others at their defaults."""
        own = asdict(self)
        names = [f.name for f in fields(KernelOptions) if f.name in own]
        return KernelOptions(**{name: own[name] for name in names})

    def change(self, option: str) -> str:
        """How the user changes ``option`` for this target, for suggested fixes."""
        if self.kernel:
            return f"`sshpyk edit {self.kernel} {option}`"
        return f"`{option}`"


class StageFailedError(Exception):
    """Stops the stage runner: a fatal stage failed (its result is already recorded)."""


def one_line(text: object) -> str:
    return " ".join(str(text).split())


class Diagnosis:
    """What the stages of one ``sshpyk check`` share: the target, the connection and
    agent once the stages reached them, and the results so far."""

    def __init__(
        self,
        target: CheckTarget,
        *,
        timeout: float,
        test_kernel: bool,
        report: Callable[[StageResult], None],
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.test_kernel = test_kernel
        self.report = report
        self.results: list[StageResult] = []
        self.config: str | None = None
        self.settings: HostSettings | None = None
        self.options: HostOptions | None = None
        self.session: SSHSession | None = None
        self.agent: RemoteAgent | None = None
        self.kernelspec: dict[str, Any] = {}
        #: False when run dirs there are too long for unix sockets (auto then picks tcp)
        self.ipc_path_ok = True

    # -- bookkeeping ----------------------------------------------------------------
    def record(
        self,
        stage: str,
        status: Status,
        seconds: float | None,
        detail: str,
        fix: str | None = None,
    ) -> StageResult:
        result = StageResult(stage, status, seconds, one_line(detail), fix)
        self.results.append(result)
        self.report(result)
        return result

    def fail(self, stage: str, seconds: float | None, detail: str, fix: str | None) -> NoReturn:
        self.record(stage, Status.FAIL, seconds, detail, fix)
        raise StageFailedError(stage)

    def where(self) -> str:
        return self.config or "~/.ssh/config"

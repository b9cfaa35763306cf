"""Diagnostics: the staged ``sshpyk check`` and the live checks behind ``sshpyk list``.

``sshpyk check`` walks the path a kernel start takes, one stage at a time, timing
each and stopping at the first fatal failure, with a suggested fix for it::

    config resolution -> TCP connect -> host key -> authentication -> remote python
    -> jupyter_client -> remote kernelspec -> TCP forwarding -> ipc (unix sockets)
    [-> SLURM (login node), for --launcher slurm] -> test kernel started and answering

For a SLURM kernelspec the test kernel is a real job (its id, node and state are
reported).

``sshpyk list`` runs lighter checks (alias reachable, remote python usable,
remote kernelspec present): one connection per host, every host concurrently,
each bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import shlex
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NoReturn

import asyncssh

from .errors import (
    AuthenticationError,
    ConnectError,
    ConnectTimeoutError,
    ForwardingRefusedError,
    HostKeyError,
    HostNotFoundError,
    HostRefusedError,
    KernelStartError,
    KernelStartTimeoutError,
    ProtocolError,
    RemoteJupyterClientMissingError,
    RemoteKernelSpecNotFoundError,
    RemotePythonNotFoundError,
    SSHPykError,
    translating,
)
from .kernel import KernelOptions
from .kernelspec import SSHKernelSpec
from .remote import RemoteAgent, python_command
from .session import SSHSession
from .slurm import parse_slurm_args, slurm_summary
from .ssh.hostkeys import DEFAULT_KNOWN_HOSTS, KeyRecorder
from .ssh.hosts import HostOptions, HostSettings, alias_in_config, config_path, resolve_host

__all__ = [
    "SLURM_STAGE",
    "STAGES",
    "CheckTarget",
    "KernelStatus",
    "StageResult",
    "Status",
    "check_kernels",
    "run_check",
    "stages_for",
]

#: A loopback port nothing should listen on: sshd answers "connect failed" (2) when it
#: allows TCP forwarding and "administratively prohibited" (1) when it does not.
PROBE_PORT = 1
#: bootstrap.py's limit for the run dir prefix of unix sockets (sun_path is 108 bytes)
MAX_IPC_PREFIX = 100
#: what a kernel's run dir adds to its root: "/sshpyk-<8 of kernel id>-<8 random>/k"
_RUN_DIR_TAIL = "/sshpyk-12345678-abcdefgh/k"
DEFAULT_GRACE = KernelOptions().grace


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
#: checked before the test kernel for SLURM kernelspecs only: srun, sinfo, the job options
SLURM_STAGE = ("slurm", "SLURM (login node)")
_TITLES = dict((*STAGES, SLURM_STAGE))


def stages_for(launcher: str) -> tuple[tuple[str, str], ...]:
    """The stages ``sshpyk check`` runs for a kernelspec with this launcher."""
    if launcher != "slurm":
        return STAGES
    return (*STAGES[:-1], SLURM_STAGE, STAGES[-1])


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
    slurm_args: list[str] = field(default_factory=list)
    slurm_queue_timeout: float = _OPTIONS.slurm_queue_timeout
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


class _StageFailedError(Exception):
    """Stops the stage runner: a fatal stage failed (its result is already recorded)."""


class _TimingClient(KeyRecorder):
    """Notes when the TCP connection, the key exchange and the authentication end
    (and, as a KeyRecorder, the host key known_hosts did not trust)."""

    def __init__(self, marks: dict[str, float], offered: list[tuple[asyncssh.SSHKey, str]]) -> None:
        super().__init__(offered)
        self.marks = marks

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        self.marks.setdefault("tcp", time.monotonic())

    def begin_auth(self, username: str) -> None:
        # called once the key exchange is done, i.e. the host key was accepted
        self.marks.setdefault("hostkey", time.monotonic())

    def auth_completed(self) -> None:
        self.marks.setdefault("auth", time.monotonic())


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


class _Diagnosis:
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
        result = StageResult(stage, status, seconds, _one_line(detail), fix)
        self.results.append(result)
        self.report(result)
        return result

    def fail(self, stage: str, seconds: float | None, detail: str, fix: str | None) -> NoReturn:
        self.record(stage, Status.FAIL, seconds, detail, fix)
        raise _StageFailedError(stage)

    async def run(self) -> list[StageResult]:
        try:
            await self.stage_config()
            await self.stage_connect()
            await self.stage_python()
            await self.stage_kernelspec()
            await self.stage_forwarding()
            await self.stage_ipc()
            if self.target.launcher == "slurm":
                await self.stage_slurm()
            await self.stage_kernel()
        except _StageFailedError:
            done = {r.stage for r in self.results}
            for stage, _ in stages_for(self.target.launcher):
                if stage not in done:
                    self.record(stage, Status.SKIP, None, "skipped: an earlier stage failed")
        finally:
            if self.session is not None:
                await self.session.aclose()
        return self.results

    def where(self) -> str:
        return self.config or "~/.ssh/config"

    # -- stages ---------------------------------------------------------------------
    async def stage_config(self) -> None:
        t = self.target
        started = time.monotonic()
        try:
            self.config = config_path(t.ssh_config)
            self.settings, self.options = await asyncio.wait_for(
                resolve_host(t.alias, self.config), self.timeout
            )
        except (SSHPykError, asyncio.TimeoutError) as exc:
            self.fail(
                "config",
                time.monotonic() - started,
                str(exc) or "timed out reading the ssh config",
                f"fix the file named above; `ssh -G {t.alias}` shows how OpenSSH reads it",
            )
        seconds = time.monotonic() - started
        assert self.settings is not None
        detail = self.settings.summary() + (f" (from {self.config})" if self.config else "")
        if not alias_in_config(t.alias, self.config) and self.settings.hostname == t.alias:
            self.record(
                "config",
                Status.WARN,
                seconds,
                f"{t.alias!r} is not a Host in "
                f"{self.config or 'any ssh config'}: used as a host name; {detail}",
                f"add a `Host {t.alias}` block with HostName, User and IdentityFile to "
                f"{self.where()}",
            )
        else:
            self.record("config", Status.OK, seconds, detail)

    async def stage_connect(self) -> None:
        """TCP connect, key exchange + host key, authentication: the connection kernels
        use (the pool's, through the same ProxyJump hops), timed by its SSH client."""
        t, settings = self.target, self.settings
        assert settings is not None
        marks: dict[str, float] = {}
        started = time.monotonic()
        try:
            self.session = await asyncio.wait_for(
                SSHSession.connect(
                    t.alias,
                    ssh_config=self.config,
                    connect_timeout=self.timeout,
                    client_factory=lambda offered: _TimingClient(marks, offered),
                ),
                self.timeout,
            )
            conn = await self.session.connection()
        except (SSHPykError, asyncio.TimeoutError) as exc:
            self._connect_failed(exc, started, marks)
        via = self._via()
        tcp_at = marks.get("tcp", started)
        key_at = marks.get("hostkey", tcp_at)
        auth_at = marks.get("auth", key_at)
        self.record("tcp", Status.OK, tcp_at - started, f"{settings.hostname}:{settings.port}{via}")
        key = conn.get_server_host_key()
        key_text = f"{key.get_algorithm()} {key.get_fingerprint()}" if key else "host key"
        self.record("hostkey", Status.OK, key_at - tcp_at, f"{key_text} matches known_hosts")
        user = conn.get_extra_info("username") or settings.user
        self.record("auth", Status.OK, auth_at - key_at, f"logged in as {user}")

    def _via(self) -> str:
        settings = self.settings
        if settings and settings.proxy_jump:
            return f" via ProxyJump {settings.proxy_jump}"
        if settings and settings.proxy_command:
            return " via ProxyCommand"
        return ""

    def _connect_failed(
        self,
        exc: BaseException,
        started: float,
        marks: dict[str, float],
    ) -> NoReturn:
        t, settings = self.target, self.settings
        assert settings is not None
        now = time.monotonic()
        timed_out = isinstance(exc, (asyncio.TimeoutError, ConnectTimeoutError))
        if timed_out:
            error: SSHPykError = ConnectError(
                f"no answer from {t.alias!r} within {self.timeout:g}s"
            )
        else:
            assert isinstance(exc, SSHPykError)
            error = exc
        if "tcp" not in marks and (
            settings.proxy_jump or not isinstance(error, (HostKeyError, AuthenticationError))
        ):
            stage = "tcp"  # the target was not reached (a bastion's failure says why)
        elif isinstance(error, HostKeyError):
            stage = "hostkey"
        elif isinstance(error, AuthenticationError):
            stage = "auth"
        elif "tcp" not in marks:
            stage = "tcp"
        elif "hostkey" not in marks:
            stage = "hostkey"
        else:
            stage = "auth"
        endpoint = f"{settings.hostname}:{settings.port}"
        passed = {"tcp": endpoint + self._via(), "hostkey": "host key accepted"}
        previous = started
        for name in ("tcp", "hostkey", "auth"):
            if name == stage:
                break
            self.record(name, Status.OK, marks.get(name, previous) - previous, passed[name])
            previous = marks.get(name, previous)
        if stage == "tcp":
            if isinstance(error, HostKeyError) and error.fix:
                fix = error.fix
            elif isinstance(error, HostRefusedError):
                fix = (
                    f"nothing listens on {endpoint}: start sshd there, or fix Port for "
                    f"{t.alias} in {self.where()}"
                )
            elif isinstance(error, HostNotFoundError):
                fix = (
                    f"add `Host {t.alias}` with a HostName to {self.where()}, or fix the "
                    f"name (HostName {settings.hostname})"
                )
            else:
                fix = (
                    f"check that {endpoint} is up and reachable from here (firewall, VPN, "
                    "ProxyJump); `ssh -v " + t.alias + "` shows the same"
                )
        elif stage == "hostkey" and isinstance(error, HostKeyError) and error.fix:
            fix = error.fix
        elif stage == "hostkey" and isinstance(error, HostKeyError):
            host = (
                settings.hostname
                if settings.port == 22
                else f"[{settings.hostname}]:{settings.port}"
            )
            files = list(settings.known_hosts) or [os.path.expanduser(DEFAULT_KNOWN_HOSTS)]
            file_arg = (
                ""
                if files == [os.path.expanduser(DEFAULT_KNOWN_HOSTS)]
                else f" -f {files[0]}"
                if len(files) == 1
                else " -f FILE"
            )
            fix = (
                f"verify the host's key fingerprint with its admin (a changed key may mean an "
                f"attack); if it was reinstalled: `ssh-keygen -R '{host}'{file_arg}`, then "
                f"`ssh {t.alias}` once to accept the new key (known_hosts: "
                + ", ".join(files)
                + ")"
            )
        elif stage == "hostkey":
            fix = (
                f"{endpoint} accepted the TCP connection but the SSH handshake failed: is it "
                f"an sshd (and not another service)? `ssh -v {t.alias}` shows the exchange"
            )
        elif timed_out:
            fix = f"the host did not finish authentication in time: try `ssh -v {t.alias} true`"
        else:
            keys = ", ".join(settings.identity_files) or "your default keys"
            fix = (
                f"make `ssh {t.alias} true` work without a password: check User "
                f"({settings.user}) and IdentityFile ({keys}), then `ssh-copy-id {t.alias}`"
            )
        detail: object = error
        if stage == "hostkey" and isinstance(error, HostKeyError) and error.problem:
            detail = error.problem
        self.fail(stage, now - previous, str(detail), fix)

    async def stage_python(self) -> None:
        t = self.target
        started = time.monotonic()
        assert self.session is not None
        try:
            # the same agent key as the test kernel's, so that one is reused
            self.agent = await asyncio.wait_for(
                self.session.agent(
                    t.python, t.pre_command, grace=DEFAULT_GRACE, run_root=t.run_root
                ),
                self.timeout,
            )
        except (SSHPykError, asyncio.TimeoutError) as exc:
            if isinstance(exc, asyncio.TimeoutError):
                detail = f"the remote python did not answer within {self.timeout:g}s"
            else:
                detail = str(exc)
            if isinstance(exc, RemotePythonNotFoundError):
                fix = (
                    "install Python >= 3.8 with jupyter_client there, or point at one: "
                    + t.change("--remote-python /path/to/env")
                )
            elif isinstance(exc, ProtocolError):
                fix = (
                    "make the remote shell's startup files print nothing for non-interactive "
                    "sessions (e.g. guard `echo` in ~/.bashrc with `[[ $- == *i* ]]`)"
                )
            elif t.pre_command:
                fix = f"check the pre-command: `ssh {t.alias} '{t.pre_command}'`"
            else:
                fix = f"run `ssh {t.alias} {shlex.quote(t.python)} -V` to see what happens"
            self.fail("python", time.monotonic() - started, detail, fix)
        assert self.agent is not None
        info = self.agent.info
        self.record(
            "python",
            Status.OK,
            time.monotonic() - started,
            f"{info.get('python')} (Python {info.get('python_version')})",
        )
        version = info.get("jupyter_client")
        if not version:
            self.fail(
                "jupyter_client",
                0.0,
                f"jupyter_client is not installed for {info.get('python')}",
                f"`{info.get('python')} -m pip install jupyter_client ipykernel` on the host, or "
                + t.change("--remote-python /path/to/env")
                + " to use an environment that has it",
            )
        major = str(version).split(".")[0]
        if major.isdigit() and int(major) < 7:
            self.record(
                "jupyter_client",
                Status.WARN,
                0.0,
                f"jupyter_client {version}: old, kernelspecs may resolve differently",
                f"`{info.get('python')} -m pip install -U jupyter_client`",
            )
        else:
            self.record("jupyter_client", Status.OK, 0.0, f"jupyter_client {version}")

    async def stage_kernelspec(self) -> None:
        t = self.target
        assert self.agent is not None
        started = time.monotonic()
        try:
            self.kernelspec = await asyncio.wait_for(
                self.agent.inspect(t.kernel_name), self.timeout
            )
        except (SSHPykError, asyncio.TimeoutError) as exc:
            detail = str(exc) or f"no answer within {self.timeout:g}s"
            if isinstance(exc, RemoteKernelSpecNotFoundError):
                fix = (
                    "pick one of the available kernels: "
                    + t.change("--remote-kernel-name NAME")
                    + f", or install it there (`{t.python} -m ipykernel install --user`)"
                )
            elif isinstance(exc, RemoteJupyterClientMissingError):
                fix = f"`{t.python} -m pip install jupyter_client ipykernel` on the host"
            else:
                fix = None
            self.fail("kernelspec", time.monotonic() - started, detail, fix)
        spec = self.kernelspec
        self.record(
            "kernelspec",
            Status.OK,
            time.monotonic() - started,
            f"{t.kernel_name}: {spec.get('display_name')!r}, {spec.get('language')}, "
            f"interrupt {spec.get('interrupt_mode') or 'signal'}, in {spec.get('resource_dir')}",
        )

    def expected_transport(self) -> str:
        """The transport a kernel start would pick (like bootstrap.pick_transport)."""
        if self.target.launcher == "slurm":
            return "tcp"  # unix sockets do not cross from the login node to the node
        if self.target.transport != "auto":
            return self.target.transport
        argv = " ".join(str(a) for a in self.kernelspec.get("argv") or [])
        if "ipykernel" in argv and self.ipc_path_ok:
            return "ipc"
        return "tcp"

    async def stage_forwarding(self) -> None:
        assert self.session is not None
        started = time.monotonic()
        try:
            refused = await asyncio.wait_for(self._tcp_forwarding_refused(), self.timeout)
        except (SSHPykError, asyncio.TimeoutError) as exc:
            self.fail(
                "forwarding",
                time.monotonic() - started,
                str(exc) or f"no answer within {self.timeout:g}s",
                None,
            )
        seconds = time.monotonic() - started
        if not refused:
            self.record("forwarding", Status.OK, seconds, "sshd allows TCP forwarding")
            return
        detail = f"sshd refuses TCP forwarding ({refused})"
        fix = f"set `AllowTcpForwarding yes` in the sshd_config of {self.target.alias}"
        if self.expected_transport() == "tcp":
            self.record(
                "forwarding",
                Status.FAIL,
                seconds,
                detail + ": tcp transport cannot work",
                fix + ", or use ipc: " + self.target.change("--transport ipc"),
            )
        else:
            self.record(
                "forwarding",
                Status.WARN,
                seconds,
                detail + ": fine for the ipc transport, fatal for tcp",
                fix,
            )

    async def _tcp_forwarding_refused(self) -> str | None:
        assert self.session is not None
        conn = await self.session.connection()
        with translating(self.target.alias, config=self.config):
            try:
                _, writer = await conn.open_connection("127.0.0.1", PROBE_PORT)
            except asyncssh.ChannelOpenError as exc:
                if exc.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED:
                    return _one_line(exc.reason) or "administratively prohibited"
                return None  # connect failed on the remote side: forwarding is allowed
        writer.close()
        return None

    async def stage_ipc(self) -> None:
        t = self.target
        started = time.monotonic()
        try:
            path, refused = await asyncio.wait_for(self._ipc_probe(), self.timeout)
        except (SSHPykError, asyncio.TimeoutError) as exc:
            detail = str(exc) or f"no answer within {self.timeout:g}s"
            self._ipc_result(
                time.monotonic() - started, f"cannot probe unix sockets: {detail}", None
            )
            return
        seconds = time.monotonic() - started
        root = os.path.dirname(os.path.dirname(path))
        if len(root) + len(_RUN_DIR_TAIL) > MAX_IPC_PREFIX:
            self.ipc_path_ok = False
            self._ipc_result(
                seconds,
                f"run dirs under {root} are too long for unix sockets",
                "use a shorter remote run root: " + t.change("--remote-run-root /tmp"),
            )
        elif refused:
            self._ipc_result(
                seconds,
                f"sshd refuses unix socket forwarding ({refused})",
                f"set `AllowStreamLocalForwarding yes` in the sshd_config of {t.alias}",
            )
        else:
            self.record(
                "ipc",
                Status.OK,
                seconds,
                f"unix socket forwarding works (probe socket in {os.path.dirname(path)})",
            )

    def _ipc_result(self, seconds: float, detail: str, fix: str | None) -> None:
        t = self.target
        if t.transport == "ipc" or (t.transport == "auto" and self.expected_transport() == "ipc"):
            self.record(
                "ipc",
                Status.FAIL,
                seconds,
                detail + f": the {t.transport} transport needs it",
                (fix + ", or " if fix else "") + "use tcp: " + t.change("--transport tcp"),
            )
        else:
            tail = "auto picks tcp" if t.transport == "auto" else f"not needed for {t.transport}"
            self.record("ipc", Status.WARN, seconds, f"{detail} ({tail})", fix)

    async def _ipc_probe(self) -> tuple[str, str | None]:
        """Bind a unix socket where kernels would go and open a channel to it.

        Returns (socket path, refusal reason or None). OpenSSH answers "open failed"
        both for a refused and for a missing socket, so only a listening socket tells
        whether forwarding is allowed.
        """
        t = self.target
        assert self.session is not None
        conn = await self.session.connection()
        command = python_command(t.python, t.pre_command, _IPC_PROBE, t.run_root or "")
        process = await conn.create_process(command.command)
        try:
            if command.stdin:
                process.stdin.write(command.stdin.decode("utf-8"))
            line = await process.stdout.readline()
            path = line.strip()
            if not path.startswith("/"):
                await asyncio.wait_for(process.wait_closed(), 5)
                stderr = _one_line(await process.stderr.read())
                raise SSHPykError(
                    "the unix socket probe failed on "
                    f"{t.alias!r}: {stderr or path or f'exit status {process.exit_status}'}"
                )
            try:
                _, writer = await conn.open_unix_connection(path)
            except asyncssh.ChannelOpenError as exc:
                return path, _one_line(exc.reason) or "open failed"
            writer.close()
            return path, None
        finally:
            with contextlib.suppress(Exception):
                process.stdin.write_eof()  # the probe removes its socket and exits
            try:
                await asyncio.wait_for(process.wait_closed(), 5)
            except asyncio.TimeoutError:
                process.close()

    async def stage_slurm(self) -> None:
        """srun and sinfo work on the login node, and ``srun --test-only`` accepts the
        kernelspec's SLURM arguments (no job is submitted)."""
        t = self.target
        assert self.agent is not None
        started = time.monotonic()
        try:
            info = await asyncio.wait_for(self.agent.slurm_info(t.slurm_args), self.timeout)
        except (SSHPykError, asyncio.TimeoutError) as exc:
            detail = str(exc) or f"no answer within {self.timeout:g}s"
            if "not found on the PATH" in detail:
                fix = (
                    "install SLURM's client commands on the login node, or load them first: "
                    + t.change("--pre-command 'module load slurm'")
                )
            elif "rejects the SLURM arguments" in detail:
                fix = "fix the job options: " + t.change('--slurm-args "--partition=..."')
            else:
                fix = f"see what SLURM says: `ssh {t.alias} sinfo`"
            self.fail("slurm", time.monotonic() - started, detail, fix)
        partitions = ", ".join(
            f"{p['partition']} {p['avail']} ({p['nodes']} {p['state']})"
            for p in info.get("partitions") or []
        )
        detail = f"{info.get('version')}, srun at {info.get('srun')}"
        detail += f"; partitions: {partitions or 'none'}"
        if info.get("test"):
            detail += f"; {info['test']}"
        self.record("slurm", Status.OK, time.monotonic() - started, detail)

    async def stage_kernel(self) -> None:
        t = self.target
        if not self.test_kernel:
            self.record("kernel", Status.SKIP, None, "skipped (--no-kernel)")
            return
        assert self.session is not None
        options = t.kernel_options()
        started = time.monotonic()
        limit = options.total_start_timeout + self.timeout
        try:
            detail = await asyncio.wait_for(self._test_kernel(options), limit)
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
            self.fail("kernel", time.monotonic() - started, detail, fix)
        self.record("kernel", Status.OK, time.monotonic() - started, detail)

    async def _test_kernel(self, options: KernelOptions) -> str:
        assert self.session is not None
        kernel = await self.session.start_kernel(options=options)
        try:
            process = kernel.process
            started = time.monotonic()
            client = kernel.client()
            client.start_channels()
            try:
                await client.wait_for_ready(timeout=self.timeout)
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


#: Run by the remote Python: bind a unix socket where run dirs go, print its path,
#: wait for stdin EOF, remove it. Python >= 3.8, stdlib only.
_IPC_PROBE = """
import os, socket, sys, tempfile
root = sys.argv[1] if len(sys.argv) > 1 else ""
if root:
    os.makedirs(root, mode=0o700, exist_ok=True)
    roots = [root]
else:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    roots = [r for r in (xdg, tempfile.gettempdir()) if r and os.access(r, os.W_OK)]
d = tempfile.mkdtemp(prefix="sshpyk-check-", dir=roots[0])
p = os.path.join(d, "k-1")
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.bind(p)
    s.listen(4)
    print(p, flush=True)
    sys.stdin.read()
finally:
    s.close()
    if os.path.exists(p):
        os.unlink(p)
    os.rmdir(d)
"""


async def run_check(
    target: CheckTarget,
    *,
    timeout: float = 30.0,
    test_kernel: bool = True,
    report: Callable[[StageResult], None] | None = None,
) -> list[StageResult]:
    """Run every stage for ``target``; ``report`` sees each result as it is recorded.

    Stops at the first fatal failure (later stages are reported as skipped). Each
    stage is bounded by ``timeout`` seconds (the test kernel by its start timeout plus
    ``timeout``). Never raises SSHPykError: failures are results.
    """
    diagnosis = _Diagnosis(
        target, timeout=timeout, test_kernel=test_kernel, report=report or (lambda r: None)
    )
    return await diagnosis.run()


# -- live checks for `sshpyk list` ------------------------------------------------------


@dataclass
class KernelStatus:
    """The live checks of one SSH kernelspec: host alias, remote python, remote kernel."""

    alias: Status = Status.SKIP
    python: Status = Status.SKIP
    kernel: Status = Status.SKIP
    #: SLURM kernelspecs: srun/sinfo work and `srun --test-only` accepts the arguments
    slurm: Status = Status.SKIP
    #: the remote python's facts and kernelspec (from the agent), when reached; for
    #: SLURM kernelspecs also "slurm" (version, partitions) and "slurm_jobs" (running)
    remote: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """Keyed like the kernelspec fields they check."""
        return {
            "ssh_host_alias": self.alias.value,
            "remote_python": self.python.value,
            "remote_kernel_name": self.kernel.value,
            "slurm_args": self.slurm.value,
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
    if spec.launcher == "slurm":
        await _check_slurm(agent, spec, status)


async def _check_slurm(agent: RemoteAgent, spec: SSHKernelSpec, status: KernelStatus) -> None:
    """SLURM on the login node, and the jobs running this kernelspec's kernels there."""
    args = parse_slurm_args(spec.slurm_args)
    try:
        status.remote["slurm"] = await agent.slurm_info(args)
    except SSHPykError as exc:
        status.slurm = Status.FAIL
        status.error = str(exc)
        return
    status.slurm = Status.OK
    jobs = []
    for k in await agent.ps(spec.remote_run_root, slurm=True):
        mine = k.get("kernel_name") == spec.remote_kernel_name and k.get("slurm_args") == args
        if k.get("launcher") == "slurm" and k.get("alive") and mine:
            jobs.append(
                {
                    "kernel_id": k.get("kernel_id"),
                    "job_id": k.get("job_id"),
                    "node": k.get("node"),
                    "state": k.get("slurm_state"),
                    "reason": k.get("slurm_reason"),
                }
            )
    status.remote["slurm_jobs"] = jobs


async def _check_host(
    alias: str, config: str | None, specs: list[SSHKernelSpec], statuses: dict[str, KernelStatus]
) -> None:
    started = time.monotonic()
    try:
        async with await SSHSession.connect(alias, ssh_config=config) as session:
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
        statuses[spec.name] = KernelStatus()
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

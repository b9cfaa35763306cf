"""RemoteKernel: a remote kernel plus its local forwards, across restarts.

The local ports are bound once (:class:`~sshpyk.kernels.forwards.ForwardSet`) and kept
for the life of the object; each (re)start launches a new remote process
(:class:`~sshpyk.agent.process.KernelProcess`) and points the forwards at it. What
differs between launchers goes through the launcher contract
(:mod:`sshpyk.kernels.launcher`).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from ..agent.client import LaunchRequest
from ..agent.process import KernelProcess
from ..agent.remote.protocol import Op
from ..config import (
    DEFAULTS,
    KernelConfig,
    config_fields,
    init_with_launcher_options,
    launcher_value,
)
from ..errors import KernelStartTimeoutError, RemoteError, SSHPykError
from ..tasks import wait_event
from .forwards import CHANNELS, ForwardSet
from .launcher import Launcher, launcher_for
from .webports import WebForwards

if TYPE_CHECKING:
    from jupyter_client.asynchronous import AsyncKernelClient

    from .session import SSHSession

__all__ = ["KernelOptions", "RemoteKernel"]

log = logging.getLogger("sshpyk")


_D = DEFAULTS


@dataclass
class KernelOptions:
    """How to start a kernel on the remote host: the kernel layer's view of a
    :class:`~sshpyk.config.KernelConfig` (:meth:`from_config`). Each field is the
    config option whose ``Option.kernel`` names it; its help and default are there.
    The launchers' own options (a scheduler's job arguments) are attributes too, and keyword
    arguments, under their kernel names (kept in :attr:`launcher_options`)."""

    kernel_name: str = _D.remote_kernel_name
    python: str = _D.remote_python
    transport: str = _D.transport
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = _D.remote_cwd
    pre_command: str | None = _D.pre_command
    run_root: str | None = _D.remote_run_root
    grace: float = _D.grace_period
    link_grace: float = _D.link_grace
    connection_persist: float = _D.connection_persist
    outage_buffer: float = _D.outage_buffer
    start_timeout: float = _D.start_timeout
    persistent: bool = _D.persistent
    prestart: int = _D.prestart
    idle_timeout: float = _D.idle_timeout
    launcher: str = _D.launcher
    #: explicit forwards, as given ("6006", "8080:db.internal:5432"; see webports.py)
    forward: list[str] = field(default_factory=list)
    auto_forward: bool = _D.auto_forward
    local_transport: str = _D.local_transport
    #: every launcher's own options by their kernel names, as the kernel layer takes
    #: them (parsed: job arguments split)
    launcher_options: dict[str, Any] = field(default_factory=dict)

    def __init__(self, **values: Any) -> None:
        init_with_launcher_options(self, values, by_kernel_name=True)

    def __getattr__(self, name: str) -> Any:
        return launcher_value(self, name, by_kernel_name=True)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__.get("launcher_options", ()):
            self.launcher_options[name] = value
        else:
            object.__setattr__(self, name, value)

    @classmethod
    def from_config(cls, config: KernelConfig) -> KernelOptions:
        values = config.kernel_values()
        values["env"] = {str(k): str(v) for k, v in values["env"].items()}
        return cls(**values)

    def launch_request(
        self,
        key: str,
        signature_scheme: str,
        env: dict[str, str] | None = None,
        *,
        spare_ok: bool = False,
    ) -> LaunchRequest:
        """What the agent is sent: the key, and the options KernelConfig marks
        ``request`` (those of other launchers left out); ``env`` adds to the kernel's
        environment. ``spare_ok``: a warm spare (started with a key of its own) may
        serve it (see ``prestart``)."""
        own = set(self.launcher_contract.request_fields())
        names = [
            f.option.kernel
            for f in config_fields()
            if f.option.request
            and f.option.kernel
            and (f.option.kernel in own or f.option.kernel == "launcher" or not f.option.launcher)
        ]
        options = {name: copy.copy(getattr(self, name)) for name in names}
        options["env"] = {**self.env, **(env or {})}
        if spare_ok:
            options["spare_ok"] = True
        return LaunchRequest(key, signature_scheme, options)

    @property
    def launcher_contract(self) -> Launcher:
        """The :class:`~sshpyk.kernels.launcher.Launcher` named by :attr:`launcher`."""
        return launcher_for(self.launcher)

    @property
    def total_start_timeout(self) -> float:
        """The whole start (a queue wait included), as the launcher bounds it."""
        return self.launcher_contract.start_timeout(self)


class RemoteKernel:
    """A kernel on the far side of an :class:`~sshpyk.SSHSession`."""

    def __init__(
        self,
        session: SSHSession,
        options: KernelOptions,
        kernel_id: str | None = None,
        *,
        client: str = "api",
    ):
        self.session = session
        self.options = options
        self.kernel_id = kernel_id or str(uuid.uuid4())
        #: what drives the kernel, for ``sshpyk ps``: "provisioner" (jupyter_client),
        #: "argv" (launch.py), "attach" (``sshpyk attach``), "api" (this class used directly)
        self.client_name = client
        # a forwarded connection may wait for a start, or for a reconnect after link loss
        self.forwards = ForwardSet(
            session,
            connect_timeout=max(options.total_start_timeout, options.link_grace) + 5,
            transport=options.local_transport,
            outage_buffer=options.outage_buffer,
        )
        self.process: KernelProcess | None = None
        #: the kernel's web apps and --forward ports (webports.py)
        self.web = WebForwards(session, self.kernel_id, options.forward)
        #: where a launcher logs its events (a batch job's queue state and walltime
        #: warning; the provisioner's self.log)
        self.logger = log
        self.key = ""
        self.signature_scheme = "hmac-sha256"
        #: durations of the last launch's stages, for logs and benchmarks
        self.timings: dict[str, float] = {}
        self.launches = 0

    @property
    def logger(self) -> Any:
        """Where launcher events and web forwards are logged (the provisioner's log)."""
        return self._logger

    @logger.setter
    def logger(self, logger: Any) -> None:
        self._logger = self.web.logger = logger

    # -- ports and connection info --------------------------------------------------
    @property
    def ports(self) -> dict[str, int]:
        return dict(self.forwards.ports)

    async def open_forwards(self) -> dict[str, int]:
        if not self.forwards.ports:
            await self.forwards.open()
        return self.ports

    def connection_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "transport": self.forwards.transport,
            "ip": self.forwards.ip,
            "key": self.key,
            "signature_scheme": self.signature_scheme,
            "kernel_name": self.options.kernel_name,
        }
        for channel in CHANNELS:
            info[f"{channel}_port"] = self.forwards.ports.get(channel, 0)
        return info

    # -- lifecycle ------------------------------------------------------------------
    async def start(self, key: str | None = None, signature_scheme: str = "hmac-sha256") -> None:
        """Bind the forwards (once) and launch the kernel, bounded by start_timeout."""
        await self.open_forwards()
        await self.launch(key or str(uuid.uuid4()), signature_scheme, spare_ok=key is None)

    async def launch(
        self,
        key: str,
        signature_scheme: str = "hmac-sha256",
        env: dict[str, str] | None = None,
        *,
        spare_ok: bool = False,
    ) -> None:
        """Launch a new remote kernel behind the existing forwards. ``spare_ok``: the
        caller takes the key from :meth:`connection_info` afterwards, so a warm spare
        (``prestart``), which has a key of its own, may serve. Only the first launch:
        a restart keeps the key, since jupyter_client's clients hold a copy of it."""
        if self.process is not None and self.process.poll() is None:
            raise SSHPykError(f"kernel {self.kernel_id} is already running")
        await self._discard_process()
        await self.forwards.rebind()  # jupyter_client removed the ipc files on restart
        await self.web.open_explicit()  # once: --forward ports stay across restarts
        spare_ok = spare_ok and not self.launches
        self.launches += 1
        self.key, self.signature_scheme = key, signature_scheme
        timeout = self.options.total_start_timeout
        try:
            await asyncio.wait_for(self._launch(env, spare_ok), timeout)
        except asyncio.TimeoutError as exc:
            process = self.process
            await asyncio.shield(self._discard_process())
            said = launcher_for(process.launcher).describe(process) if process else ""
            where = f" ({said})" if said else ""
            raise KernelStartTimeoutError(
                f"kernel {self.options.kernel_name!r} on {self.session.alias!r} did not start "
                f"within {timeout:g}s{where} (raise --start-timeout?)"
            ) from exc
        except BaseException:
            await asyncio.shield(self._discard_process())
            raise

    async def _launch(self, env: dict[str, str] | None, spare_ok: bool = False) -> None:
        alias, timings = self.session.alias, self.timings
        timings.clear()
        t0 = time.monotonic()
        await self.session.connection()
        timings["connect"] = time.monotonic() - t0
        opts = self.options
        request = opts.launch_request(self.key, self.signature_scheme, env, spare_ok=spare_ok)
        request.options["client"] = self.client_name
        launcher = opts.launcher_contract
        on_event = launcher.event_listener(self.logger, alias, self.kernel_id)
        # a launcher with nothing to prepare: the request goes with a new agent's hello
        ahead = None if launcher.remote_modules else (self.kernel_id, request, on_event)
        t1 = time.monotonic()
        agent = await self.session.agent(
            opts.python,
            opts.pre_command,
            grace=opts.grace,
            link_grace=opts.link_grace,
            run_root=opts.run_root,
            launch=ahead,
        )
        timings["agent"] = time.monotonic() - t1
        t1 = time.monotonic()
        if ahead is not None:  # its relay channel opens meanwhile (a warm spare: at once)
            self.forwards.open_ahead(agent.info.get("relay"), self.kernel_id)
        try:
            await launcher.prepare(agent)
            self.process = await agent.launch(self.kernel_id, request, on_event=on_event)
        except BaseException:
            agent.unlaunch()  # a launch sent with the hello and not taken: stopped
            self.forwards.drop_ahead()
            raise
        if self.process.key:  # a warm spare: its own key (jupyter_client takes it)
            self.key = self.process.key
        timings["spawn"] = time.monotonic() - t1
        log.debug(
            "[%s] kernel %s: remote pid %s, %s transport, run dir %s",
            alias,
            self.kernel_id,
            self.process.pid,
            self.process.transport,
            self.process.run_dir,
        )
        self.forwards.set_target(self.process)
        self.web.follow(self.process)
        await launcher.wait_ready(self, self.process)
        timings["total"] = time.monotonic() - t0
        log.debug(
            "[%s] kernel %s ready in %.3fs "
            "(connect %.3fs, agent %.3fs, spawn %.3fs, sockets %.3fs)",
            alias,
            self.kernel_id,
            timings["total"],
            timings["connect"],
            timings["agent"],
            timings["spawn"],
            timings.get("ready", 0.0),
        )

    @classmethod
    async def attach(
        cls,
        session: SSHSession,
        kernel_id: str,
        options: KernelOptions | None = None,
        *,
        key: str | None = None,
        ports: dict[str, int] | None = None,
        ip: str | None = None,
        client: str = "api",
    ) -> RemoteKernel:
        """Reattach to a kernel that runs on the host already (e.g. a persistent one
        whose local process went away). Opens new forwards: on ``ports`` if free (tcp),
        in the socket directory of ``ip`` if it is still ours (ipc), else fresh ones.
        ``client``: what drives it from now on (``sshpyk ps`` shows it)."""
        options = options or KernelOptions()
        finder = await session.agent(options.python, options.pre_command)
        entries = [k for k in await finder.ps(options.run_root) if k.get("kernel_id") == kernel_id]
        if not entries or not entries[0].get("alive"):
            raise RemoteError(f"no running sshpyk kernel {kernel_id} on {session.alias!r}")
        socket_path = entries[0].get("agent_socket")
        if not socket_path:
            raise RemoteError(f"the agent of kernel {kernel_id} on {session.alias!r} is gone")
        agent = await session.attach_agent(
            socket_path,
            options.python,
            options.pre_command,
            grace=options.grace,
            link_grace=options.link_grace,
        )
        process = await agent.adopt(kernel_id)
        process.tell_client(client)
        remote_info = await agent.connection_info(kernel_id)
        kernel = cls(session, options, kernel_id=kernel_id, client=client)
        kernel.process = process
        kernel.key = key or str(remote_info.get("key", ""))
        kernel.signature_scheme = str(remote_info.get("signature_scheme", "hmac-sha256"))
        try:
            await kernel.forwards.open(ports, ip=ip)
        except SSHPykError:
            await kernel.forwards.open()  # the old ports are taken: new ones
        kernel.forwards.set_target(process)
        await kernel.web.open_explicit()
        kernel.web.follow(process)
        return kernel

    def ready_line(self) -> tuple[str, tuple[Any, ...]]:
        """The "ready" log line of the last launch (format, args), from its launcher."""
        assert self.process is not None
        return launcher_for(self.process.launcher).ready_line(self.process, self.timings)

    #: the keys of :meth:`info` for any kernel
    INFO_KEYS = (
        "remote_kernel_id",
        "remote_pid",
        "remote_run_dir",
        "remote_transport",
        "ports",
        "transport",
        "ip",
    )

    def info(self) -> dict[str, Any]:
        """Where the kernel runs and how it is forwarded (the provisioner's info): the
        :attr:`INFO_KEYS`, and what its launcher adds (a batch job's id and node)."""
        process = self.process
        info: dict[str, Any] = {
            "remote_kernel_id": self.kernel_id,
            "remote_pid": process.pid if process else None,
            "remote_run_dir": process.run_dir if process else None,
            "remote_transport": process.transport if process else None,
            "ports": self.ports,
            "transport": self.forwards.transport,
            "ip": self.forwards.ip,
        }
        if process is not None:
            info.update(launcher_for(process.launcher).info(process))
        return info

    def record(self) -> dict[str, Any]:
        """What a later process needs to reattach to this kernel and its forwards (the
        persistent-kernel record of :mod:`sshpyk.state`, without the caller's keys)."""
        return {
            "remote_kernel_id": self.kernel_id,
            "remote_pid": self.process.pid if self.process else None,
            "ports": self.ports,
            "transport": self.forwards.transport,
            "ip": self.forwards.ip,
            "key": self.key,
            "signature_scheme": self.signature_scheme,
        }

    @property
    def idle_shutdown(self) -> float | None:
        """Seconds idle after which the agent shut the kernel down (idle timeout), or None."""
        return self.process.idle_shutdown if self.process is not None else None

    def poll(self) -> int | None:
        """None while the kernel runs, else its exit code; no network round trip."""
        if self.process is None:
            return 0
        return self.process.poll()

    async def wait(self) -> int | None:
        if self.process is None:
            return 0
        return await self.process.wait()

    async def send_signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    async def _discard_process(self, restart: bool = False) -> None:
        process, self.process = self.process, None
        self.forwards.clear_target()
        self.web.follow(None)
        if process is None:
            return
        timeout = launcher_for(process.launcher).stop_timeout
        if restart and not process.stopped.is_set() and process.agent.connected.is_set():
            # the agent keeps what the next launch of this kernel id reuses (a batch job's
            # allocation, so a restart does not queue again)
            process.agent.send({"op": Op.STOP, "kid": process.kid, "keep_allocation": True})
            try:
                if not await wait_event(process.stopped, timeout):
                    log.warning(
                        "[%s] kernel %s: no stop confirmation in %gs",
                        *(self.session.alias, process.kid, timeout),
                    )
            finally:
                process.agent.forget(process.kid)
            return
        await process.stop(timeout=timeout)

    async def shutdown(self, restart: bool = False) -> None:
        """Stop the remote kernel (process group killed, run dir removed); keep the ports.
        ``restart``: a launch of the same kernel follows (a batch job's allocation is kept)."""
        await asyncio.shield(self._discard_process(restart))

    async def detach(self) -> None:
        """Release the local ports and leave the kernel running on the host."""
        self.process = None
        self.forwards.clear_target()
        await self.web.aclose()
        await self.forwards.aclose()

    async def close(self) -> None:
        """Stop the kernel and release the local ports."""
        try:
            await self.shutdown()
        finally:
            await self.web.aclose()
            await self.forwards.aclose()

    async def __aenter__(self) -> RemoteKernel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def client(self, **kwargs: Any) -> AsyncKernelClient:
        """An AsyncKernelClient connected through the forwards (call start_channels()).

        Its ``is_alive()`` (and so ``wait_for_ready()``) asks this kernel's process, as
        the agent reported it, not the heartbeat: a heartbeat that misses its 1 s on a
        loaded host or a slow link is not a dead kernel."""
        client = _client_class()(**kwargs)
        client.load_connection_info(cast(Any, self.connection_info()))
        client.sshpyk_kernel = self
        return cast("AsyncKernelClient", client)


_CLIENT_CLASS: type[Any] | None = None


def _client_class() -> type[Any]:
    """The client class of :meth:`RemoteKernel.client` (jupyter_client imported late)."""
    global _CLIENT_CLASS
    if _CLIENT_CLASS is None:
        from jupyter_client.asynchronous import AsyncKernelClient

        class RemoteKernelClient(AsyncKernelClient):
            """Alive while the remote kernel's process runs (no heartbeat guess)."""

            sshpyk_kernel: RemoteKernel | None = None

            async def _async_is_alive(self) -> bool:
                kernel = self.sshpyk_kernel
                if kernel is None:
                    return bool(await super()._async_is_alive())
                return kernel.process is not None and kernel.poll() is None

            is_alive = _async_is_alive

        _CLIENT_CLASS = RemoteKernelClient
    return _CLIENT_CLASS

"""SSHKernelProvisioner: a thin adapter from jupyter_client's provisioner ABC.

All SSH work happens in :class:`~sshpyk.kernels.kernel.RemoteKernel` on the SSH loop
thread (:class:`~sshpyk.loop.SSHLoop`): forwards flow while the caller's loop waits.
Configuration comes from ``kernel.json`` ``metadata.kernel_provisioner.config``.

Persistent kernels (``persistent: true``) are recorded (:mod:`sshpyk.state`); a later
provisioner for the same kernelspec and notebook (``JPY_SESSION_NAME``) reattaches, as
``load_provisioner_info`` does. Records are read and written in a worker thread.
"""

from __future__ import annotations

import asyncio
import signal
import time
import types
from typing import Any, cast

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from traitlets import Bool, Dict, Enum, Float, Integer, List, TraitType, Unicode

from . import state
from .config import ConfigField, KernelConfig, Store, config_fields
from .errors import SSHPykError
from .kernels.kernel import KernelOptions, RemoteKernel
from .kernels.session import SSHSession
from .loop import SSHLoop

PROVISIONER_FIELDS = config_fields(Store.PROVISIONER)

__all__ = ["SSHKernelProvisioner"]


def _trait(f: ConfigField) -> TraitType[Any, Any]:
    """The traitlet of one provisioner option of KernelConfig."""
    default = f.default
    if f.option.choices:
        return Enum(list(f.option.choices), default_value=default, config=True, help=f.help)
    if f.type in (dict, list):
        return (Dict if f.type is dict else List)(default, config=True, help=f.help)
    trait = {bool: Bool, float: Float, int: Integer, str: Unicode}[f.type]
    return trait(default, allow_none=f.optional, config=True, help=f.help)


#: one trait per provisioner option (kernel.json's metadata.kernel_provisioner.config)
_ConfigTraits = types.new_class(
    "_ConfigTraits",
    (KernelProvisionerBase,),
    exec_body=lambda ns: ns.update({f.name: _trait(f) for f in PROVISIONER_FIELDS}),
)


class SSHKernelProvisioner(_ConfigTraits):  # type: ignore[misc,valid-type]
    """Runs the kernel on a remote host over one shared SSH connection; its traits are
    the provisioner options of :class:`~sshpyk.config.KernelConfig`."""

    ssh_host_alias: str  # the two traits load_provisioner_info sets
    ssh_config: str | None
    _kernel: RemoteKernel | None = None
    _session: SSHSession | None = None
    _launched = _adopted = False
    _session_name = ""
    _restart_limit: int | None = None  # the restarter's, while an idle timeout set it 0

    # -- helpers --------------------------------------------------------------------
    _loop = property(lambda self: SSHLoop.instance())

    @property
    def remote_kernel(self) -> RemoteKernel | None:
        """The kernel this provisioner drives (its process, session, local ports)."""
        return self._kernel

    def _options(self) -> KernelOptions:
        config = KernelConfig(**{f.name: getattr(self, f.name) for f in PROVISIONER_FIELDS})
        return KernelOptions.from_config(config)

    async def _connect(self) -> SSHSession:
        if self._session is None:
            alias, timeout = self.ssh_host_alias, self.start_timeout
            connect = SSHSession.connect(
                alias, ssh_config=self.ssh_config, connect_timeout=timeout,
                persist=self.connection_persist,
            )  # fmt: skip
            self._session = await asyncio.wait_for(connect, timeout)
        return self._session

    async def _open(self) -> RemoteKernel:
        session = await self._connect()
        kernel = RemoteKernel(
            session, self._options(), kernel_id=self.kernel_id, client="provisioner"
        )
        kernel.logger = self.log  # a batch job's queue and walltime events go to Jupyter's log
        try:
            await kernel.open_forwards()
        except BaseException:
            await asyncio.shield(self._close())
            raise
        return kernel

    async def _reattach(self, record: dict[str, Any]) -> RemoteKernel:
        session = await self._connect()
        return await asyncio.wait_for(
            RemoteKernel.attach(
                session,
                str(record["remote_kernel_id"]),
                self._options(),
                key=record.get("key"),
                ports=record.get("ports"),
                ip=record.get("ip"),
                client="provisioner",
            ),
            self.start_timeout,
        )

    async def _close(self) -> None:
        kernel, self._kernel = self._kernel, None
        session, self._session = self._session, None
        try:
            if kernel is not None:
                await kernel.close()
        finally:
            if session is not None:
                await session.aclose()

    async def _adopt_persistent(self, session_name: str) -> RemoteKernel | None:
        """A detached persistent kernel of this kernelspec and notebook, reattached."""
        km, alias = self.parent, self.ssh_host_alias
        for record in await asyncio.to_thread(state.records):
            if (
                record.get("kernel_name") != getattr(km, "kernel_name", None)
                or record.get("session_name", "") != session_name
                or record.get("ssh_host_alias") != self.ssh_host_alias
            ):
                continue
            try:
                kernel = await self._loop.run(self._reattach(record))
            except (SSHPykError, asyncio.TimeoutError, OSError) as exc:
                remote_id, kernel = record.get("remote_kernel_id"), None
                self.log.info("[%s] persistent kernel %s not reattached: %s", alias, remote_id, exc)
            await asyncio.to_thread(state.forget, str(record["kernel_id"]))
            if kernel is None:
                continue
            pid = kernel.process.pid if kernel.process else None
            line = "[%s] reattached to persistent kernel %s (remote pid %s)"
            self.log.info(line, alias, kernel.kernel_id, pid)
            return kernel
        return None

    async def _remember(self) -> None:
        kernel = self._kernel
        if kernel is None or kernel.process is None or not self.persistent:
            return
        record = {
            "kernel_id": self.kernel_id,
            "kernel_name": getattr(self.parent, "kernel_name", None),
            "session_name": self._session_name,
            "ssh_host_alias": self.ssh_host_alias,
            "ssh_config": self.ssh_config,
            "created": time.time(),
            **kernel.record(),
        }
        await asyncio.to_thread(state.remember, record)

    # -- the provisioner contract ------------------------------------------------------
    @property
    def has_process(self) -> bool:
        return self._launched and self._kernel is not None

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Connect (or reuse the connection), bind the local forwards, write the
        local connection file with their ports. A detached persistent kernel of the
        same notebook is reattached instead of starting a new one."""
        if not self.ssh_host_alias:
            raise ValueError(
                "the kernelspec has no ssh_host_alias in metadata.kernel_provisioner.config"
            )
        started, km = time.monotonic(), self.parent
        restarter = getattr(km, "_restarter", None)
        if restarter is not None and self._restart_limit is not None:  # after idle 'dead'
            restarter.restart_limit, self._restart_limit = self._restart_limit, None
        kwargs.pop("extra_arguments", None)
        self._session_name = str((kwargs.get("env") or {}).get("JPY_SESSION_NAME", ""))
        if self._kernel is None and self.persistent:
            self._kernel = await self._adopt_persistent(self._session_name)
            self._adopted = self._kernel is not None
            if self._adopted and km is not None:
                km.session.key = self._kernel.key.encode()  # type: ignore[union-attr]
        if self._kernel is None:
            self._kernel = await self._loop.run(self._open())
        if km is not None:
            km.transport = self._kernel.forwards.transport
            km.ip = self._kernel.forwards.ip
            for channel, port in self._kernel.ports.items():
                setattr(km, f"{channel}_port", port)
            km.write_connection_file(jupyter_session=self._session_name)
            self.connection_info = km.get_connection_info()
        line = "[%s] kernel %s: SSH connection and local forwards ready in %.3fs"
        self.log.info(line, self.ssh_host_alias, self.kernel_id, time.monotonic() - started)
        return await super().pre_launch(cmd=list(self.kernel_spec.argv), **kwargs)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Start the remote kernel; returns once its sockets are bound."""
        assert self._kernel is not None, "pre_launch() must run first"
        km = self.parent
        if self._adopted:
            self._adopted = False  # a later restart launches a fresh kernel
        else:
            key = km.session.key.decode() if km is not None else ""
            scheme = km.session.signature_scheme if km is not None else "hmac-sha256"
            env = {"JPY_SESSION_NAME": self._session_name} if self._session_name else {}
            try:
                await self._loop.run(self._kernel.launch(key, scheme, env, spare_ok=True))
            except BaseException:
                # Jupyter may not call cleanup() after a failed start: release all here
                await asyncio.shield(self._loop.run(self._close()))
                raise
            line, args = self._kernel.ready_line()
            self.log.info("[%s] kernel %s: " + line, self.ssh_host_alias, self.kernel_id, *args)
        self._launched = True
        await self._remember()
        self.connection_info = self._own_info()  # a warm spare's key differs from km's
        return self.connection_info

    def _own_info(self) -> KernelConnectionInfo:
        """The kernel's connection info, its key as jupyter_client keeps it (bytes)."""
        assert self._kernel is not None
        info = self._kernel.connection_info()
        info["key"] = str(info["key"]).encode()
        return cast(KernelConnectionInfo, info)

    async def poll(self) -> int | None:
        kernel, restarter = self._kernel, getattr(self.parent, "_restarter", None)
        code = kernel.poll() if kernel is not None else 0
        idle = kernel.idle_shutdown if kernel is not None and code is not None else None
        if idle is not None:  # the agent shut it down (idle timeout): dead, not restarted;
            # restart_limit 0 makes the KernelRestarter fire 'dead' now (no public hook)
            if restarter is not None and restarter.restart_limit:
                self._restart_limit, restarter.restart_limit = restarter.restart_limit, 0
            line = "kernel %s shut down after %.0f s idle (idle timeout): not restarted"
            self.log.warning(line, self.kernel_id, idle)
            await self.cleanup()  # a dropped kernel's manager never calls it
        return code

    async def wait(self) -> int | None:
        return 0 if self._kernel is None else await self._loop.run(self._kernel.wait())

    async def send_signal(self, signum: int) -> None:
        if self._kernel is not None:
            await self._loop.run(self._kernel.send_signal(signum))

    async def kill(self, restart: bool = False) -> None:
        await self.send_signal(signal.SIGKILL)

    async def terminate(self, restart: bool = False) -> None:
        await self.send_signal(signal.SIGTERM)

    async def cleanup(self, restart: bool = False) -> None:
        """On restart keep the connection and local ports, else release both; the
        kernel was shut down on purpose either way: its persistence record goes."""
        if self._kernel is None:
            return
        self._launched = False
        await asyncio.to_thread(state.forget, self.kernel_id)
        if restart:
            await self._loop.run(self._kernel.shutdown(restart=True))
        else:
            await self._loop.run(self._close())

    def get_stable_start_time(self, recommended: float = 10.0) -> float:
        return max(recommended, self._options().total_start_timeout)

    async def get_provisioner_info(self) -> dict[str, Any]:
        info: dict[str, Any] = await super().get_provisioner_info()
        info.update(ssh_host_alias=self.ssh_host_alias, ssh_config=self.ssh_config)
        kernel = self._kernel
        info.update(kernel.info() if kernel else dict.fromkeys(RemoteKernel.INFO_KEYS))
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        """Take over a kernel described by :meth:`get_provisioner_info` (from another
        process): reattach to it on the remote and forward its sockets again."""
        await super().load_provisioner_info(provisioner_info)
        self.ssh_host_alias = provisioner_info.get("ssh_host_alias") or self.ssh_host_alias
        self.ssh_config = provisioner_info.get("ssh_config", self.ssh_config)
        remote_kernel_id = provisioner_info.get("remote_kernel_id")
        if not remote_kernel_id or self._kernel is not None:
            return
        record = {
            "remote_kernel_id": remote_kernel_id,
            "key": (self.connection_info or {}).get("key"),
            "ports": provisioner_info.get("ports"),
            "ip": provisioner_info.get("ip"),
        }
        if isinstance(record["key"], bytes):
            record["key"] = record["key"].decode()
        self._kernel = await self._loop.run(self._reattach(record))
        self._launched = True
        self.connection_info = self._own_info()

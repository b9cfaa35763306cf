"""SSHKernelProvisioner: a thin adapter from jupyter_client's provisioner ABC.

All SSH work happens in :class:`~sshpyk.kernel.RemoteKernel` on the process-wide
SSH loop thread (:class:`~sshpyk.loop.SSHLoop`), so forwards keep flowing even
when the caller's loop stops between calls (the blocking ``KernelManager``).
Configuration comes from ``kernel.json`` ``metadata.kernel_provisioner.config``.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any, cast

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from traitlets import Dict, Enum, Float, Unicode

from .kernel import KernelOptions, RemoteKernel
from .loop import SSHLoop
from .session import SSHSession

__all__ = ["SSHKernelProvisioner"]


class SSHKernelProvisioner(KernelProvisionerBase):  # type: ignore[misc]
    """Runs the kernel on a remote host over one shared SSH connection."""

    ssh_host_alias = Unicode(config=True, help="Host alias from the ssh config")
    ssh_config = Unicode(
        None, allow_none=True, config=True, help="ssh config file (default ~/.ssh/config)"
    )
    remote_python = Unicode(
        "python3", config=True, help="Remote python executable or environment prefix"
    )
    remote_kernel_name = Unicode("python3", config=True, help="Kernelspec name on the remote")
    start_timeout = Float(60.0, config=True, help="Seconds allowed for connect + kernel start")
    transport = Enum(["auto", "ipc", "tcp"], default_value="auto", config=True)
    remote_env = Dict(config=True, help="Extra environment variables for the remote kernel")
    pre_command = Unicode(None, allow_none=True, config=True, help="Shell code run first")
    remote_cwd = Unicode(None, allow_none=True, config=True, help="Remote working directory")
    remote_run_root = Unicode(
        None, allow_none=True, config=True, help="Where run dirs go (default XDG_RUNTIME_DIR/tmp)"
    )
    grace_period = Float(
        60.0, config=True, help="Seconds the remote keeps the kernel without hearing from us"
    )

    _kernel: RemoteKernel | None = None
    _session: SSHSession | None = None
    _launched = False

    # -- helpers --------------------------------------------------------------------
    @property
    def _loop(self) -> SSHLoop:
        return SSHLoop.instance()

    def _options(self) -> KernelOptions:
        return KernelOptions(
            kernel_name=self.remote_kernel_name,
            python=self.remote_python,
            transport=self.transport,
            env={str(k): str(v) for k, v in self.remote_env.items()},
            cwd=self.remote_cwd,
            pre_command=self.pre_command,
            run_root=self.remote_run_root,
            grace=self.grace_period,
            start_timeout=self.start_timeout,
        )

    async def _open(self) -> RemoteKernel:
        self._session = await asyncio.wait_for(
            SSHSession.connect(
                self.ssh_host_alias, ssh_config=self.ssh_config, connect_timeout=self.start_timeout
            ),
            self.start_timeout,
        )
        kernel = RemoteKernel(self._session, self._options(), kernel_id=self.kernel_id)
        try:
            await kernel.open_forwards()
        except BaseException:
            session, self._session = self._session, None
            await asyncio.shield(session.aclose())
            raise
        return kernel

    async def _close(self) -> None:
        kernel, self._kernel = self._kernel, None
        session, self._session = self._session, None
        try:
            if kernel is not None:
                await kernel.close()
        finally:
            if session is not None:
                await session.aclose()

    # -- the provisioner contract ------------------------------------------------------
    @property
    def has_process(self) -> bool:
        return self._launched and self._kernel is not None

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Connect (or reuse the connection), bind the local forwards, write the
        local connection file with their ports."""
        if not self.ssh_host_alias:
            raise ValueError(
                "the kernelspec has no ssh_host_alias in metadata.kernel_provisioner.config"
            )
        started = time.monotonic()
        if self._kernel is None:
            self._kernel = await self._loop.run(self._open())
        km = self.parent
        kwargs.pop("extra_arguments", None)
        if km is not None:
            km.transport = "tcp"
            km.ip = "127.0.0.1"
            for channel, port in self._kernel.ports.items():
                setattr(km, f"{channel}_port", port)
            jupyter_session = kwargs.get("env", {}).get("JPY_SESSION_NAME", "")
            km.write_connection_file(jupyter_session=jupyter_session)
            self.connection_info = km.get_connection_info()
        self.log.info(
            "[%s] kernel %s: SSH connection and local forwards ready in %.3fs",
            self.ssh_host_alias,
            self.kernel_id,
            time.monotonic() - started,
        )
        return await super().pre_launch(cmd=list(self.kernel_spec.argv), **kwargs)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Start the remote kernel; returns once its sockets are bound."""
        assert self._kernel is not None, "pre_launch() must run first"
        km = self.parent
        key = km.session.key.decode() if km is not None else ""
        scheme = km.session.signature_scheme if km is not None else "hmac-sha256"
        env = {}
        jupyter_session = (kwargs.get("env") or {}).get("JPY_SESSION_NAME")
        if jupyter_session:
            env["JPY_SESSION_NAME"] = jupyter_session
        try:
            await self._loop.run(self._kernel.launch(key, scheme, env))
        except BaseException:
            # Jupyter does not always call cleanup() after a failed start: release
            # the connection and the local ports here.
            await asyncio.shield(self._loop.run(self._close()))
            raise
        self._launched = True
        process, timings = self._kernel.process, self._kernel.timings
        if process is not None:
            self.log.info(
                "[%s] kernel %s: remote pid %s (%s transport) ready in %.3fs: "
                "agent %.3fs, spawn %.3fs, sockets bound %.3fs",
                self.ssh_host_alias,
                self.kernel_id,
                process.pid,
                process.transport,
                timings.get("total", 0.0),
                timings.get("agent", 0.0),
                timings.get("spawn", 0.0),
                timings.get("ready", 0.0),
            )
        if km is None:
            self.connection_info = cast(KernelConnectionInfo, self._kernel.connection_info())
        return self.connection_info

    async def poll(self) -> int | None:
        if self._kernel is None:
            return 0
        return self._kernel.poll()

    async def wait(self) -> int | None:
        if self._kernel is None:
            return 0
        return await self._loop.run(self._kernel.wait())

    async def send_signal(self, signum: int) -> None:
        if self._kernel is not None:
            await self._loop.run(self._kernel.send_signal(signum))

    async def kill(self, restart: bool = False) -> None:
        await self.send_signal(signal.SIGKILL)

    async def terminate(self, restart: bool = False) -> None:
        await self.send_signal(signal.SIGTERM)

    async def cleanup(self, restart: bool = False) -> None:
        """On restart keep the connection and the local ports; else release both."""
        if self._kernel is None:
            return
        self._launched = False
        if restart:
            await self._loop.run(self._kernel.shutdown())
        else:
            await self._loop.run(self._close())

    def get_shutdown_wait_time(self, recommended: float = 5.0) -> float:
        return recommended

    def get_stable_start_time(self, recommended: float = 10.0) -> float:
        return max(recommended, self.start_timeout)

    async def get_provisioner_info(self) -> dict[str, Any]:
        info: dict[str, Any] = await super().get_provisioner_info()
        process = self._kernel.process if self._kernel is not None else None
        info.update(
            {
                "ssh_host_alias": self.ssh_host_alias,
                "ssh_config": self.ssh_config,
                "remote_pid": process.pid if process else None,
                "remote_run_dir": process.run_dir if process else None,
                "remote_transport": process.transport if process else None,
            }
        )
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        await super().load_provisioner_info(provisioner_info)
        self.ssh_host_alias = provisioner_info.get("ssh_host_alias") or self.ssh_host_alias
        self.ssh_config = provisioner_info.get("ssh_config", self.ssh_config)

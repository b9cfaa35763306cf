"""RemoteKernel: a remote kernel plus its local forwards, across restarts.

The local ports are bound once (:class:`~sshpyk.forwards.ForwardSet`) and kept
for the life of the object; each (re)start launches a new remote process
(:class:`~sshpyk.remote.KernelProcess`) and points the forwards at it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from .errors import KernelStartTimeoutError, RemoteError, SSHPykError
from .forwards import CHANNELS, ForwardSet
from .remote import KernelProcess, LaunchRequest
from .slurm import check_relay, slurm_logger, slurm_summary

if TYPE_CHECKING:
    from jupyter_client.asynchronous import AsyncKernelClient

    from .session import SSHSession

__all__ = ["KernelOptions", "RemoteKernel"]

log = logging.getLogger("sshpyk")


@dataclass
class KernelOptions:
    """How to start a kernel on the remote host (the kernelspec's sshpyk config)."""

    kernel_name: str = "python3"
    python: str = "python3"
    transport: str = "auto"
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    pre_command: str | None = None
    run_root: str | None = None
    #: seconds the remote agent keeps the kernel without hearing from us
    grace: float = 60.0
    start_timeout: float = 60.0
    #: keep the kernel when the local side goes away without shutting it down
    persistent: bool = False
    #: "direct": next to the agent; "slurm": a SLURM job submitted from the host
    #: (a login node) with srun, the kernel on a compute node
    launcher: str = "direct"
    #: srun arguments, e.g. ["--partition=gpu", "--gres=gpu:1", "--time=04:00:00"]
    slurm_args: list[str] = field(default_factory=list)
    #: seconds the job may wait in the queue (on top of start_timeout)
    slurm_queue_timeout: float = 600.0
    #: log a warning this many seconds before the job's time limit (0: never)
    slurm_walltime_warning: float = 300.0
    #: while the job is pending, log its state at least this often (seconds)
    slurm_status_interval: float = 30.0
    #: how the local ends listen: "ipc" (unix sockets in a private 0700 directory, no
    #: other local user can connect) or "tcp" (127.0.0.1, for tools that need TCP)
    local_transport: str = "ipc"

    @property
    def total_start_timeout(self) -> float:
        """The whole start: the queue (SLURM) plus the kernel's own start."""
        queue = self.slurm_queue_timeout if self.launcher == "slurm" else 0.0
        return self.start_timeout + queue


class RemoteKernel:
    """A kernel on the far side of an :class:`~sshpyk.SSHSession`."""

    def __init__(self, session: SSHSession, options: KernelOptions, kernel_id: str | None = None):
        self.session = session
        self.options = options
        self.kernel_id = kernel_id or str(uuid.uuid4())
        # a forwarded connection may wait for a start, or for a reconnect after link loss
        self.forwards = ForwardSet(
            session,
            connect_timeout=max(options.total_start_timeout, options.grace) + 5,
            transport=options.local_transport,
        )
        self.process: KernelProcess | None = None
        #: where SLURM queue and walltime events are logged (the provisioner's self.log)
        self.logger: Any = log
        self.key = ""
        self.signature_scheme = "hmac-sha256"
        #: durations of the last launch's stages, for logs and benchmarks
        self.timings: dict[str, float] = {}

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
        await self.launch(key or str(uuid.uuid4()), signature_scheme)

    async def launch(
        self, key: str, signature_scheme: str = "hmac-sha256", env: dict[str, str] | None = None
    ) -> None:
        """Launch a new remote kernel behind the existing forwards."""
        if self.process is not None and self.process.poll() is None:
            raise SSHPykError(f"kernel {self.kernel_id} is already running")
        await self._discard_process()
        await self.forwards.rebind()  # jupyter_client removed the ipc files on restart
        self.key, self.signature_scheme = key, signature_scheme
        timeout = self.options.total_start_timeout
        try:
            await asyncio.wait_for(self._launch(env), timeout)
        except asyncio.TimeoutError as exc:
            process = self.process
            await asyncio.shield(self._discard_process())
            where = ""
            if process is not None and process.launcher == "slurm":
                where = f" (SLURM {slurm_summary(process.slurm)})"
            raise KernelStartTimeoutError(
                f"kernel {self.options.kernel_name!r} on {self.session.alias!r} did not start "
                f"within {timeout:g}s{where} (raise --start-timeout?)"
            ) from exc
        except BaseException:
            await asyncio.shield(self._discard_process())
            raise

    async def _launch(self, env: dict[str, str] | None) -> None:
        alias, timings = self.session.alias, self.timings
        timings.clear()
        t0 = time.monotonic()
        await self.session.connection()
        timings["connect"] = time.monotonic() - t0
        opts = self.options
        request = LaunchRequest(
            kernel_name=opts.kernel_name,
            key=self.key,
            signature_scheme=self.signature_scheme,
            transport=opts.transport,
            env={**opts.env, **(env or {})},
            cwd=opts.cwd,
            persistent=opts.persistent,
            launcher=opts.launcher,
            slurm_args=list(opts.slurm_args),
            slurm_queue_timeout=opts.slurm_queue_timeout,
            slurm_walltime_warning=opts.slurm_walltime_warning,
            slurm_status_interval=opts.slurm_status_interval,
        )
        t1 = time.monotonic()
        agent = await self.session.agent(
            opts.python, opts.pre_command, grace=opts.grace, run_root=opts.run_root
        )
        timings["agent"] = time.monotonic() - t1
        t1 = time.monotonic()
        on_slurm = None
        if opts.launcher == "slurm":
            on_slurm = slurm_logger(self.logger, alias, self.kernel_id)
        self.process = await agent.launch(self.kernel_id, request, on_slurm=on_slurm)
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
        if self.process.launcher == "slurm":
            await self._wait_slurm_ready(self.process)
        else:
            t2 = time.monotonic()
            await self.process.wait_ready()
            await self.session.check_forwarding(
                self.process.transport, self.process.endpoints["hb"]
            )
            timings["ready"] = time.monotonic() - t2
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
            timings["ready"],
        )

    async def _wait_slurm_ready(self, process: KernelProcess) -> None:
        """The job's queue (bounded by the agent's queue timeout), then the kernel's own
        start on its node, bounded by start_timeout."""
        t1 = time.monotonic()
        await process.running.wait()
        self.timings["queue"] = time.monotonic() - t1
        t2 = time.monotonic()
        try:
            await asyncio.wait_for(process.wait_ready(), self.options.start_timeout)
        except asyncio.TimeoutError:
            raise KernelStartTimeoutError(
                f"kernel {self.options.kernel_name!r} on {self.session.alias!r}: SLURM "
                f"{slurm_summary(process.slurm)}, but the kernel did not bind its sockets "
                f"within {self.options.start_timeout:g}s (raise --start-timeout?)"
            ) from None
        await check_relay(self.session, process.endpoints["hb"])  # login node unix socket
        self.timings["ready"] = time.monotonic() - t2

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
    ) -> RemoteKernel:
        """Reattach to a kernel that runs on the host already (e.g. a persistent one
        whose local process went away). Opens new forwards: on ``ports`` if free (tcp),
        in the socket directory of ``ip`` if it is still ours (ipc), else fresh ones."""
        options = options or KernelOptions()
        finder = await session.agent(options.python, options.pre_command)
        entries = [k for k in await finder.ps(options.run_root) if k.get("kernel_id") == kernel_id]
        if not entries or not entries[0].get("alive"):
            raise RemoteError(f"no running sshpyk kernel {kernel_id} on {session.alias!r}")
        socket_path = entries[0].get("agent_socket")
        if not socket_path:
            raise RemoteError(f"the agent of kernel {kernel_id} on {session.alias!r} is gone")
        agent = await session.attach_agent(
            socket_path, options.python, options.pre_command, grace=options.grace
        )
        process = await agent.adopt(kernel_id)
        remote_info = await agent.connection_info(kernel_id)
        kernel = cls(session, options, kernel_id=kernel_id)
        kernel.process = process
        kernel.key = key or str(remote_info.get("key", ""))
        kernel.signature_scheme = str(remote_info.get("signature_scheme", "hmac-sha256"))
        try:
            await kernel.forwards.open(ports, ip=ip)
        except SSHPykError:
            await kernel.forwards.open()  # the old ports are taken: new ones
        kernel.forwards.set_target(process)
        return kernel

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

    async def _discard_process(self) -> None:
        process, self.process = self.process, None
        self.forwards.clear_target()
        if process is not None:
            # a SLURM kernel's stop may wait for srun, then for the job to leave the queue
            await process.stop(timeout=30.0 if process.launcher == "slurm" else 10.0)

    async def shutdown(self) -> None:
        """Stop the remote kernel (process group killed, run dir removed); keep the ports."""
        await asyncio.shield(self._discard_process())

    async def detach(self) -> None:
        """Release the local ports and leave the kernel running on the host."""
        self.process = None
        self.forwards.clear_target()
        await self.forwards.aclose()

    async def close(self) -> None:
        """Stop the kernel and release the local ports."""
        try:
            await self.shutdown()
        finally:
            await self.forwards.aclose()

    async def __aenter__(self) -> RemoteKernel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def client(self, **kwargs: Any) -> AsyncKernelClient:
        """An AsyncKernelClient connected through the forwards (call start_channels())."""
        from jupyter_client.asynchronous import AsyncKernelClient

        client = AsyncKernelClient(**kwargs)
        client.load_connection_info(cast(Any, self.connection_info()))
        return client

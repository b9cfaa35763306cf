"""`sshpyk attach`: forward a running remote kernel to local ports, by hand.

For a kernel whose local owner went away (a persistent kernel, or one still in
its grace period): finds it through the agents on the host, reattaches to its
agent, opens five local forwards and writes a local connection file usable by
``jupyter console --existing``. The forwards listen on 127.0.0.1 TCP by default,
since tools started by hand on such a file (IDEs, ``jupyter console``, qtconsole)
may only speak TCP; ``local_transport="ipc"`` gives private unix sockets instead.
Leaving (Ctrl-C) only hangs up: the kernel keeps running for whoever attaches next,
until it is shut down or killed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jupyter_core.paths import jupyter_runtime_dir

from .config import DEFAULTS
from .errors import RemoteError, RequestTimeoutError
from .kernels.kernel import KernelOptions, RemoteKernel
from .kernels.session import SSHSession
from .localfs import check_kernel_id, write_private_json

__all__ = ["attach_kernel", "write_connection_file"]


def write_connection_file(path: Path, info: dict[str, Any]) -> Path:
    """Write a jupyter connection file: a new 0600 file (it holds the key), renamed
    over ``path`` so that neither an existing file's mode nor a symlink there is
    kept; a missing parent directory is created 0700."""
    return write_private_json(path, info, replace=True)


async def attach_kernel(
    alias: str,
    kernel_id: str,
    *,
    ssh_config: str | None = None,
    python: str = "python3",
    pre_command: str | None = None,
    run_root: str | None = None,
    connection_file: str | os.PathLike[str] | None = None,
    local_transport: str = "tcp",
    timeout: float = 30.0,
    on_ready: Callable[[RemoteKernel, Path], None] | None = None,
) -> int | None:
    """Attach and forward until cancelled or the kernel ends; returns its exit code
    (None when cancelled while it still runs). ``kernel_id`` may be a unique prefix."""
    check_kernel_id(kernel_id)
    async with await asyncio.wait_for(
        SSHSession.connect(
            alias,
            ssh_config=ssh_config,
            connect_timeout=timeout,
            persist=DEFAULTS.connection_persist,
        ),
        timeout,
    ) as session:
        try:
            kernel = await asyncio.wait_for(
                _attach(session, kernel_id, python, pre_command, run_root, local_transport),
                timeout,
            )
        except asyncio.TimeoutError:
            raise RequestTimeoutError(
                f"could not attach to kernel {kernel_id!r} on {alias!r} within {timeout:g}s"
            ) from None
        try:
            path = Path(
                connection_file
                or Path(jupyter_runtime_dir()) / f"kernel-sshpyk-{kernel.kernel_id}.json"
            )
            write_connection_file(path, kernel.connection_info())
            if on_ready is not None:
                on_ready(kernel, path)
            assert kernel.process is not None
            try:
                return await kernel.process.wait()
            finally:
                path.unlink(missing_ok=True)
        finally:
            await asyncio.shield(kernel.detach())


async def _attach(
    session: SSHSession,
    kernel_id: str,
    python: str,
    pre_command: str | None,
    run_root: str | None,
    local_transport: str,
) -> RemoteKernel:
    finder = await session.agent(python, pre_command)
    found = [
        k
        for k in await finder.ps(run_root)
        if str(k.get("kernel_id", "")).startswith(kernel_id) and k.get("alive")
    ]
    alias = session.alias
    if not found:
        raise RemoteError(f"no running sshpyk kernel {kernel_id!r} on {alias!r} (see sshpyk ps)")
    if len(found) > 1:
        ids = ", ".join(str(k["kernel_id"]) for k in found)
        raise RemoteError(f"kernel id {kernel_id!r} is ambiguous on {alias!r}: {ids}")
    full_id = check_kernel_id(found[0]["kernel_id"])  # it becomes a local file name
    options = KernelOptions(
        python=python,
        pre_command=pre_command,
        run_root=run_root,
        local_transport=local_transport,
    )
    return await RemoteKernel.attach(session, full_id, options, client="attach")

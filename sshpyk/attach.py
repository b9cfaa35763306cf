"""`sshpyk attach`: forward a running remote kernel to local ports, by hand.

For a kernel whose local owner went away (a persistent kernel, or one still in
its grace period): finds it through the agents on the host, reattaches to its
agent, opens five local forwards and writes a local connection file usable by
``jupyter console --existing``. Leaving (Ctrl-C) only hangs up: the kernel keeps
running for whoever attaches next, until it is shut down or killed.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jupyter_core.paths import jupyter_runtime_dir

from .errors import RemoteError
from .kernel import KernelOptions, RemoteKernel
from .session import SSHSession

__all__ = ["attach_kernel", "write_connection_file"]


def write_connection_file(path: Path, info: dict[str, Any]) -> Path:
    """Write a jupyter connection file 0600 (it holds the key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    return path


async def attach_kernel(
    alias: str,
    kernel_id: str,
    *,
    ssh_config: str | None = None,
    python: str = "python3",
    pre_command: str | None = None,
    run_root: str | None = None,
    connection_file: str | os.PathLike[str] | None = None,
    on_ready: Callable[[RemoteKernel, Path], None] | None = None,
) -> int | None:
    """Attach and forward until cancelled or the kernel ends; returns its exit code
    (None when cancelled while it still runs). ``kernel_id`` may be a unique prefix."""
    async with await SSHSession.connect(alias, ssh_config=ssh_config) as session:
        finder = await session.agent(python, pre_command)
        found = [
            k
            for k in await finder.ps(run_root)
            if str(k.get("kernel_id", "")).startswith(kernel_id) and k.get("alive")
        ]
        if not found:
            raise RemoteError(
                f"no running sshpyk kernel {kernel_id!r} on {alias!r} (see sshpyk ps)"
            )
        if len(found) > 1:
            ids = ", ".join(str(k["kernel_id"]) for k in found)
            raise RemoteError(f"kernel id {kernel_id!r} is ambiguous on {alias!r}: {ids}")
        full_id = str(found[0]["kernel_id"])
        options = KernelOptions(python=python, pre_command=pre_command, run_root=run_root)
        kernel = await RemoteKernel.attach(session, full_id, options)
        try:
            path = Path(
                connection_file or Path(jupyter_runtime_dir()) / f"kernel-sshpyk-{full_id}.json"
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

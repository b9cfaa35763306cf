"""The SSH event loop thread used by the provisioner.

Jupyter runs provisioner methods on loops that do not keep running: the blocking
``KernelManager`` (``jupyter console``) drives each call with
``run_until_complete`` and stops the loop in between, which would freeze port
forwards and keepalives. So the provisioner keeps all SSH I/O on one daemon
thread with its own always-running loop, and bridges each call to it. The
embedding API (``SSHSession``) runs on whatever loop its caller uses.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from .ssh.pool import close_all

__all__ = ["SSHLoop"]

T = TypeVar("T")


class SSHLoop:
    """One process-wide loop on a daemon thread; started on first use."""

    _instance: SSHLoop | None = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sshpyk-ssh-loop", daemon=True)
        self._thread.start()
        self._started.wait()
        atexit.register(self._close_at_exit)

    def _close_at_exit(self, timeout: float = 5.0) -> None:
        """At interpreter exit, hang up cleanly instead of dying with the daemon thread.

        A client that exits without shutting its kernels down (``jupyter console``
        only sends a shutdown *message*) would otherwise leave them to the remote
        grace period. Non-persistent kernels are stopped now; persistent ones stay.
        """
        if not self._thread.is_alive() or self.loop.is_closed():
            return
        future = asyncio.run_coroutine_threadsafe(close_all(), self.loop)
        try:
            future.result(timeout)
        except Exception:  # best effort: exiting anyway, the agent's grace period remains
            future.cancel()

    @classmethod
    def instance(cls) -> SSHLoop:
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._started.set)
        self.loop.run_forever()

    def in_loop(self) -> bool:
        return threading.current_thread() is self._thread

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the SSH loop and await its result from any loop.

        Cancelling the caller cancels the coroutine on the SSH loop too.
        """
        if self.in_loop():
            return await coro
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return await asyncio.wrap_future(future)

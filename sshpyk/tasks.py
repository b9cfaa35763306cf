"""Owned background tasks: no fire-and-forget.

Every task sshpyk starts in the background (an agent's heartbeat and recovery, a
forward's connect) is started by a :class:`TaskOwner`. The owner keeps it in a set; a
done callback logs its failure (with the owner's name: host alias, kernel id) and drops
it; :meth:`TaskOwner.aclose` cancels what is left and waits for it, bounded.
:func:`wait_event` waits for an event with a deadline without leaking its waiter.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["TaskOwner", "wait_event"]

log = logging.getLogger("sshpyk")

T = TypeVar("T")

#: seconds :meth:`TaskOwner.aclose` waits for cancelled tasks to finish
DEFAULT_CLOSE_TIMEOUT = 5.0


class TaskOwner:
    """The owner of a set of background tasks (like asyncssh's connection ``_tasks``).

    ``name`` prefixes the log line of a failed task (``"[alias] agent"``).
    """

    def __init__(self, name: str, logger: logging.Logger | None = None) -> None:
        self.name = name
        self.logger = logger or log
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def create_task(
        self, coro: Coroutine[Any, Any, T], *, name: str | None = None
    ) -> asyncio.Task[T]:
        """Start ``coro`` as a task of this owner; its failure is logged, not dropped."""
        if self._closed:
            coro.close()
            raise RuntimeError(f"{self.name}: its tasks are closed, no new task")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.logger.error(
                "%s: task %s failed: %r", self.name, task.get_name(), exc, exc_info=exc
            )

    def __len__(self) -> int:
        return len(self._tasks)

    @property
    def tasks(self) -> frozenset[asyncio.Task[Any]]:
        return frozenset(self._tasks)

    async def aclose(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> None:
        """Refuse new tasks, cancel the running ones (but the caller's own) and wait
        for them, at most ``timeout`` seconds; shielded, so a cancelled caller still
        leaves nothing running that it did not report."""
        self._closed = True
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        waiting = asyncio.ensure_future(asyncio.wait(tasks, timeout=timeout))
        _, pending = await asyncio.shield(waiting)
        if pending:
            self.logger.warning(
                "%s: %d task(s) still running %gs after their cancellation",
                self.name,
                len(pending),
                timeout,
            )


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until ``event`` is set, at most ``timeout`` seconds; whether it was set.

    Unlike ``wait_for(shield(event.wait()), t)`` the waiter is cancelled on the timeout
    and when the caller is cancelled: nothing is left waiting on the event.
    """
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait((waiter,), timeout=timeout)
    finally:
        if not waiter.done():
            waiter.cancel()
            # the cancelled waiter leaves the event's queue when it runs: next iteration
            await asyncio.wait((waiter,))
    return event.is_set()

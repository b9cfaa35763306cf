"""Slow work off the agent's loop: a small bounded pool of worker threads, and the
parallel (bounded) stop of many kernels. Neither grows with the number of kernels."""

import collections
import threading
import time

#: seconds the cleanup of several kernels at once may take (they stop in parallel)
CLEANUP_TIMEOUT = 60.0
#: worker threads at most (slow requests beyond it wait for one)
MAX_WORKERS = 4
#: seconds an idle worker waits for work before it ends
WORKER_IDLE = 5.0
#: kernels stopped in parallel by cleanup_all (each in a thread of its own meanwhile)
CLEANUP_PARALLEL = 8


def cleanup_all(kernels, timeout=CLEANUP_TIMEOUT):
    """Stop ``kernels``, CLEANUP_PARALLEL at a time (each whatever the others do);
    bounded by ``timeout`` in all."""
    todo = collections.deque(kernels)

    def run():
        while True:  # ends when no kernel is left to stop
            try:
                kernel = todo.popleft()
            except IndexError:
                return
            _quietly(kernel.cleanup)

    threads = [
        threading.Thread(target=run, name="cleanup", daemon=True)
        for _ in range(min(CLEANUP_PARALLEL, len(todo)))
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))


class Workers:
    """At most ``limit`` threads for slow work, started on demand; a thread with no
    work for WORKER_IDLE seconds ends (an idle agent has none)."""

    def __init__(self, limit=MAX_WORKERS):
        self.limit = limit
        self.cond = threading.Condition()
        self.jobs = collections.deque()
        self.threads = 0
        self.idle = 0
        self.running = 0

    def submit(self, job):
        with self.cond:
            self.jobs.append(job)
            if self.idle:
                self.cond.notify()
            elif self.threads < self.limit:
                self.threads += 1
                threading.Thread(target=self._work, name="worker", daemon=True).start()

    def _work(self):
        while True:  # ends after WORKER_IDLE seconds without work
            with self.cond:
                if not self.jobs:
                    self.idle += 1
                    try:
                        self.cond.wait(WORKER_IDLE)
                    finally:
                        self.idle -= 1
                    if not self.jobs:
                        self.threads -= 1
                        self.cond.notify_all()  # wait_idle
                        return
                job = self.jobs.popleft()
                self.running += 1
            try:
                job()
            finally:
                with self.cond:
                    self.running -= 1
                    self.cond.notify_all()

    def busy(self):
        """Whether a job is queued or running."""
        with self.cond:
            return bool(self.jobs or self.running)

    def wait_idle(self, timeout):
        """Wait (bounded) until no job is queued or running."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.jobs or self.running:  # ends when idle, or at the deadline
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.cond.wait(left)


def _quietly(function):
    try:
        function()
    except Exception:
        pass  # one kernel's failure must not keep the others running

"""Bounded admission and a worker pool that keeps model work off the event loop.

A request is admitted if fewer than `workers + queue_size` requests are in the system;
otherwise it is refused at once with `ResourceExhaustedError` (RESOURCE_EXHAUSTED), so an
overloaded edge answers quickly instead of letting callers hang. Admitted requests wait
for one of `workers` threads. A slot is freed only when its thread has really finished,
so a cancelled request whose model step is still running keeps counting.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Callable
from typing import TypeVar

from meg.errors import InvalidInputError, ResourceExhaustedError

__all__ = ["Slot", "WorkerPool"]

T = TypeVar("T")

MIN_RETRY_AFTER_S = 0.05
"""Shortest retry-after hint a full edge gives."""


class Slot:
    """One admitted request's place in the system; `release` is idempotent.

    Released while the request's function still runs in a worker, the place is given back
    only when the function returns.
    """

    def __init__(self, pool: WorkerPool) -> None:
        self._pool = pool
        self._released = False
        self._busy = False
        self._release_when_done = False

    def release(self) -> None:
        if self._busy:
            self._release_when_done = True
            return
        if not self._released:
            self._released = True
            self._pool._in_system -= 1

    def _done(self) -> None:
        self._busy = False
        if self._release_when_done:
            self.release()


class WorkerPool:
    """`workers` threads behind an admission queue of `queue_size` waiting requests.

    Create it inside the event loop that will call `run`; use it from that loop only.
    """

    def __init__(self, workers: int, queue_size: int) -> None:
        if workers < 1:
            raise InvalidInputError(f"workers = {workers} must be at least 1", field="workers")
        if queue_size < 0:
            raise InvalidInputError(f"queue_size = {queue_size} must be non-negative", field="queue_size")
        self.workers = workers
        self.queue_size = queue_size
        self._in_system = 0
        self._mean_run_s = MIN_RETRY_AFTER_S
        self._threads = asyncio.Semaphore(workers)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="meg-worker")

    @property
    def in_system(self) -> int:
        """Requests admitted and not yet finished (running or waiting)."""
        return self._in_system

    def retry_after_s(self) -> float:
        """When a place is likely free again: the mean run time of recent requests (at least
        `MIN_RETRY_AFTER_S`) times the queue ahead, shared by the workers."""
        ahead = max(1, self._in_system - self.workers + 1)
        return max(MIN_RETRY_AFTER_S, self._mean_run_s * ahead / self.workers)

    def admit(self) -> Slot:
        """Take a place in the system or raise `ResourceExhaustedError` when it is full."""
        capacity = self.workers + self.queue_size
        if self._in_system >= capacity:
            error = ResourceExhaustedError(
                f"edge is at capacity: {self._in_system} requests in progress or queued "
                f"(workers = {self.workers}, queue_size = {self.queue_size})"
            )
            error.retry_after_s = self.retry_after_s()
            raise error
        self._in_system += 1
        return Slot(self)

    async def run(self, slot: Slot, fn: Callable[[], T]) -> T:
        """Run `fn` in a worker thread once one is free.

        If the awaiting task is cancelled while `fn` runs, the thread keeps its worker and
        `slot` its place until `fn` returns (`fn` should poll a stop flag); cancelling
        while waiting for a worker simply gives up the wait.
        """
        loop = asyncio.get_running_loop()
        await self._threads.acquire()
        try:
            future = self._executor.submit(fn)
        except BaseException:
            self._threads.release()
            raise
        slot._busy = True
        started = loop.time()

        def finished() -> None:
            self._mean_run_s += 0.2 * (loop.time() - started - self._mean_run_s)  # moving average
            self._threads.release()
            slot._done()

        def on_done(_: concurrent.futures.Future[T]) -> None:
            # a closed loop raises RuntimeError: then there is nothing left to account for
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(finished)

        future.add_done_callback(on_done)
        return await asyncio.wrap_future(future)

    def shutdown(self) -> None:
        """Stop accepting work; running functions finish in their threads."""
        self._executor.shutdown(wait=False, cancel_futures=True)

"""The dynamic batcher between concurrent requests and the model.

Requests put one input each (or several, atomically) into a bounded queue and await a future.
One worker task takes up to ``max_batch_size`` inputs, waiting at most ``max_wait_s`` after the
oldest one arrived for more to come (and not at all when ``upstream`` says no input is on its
way, so a lone request pays no wait), and runs them as one call in a single inference thread, so
the model serves one batch at a time while the event loop stays free. An input whose caller
gave up (timeout, disconnect) leaves the queue at once and is never computed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from app.engine_errors import NotReady, QueueFull
from app.metrics import Metrics

log = logging.getLogger(__name__)

In = TypeVar("In")
Opt = TypeVar("Opt")
Out = TypeVar("Out")


@dataclass(frozen=True)
class Batched(Generic[Out]):
    """One input's result and what it cost."""

    value: Out
    queue_s: float  # enqueued -> its batch started
    inference_s: float  # the whole batched call
    batch_size: int


@dataclass(eq=False)
class _Item(Generic[In, Opt, Out]):
    payload: In
    options: Opt
    future: asyncio.Future[Batched[Out]]
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher(Generic[In, Opt, Out]):
    """Groups concurrent inputs into batched calls of ``run_batch(payloads, options)``.

    ``run_batch`` runs in a dedicated thread and returns one result per payload, in order.
    """

    def __init__(
        self,
        run_batch: Callable[[list[In], list[Opt]], Sequence[Out]],
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        metrics: Metrics | None = None,
        upstream: Callable[[], int] | None = None,
    ) -> None:
        self.run_batch = run_batch
        # Inputs still being prepared that will be submitted next; None: unknown, always wait.
        self.upstream = upstream
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.metrics = metrics
        self._pending: deque[_Item[In, Opt, Out]] = deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._worker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")

    @property
    def depth(self) -> int:
        """Inputs waiting for a batch."""
        return len(self._pending)

    def has_room(self, count: int = 1) -> bool:
        return not self._closing and self.depth + count <= self.max_queue

    def start(self) -> None:
        """Start the worker on the running event loop."""
        if self._worker is None:
            self._worker = asyncio.create_task(self._run(), name="batcher")

    async def submit(self, payload: In, options: Opt) -> Batched[Out]:
        """Queue one input and wait for its result."""
        return (await self.submit_many([(payload, options)]))[0]

    async def submit_many(self, inputs: Sequence[tuple[In, Opt]]) -> list[Batched[Out]]:
        """Queue several inputs, all or none, and wait for all their results (in order)."""
        if self._closing:
            raise NotReady("the server is shutting down")
        if not self.has_room(len(inputs)):
            raise QueueFull(f"the queue is full ({self.depth} of {self.max_queue} inputs waiting)")
        loop = asyncio.get_running_loop()
        items = [_Item[In, Opt, Out](p, o, loop.create_future()) for p, o in inputs]
        for item in items:
            item.future.add_done_callback(lambda f, item=item: self._forget(item, f))
            self._pending.append(item)
        self._update_depth()
        self._wakeup.set()
        # Cancelling this (timeout, disconnect) cancels the futures, and _forget drops the items.
        return list(await asyncio.gather(*(item.future for item in items)))

    def _forget(self, item: _Item[In, Opt, Out], future: asyncio.Future[Batched[Out]]) -> None:
        if future.cancelled():
            with contextlib.suppress(ValueError):
                self._pending.remove(item)
            self._update_depth()

    def _update_depth(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.labels(stage="inference").set(self.depth)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Let the batch fill up, for at most max_wait after its oldest input arrived.
            deadline = self._pending[0].enqueued + self.max_wait_s
            while len(self._pending) < self.max_batch_size and not self._closing:
                if self.upstream is not None and self.upstream() == 0:
                    break  # nothing else is on its way: waiting would only add latency
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    async with asyncio.timeout(remaining):
                        await self._wakeup.wait()
                except TimeoutError:
                    break
            batch: list[_Item[In, Opt, Out]] = []
            while self._pending and len(batch) < self.max_batch_size:
                item = self._pending.popleft()
                if not item.future.done():
                    batch.append(item)
            self._update_depth()
            if batch:
                await self._execute(loop, batch)

    async def _execute(
        self, loop: asyncio.AbstractEventLoop, batch: list[_Item[In, Opt, Out]]
    ) -> None:
        started = time.perf_counter()
        try:
            values = await loop.run_in_executor(
                self._executor,
                self.run_batch,
                [item.payload for item in batch],
                [item.options for item in batch],
            )
            if len(values) != len(batch):
                raise RuntimeError(f"run_batch returned {len(values)} results for {len(batch)}")
        except (Exception, asyncio.CancelledError) as exc:
            # Cancelled only when shutdown gave up waiting: the callers are told it is closing.
            failure = NotReady("the server shut down") if _cancelled(exc) else exc
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(failure)
            if _cancelled(exc):
                raise
            return
        inference_s = time.perf_counter() - started
        if self.metrics:
            self.metrics.inference_duration.observe(inference_s)
            self.metrics.batch_size.observe(len(batch))
        for item, value in zip(batch, values, strict=True):
            queue_s = started - item.enqueued
            if self.metrics:
                self.metrics.queue_duration.observe(queue_s)
            if not item.future.done():
                item.future.set_result(Batched(value, queue_s, inference_s, len(batch)))

    async def close(self, timeout: float) -> None:
        """Take no new inputs, finish the queued ones (for at most ``timeout`` s), then stop."""
        self._closing = True
        self._wakeup.set()
        if self._worker is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._worker), timeout)
            except TimeoutError:
                log.error("batcher: %d input(s) unfinished at shutdown", self.depth)
                self._worker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._worker
        for item in self._pending:
            if not item.future.done():
                item.future.set_exception(NotReady("the server shut down"))
        self._pending.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)


def _cancelled(exc: BaseException) -> bool:
    return isinstance(exc, asyncio.CancelledError)

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from app.batching import Batcher
from app.engine_errors import NotReady, QueueFull
from app.metrics import Metrics


class Recorder:
    """A fake model: answers ``payload * 10 + option`` and records each batch it ran."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.gate = gate
        self.started = threading.Event()

    def __call__(self, payloads: list[int], options: list[int]) -> list[int]:
        self.started.set()
        if self.gate is not None:
            self.gate.wait(5)
        self.batches.append(list(payloads))
        return [p * 10 + o for p, o in zip(payloads, options, strict=True)]


def make(run, **kwargs) -> Batcher:
    values = {"max_batch_size": 4, "max_wait_s": 0.05, "max_queue": 8} | kwargs
    return Batcher(run, **values)


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.005)


def test_concurrent_inputs_share_batches_and_get_their_own_results() -> None:
    async def main() -> None:
        run, metrics = Recorder(), Metrics()
        batcher = make(run, metrics=metrics)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(i, i % 3) for i in range(6)))
        assert [r.value for r in results] == [i * 10 + i % 3 for i in range(6)]
        assert sorted(len(b) for b in run.batches) == [2, 4]
        assert {r.batch_size for r in results} == {2, 4}
        assert all(r.queue_s >= 0 and r.inference_s >= 0 for r in results)
        assert metrics.registry.get_sample_value("captioner_batch_size_count") == 2
        assert metrics.registry.get_sample_value("captioner_batch_size_sum") == 6
        await batcher.close(1)

    asyncio.run(main())


def test_a_lone_input_runs_after_max_wait() -> None:
    async def main() -> None:
        run = Recorder()
        batcher = make(run, max_wait_s=0.05)
        batcher.start()
        started = time.perf_counter()
        result = await batcher.submit(1, 0)
        assert result.value == 10 and result.batch_size == 1
        assert 0.04 <= time.perf_counter() - started < 2
        await batcher.close(1)

    asyncio.run(main())


def test_a_lone_input_does_not_wait_when_nothing_else_is_on_its_way() -> None:
    async def main() -> None:
        run = Recorder()
        batcher = make(run, max_wait_s=2.0, upstream=lambda: 0)
        batcher.start()
        started = time.perf_counter()
        result = await batcher.submit(1, 0)
        assert result.value == 10 and result.batch_size == 1
        assert time.perf_counter() - started < 1.0  # not the 2 s max_wait
        await batcher.close(1)

    asyncio.run(main())


def test_the_batch_waits_for_an_input_still_being_prepared() -> None:
    async def main() -> None:
        run = Recorder()
        preparing = [1]  # one more input is on its way
        batcher = make(run, max_wait_s=2.0, upstream=lambda: preparing[0])
        batcher.start()
        first = asyncio.create_task(batcher.submit(1, 0))
        await asyncio.sleep(0.1)
        assert not run.batches  # still waiting for the second input
        preparing[0] = 0
        second = await batcher.submit(2, 0)
        assert (await first).batch_size == second.batch_size == 2
        assert run.batches == [[1, 2]]
        await batcher.close(1)

    asyncio.run(main())


def test_full_queue_refuses_all_or_nothing() -> None:
    async def main() -> None:
        gate = threading.Event()
        run = Recorder(gate)
        batcher = make(run, max_batch_size=1, max_wait_s=0, max_queue=2)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit(0, 0))
        await until(run.started.is_set)  # the worker holds input 0; the queue is empty
        queued = asyncio.ensure_future(batcher.submit_many([(1, 0)]))
        await until(lambda: batcher.depth == 1)
        with pytest.raises(QueueFull):
            await batcher.submit_many([(2, 0), (3, 0)])
        assert batcher.depth == 1  # nothing of the refused request was queued
        gate.set()
        assert (await running).value == 0 and [r.value for r in await queued] == [10]
        await batcher.close(1)

    asyncio.run(main())


def test_a_caller_that_gives_up_leaves_the_queue_and_is_never_computed() -> None:
    async def main() -> None:
        gate = threading.Event()
        run = Recorder(gate)
        batcher = make(run, max_batch_size=1, max_wait_s=0)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit(0, 0))
        await until(run.started.is_set)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await batcher.submit(7, 0)
        await until(lambda: batcher.depth == 0)
        gate.set()
        await running
        assert (await batcher.submit(8, 0)).value == 80
        assert run.batches == [[0], [8]]
        await batcher.close(1)

    asyncio.run(main())


def test_a_failing_batch_fails_its_callers_and_the_worker_goes_on() -> None:
    calls = []

    def run(payloads, options):
        calls.append(payloads)
        if len(calls) == 1:
            raise RuntimeError("model exploded")
        return payloads

    async def main() -> None:
        batcher = make(run)
        batcher.start()
        outcomes = await asyncio.gather(
            batcher.submit(1, 0), batcher.submit(2, 0), return_exceptions=True
        )
        assert all(isinstance(o, RuntimeError) for o in outcomes)
        assert (await batcher.submit(3, 0)).value == 3
        await batcher.close(1)

    asyncio.run(main())


def test_close_finishes_queued_inputs_then_refuses_new_ones() -> None:
    async def main() -> None:
        gate = threading.Event()
        run = Recorder(gate)
        batcher = make(run, max_batch_size=2, max_wait_s=10)
        batcher.start()
        waiting = [asyncio.ensure_future(batcher.submit(i, 0)) for i in range(5)]
        await until(run.started.is_set)
        gate.set()
        await batcher.close(5)  # does not wait max_wait_s: closing flushes at once
        assert [(await w).value for w in waiting] == [0, 10, 20, 30, 40]
        with pytest.raises(NotReady):
            await batcher.submit(9, 0)

    asyncio.run(main())


def test_close_timeout_fails_what_is_left_cleanly() -> None:
    async def main() -> None:
        gate = threading.Event()
        run = Recorder(gate)
        batcher = make(run, max_batch_size=1, max_wait_s=0)
        batcher.start()
        waiting = [asyncio.ensure_future(batcher.submit(i, 0)) for i in range(3)]
        await until(run.started.is_set)
        await batcher.close(0.05)
        outcomes = await asyncio.gather(*waiting, return_exceptions=True)
        assert all(isinstance(o, NotReady) for o in outcomes)
        gate.set()

    asyncio.run(main())

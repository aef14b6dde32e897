"""The batcher: concurrent requests share one model call; failures, overload and deadlines are contained."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from app.batching import Batcher, BatchFailed

pytestmark = pytest.mark.anyio  # anyio (a FastAPI dependency) runs the async tests on asyncio


class GatedModel:
    """Records batch sizes; the first call blocks until released, so requests pile up behind it."""

    def __init__(self, fail_on: int | None = None):
        self.calls: list[int] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail_on = fail_on

    def __call__(self, images: np.ndarray, sex: np.ndarray) -> np.ndarray:
        self.calls.append(len(images))
        self.entered.set()
        self.release.wait(5)
        if self.fail_on == len(self.calls):
            raise RuntimeError("simulated failure")
        return images.reshape(len(images), -1)[:, 0] + sex[:, 0] * 1000  # Each caller's own value.


def image(value: float) -> np.ndarray:
    return np.full((4, 4, 3), value, np.float32)


async def wait_for(event: threading.Event) -> None:
    while not event.is_set():
        await asyncio.sleep(0.001)


async def test_concurrent_requests_share_one_call_and_each_gets_its_own_answer():
    model = GatedModel()
    batcher = Batcher(model, max_batch_size=16, max_wait_s=0.001)
    batcher.start()
    first = asyncio.create_task(batcher.submit(image(0), 0.0))
    await wait_for(model.entered)
    rest = [asyncio.create_task(batcher.submit(image(i), float(i % 2))) for i in range(1, 11)]
    await asyncio.sleep(0.01)  # All ten are queued behind the running call.
    model.release.set()
    results = await asyncio.gather(first, *rest)
    assert model.calls == [1, 10]
    assert results == [0.0] + [i + 1000.0 * (i % 2) for i in range(1, 11)]
    await batcher.stop()


async def test_batches_never_exceed_the_maximum_size():
    model = GatedModel()
    model.release.set()
    batcher = Batcher(model, max_batch_size=4, max_wait_s=0.05)
    batcher.start()
    results = await asyncio.gather(*(batcher.submit(image(i), 0.0) for i in range(10)))
    assert results == [float(i) for i in range(10)]
    assert max(model.calls) <= 4 and sum(model.calls) == 10 and len(model.calls) < 10
    await batcher.stop()


async def test_a_plain_request_goes_ahead_of_queued_background_work():
    model = GatedModel()
    batcher = Batcher(model, max_batch_size=4, max_wait_s=0.001)
    batcher.start()
    first = asyncio.create_task(batcher.submit(image(0), 0.0))
    await wait_for(model.entered)
    # An explanation's copies queue up behind the running call, then a clinician's request arrives.
    copies = [asyncio.create_task(batcher.submit(image(100 + i), 0.0, background=True)) for i in range(8)]
    await asyncio.sleep(0.01)
    plain = asyncio.create_task(batcher.submit(image(7), 0.0))
    await asyncio.sleep(0.01)
    order: list[str] = []
    plain.add_done_callback(lambda _: order.append("plain"))
    for task in copies:
        task.add_done_callback(lambda _: order.append("copy"))
    model.release.set()
    results = await asyncio.gather(first, plain, *copies)
    assert model.calls == [1, 1, 4, 4]  # the plain request alone in the first batch after the running one
    assert order[0] == "plain" and order.count("copy") == 8
    assert results == [0.0, 7.0] + [100.0 + i for i in range(8)]  # each lane in arrival order, nothing lost
    await batcher.stop()


async def test_background_work_queued_after_a_plain_request_waits_for_the_next_batch():
    model = GatedModel()
    model.release.set()
    batcher = Batcher(model, max_batch_size=8, max_wait_s=0.5)
    batcher.start()
    announced = batcher.expect()  # a plain request is on its way, so the batch waits for it
    copy = asyncio.create_task(batcher.submit(image(100), 0.0, background=True))
    await asyncio.sleep(0.02)  # the collector holds the copy and waits for the announced request
    plain = asyncio.create_task(batcher.submit(image(7), 0.0, expected=announced))
    late_copy = asyncio.create_task(batcher.submit(image(101), 0.0, background=True))
    assert await asyncio.gather(copy, plain, late_copy) == [100.0, 7.0, 101.0]
    assert model.calls == [2, 1]  # the plain request joined the filling batch; the later copy did not
    await batcher.stop()


async def test_a_failing_batch_answers_its_callers_with_an_error_and_the_next_batch_works():
    model = GatedModel(fail_on=1)
    model.release.set()
    batcher = Batcher(model, max_batch_size=8, max_wait_s=0.02)
    batcher.start()
    failed = await asyncio.gather(*(batcher.submit(image(i), 0.0) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, BatchFailed) for r in failed)
    assert await batcher.submit(image(7), 0.0) == 7.0
    await batcher.stop()


async def test_a_request_past_its_deadline_times_out_and_is_not_run():
    model = GatedModel()
    batcher = Batcher(model, max_batch_size=1, max_wait_s=0)
    batcher.start()
    running = asyncio.create_task(batcher.submit(image(1), 0.0))
    await wait_for(model.entered)
    with pytest.raises(TimeoutError):
        await batcher.submit(image(2), 0.0, timeout=0.05)
    model.release.set()
    assert await running == 1.0
    assert await batcher.submit(image(3), 0.0) == 3.0
    assert model.calls == [1, 1]  # The timed-out request was dropped, not computed.
    await batcher.stop()


async def test_a_lone_request_does_not_wait_for_the_batch_to_fill():
    model = GatedModel()
    model.release.set()
    batcher = Batcher(model, max_batch_size=16, max_wait_s=30)  # A wait nobody should sit through.
    batcher.start()
    assert await asyncio.wait_for(batcher.submit(image(5), 0.0), timeout=5) == 5.0
    await batcher.stop()


async def test_the_batch_waits_for_requests_announced_as_on_their_way():
    model = GatedModel()
    model.release.set()
    batcher = Batcher(model, max_batch_size=16, max_wait_s=30)
    batcher.start()
    with batcher.expect() as second_expected:
        first = asyncio.create_task(batcher.submit(image(1), 0.0))
        await asyncio.sleep(0.05)  # The collector holds the first item while the second is "preprocessing".
        assert model.calls == []
        second = asyncio.create_task(batcher.submit(image(2), 0.0, expected=second_expected))
        assert await asyncio.gather(first, second) == [1.0, 2.0]
    assert model.calls == [2] and batcher.incoming == 0
    await batcher.stop()


async def test_a_request_that_fails_before_submitting_stops_being_waited_for():
    model = GatedModel()
    model.release.set()
    batcher = Batcher(model, max_batch_size=16, max_wait_s=30)
    batcher.start()
    with batcher.expect():
        first = asyncio.create_task(batcher.submit(image(1), 0.0))
        await asyncio.sleep(0.02)
    # Leaving the block (e.g. a decode error) releases the wait: the first request runs alone.
    assert await asyncio.wait_for(first, timeout=5) == 1.0
    await batcher.stop()


async def test_a_failure_outside_the_model_call_is_logged_and_the_batcher_restarts(monkeypatch, caplog):
    """Issue 12 item 3: a batcher that dies silently leaves every later request waiting for its 504."""
    model = GatedModel()
    model.release.set()
    batcher = Batcher(model, max_batch_size=4, max_wait_s=0.001)
    fill = batcher._fill
    calls = []

    async def flaky_fill(batch):
        calls.append(1)
        if len(calls) == 1:  # the failure strikes with a request in hand
            batch.append(await batcher.queue.get())
            raise RuntimeError("injected failure while collecting")
        return await fill(batch)

    monkeypatch.setattr(batcher, "_fill", flaky_fill)
    batcher.start()
    with pytest.raises(BatchFailed, match="collection failed"):  # answered at once, not at its deadline
        await asyncio.wait_for(batcher.submit(image(3), 0.0), 2)
    assert await asyncio.wait_for(batcher.submit(image(7), 0.0), 2) == 7.0
    assert batcher.alive and batcher.restarts == 0  # a served batch resets the count
    assert any(r.levelname == "ERROR" and "batcher loop failed" in r.getMessage() for r in caplog.records)
    await asyncio.wait_for(batcher.stop(), 2)


async def test_a_batcher_that_keeps_failing_stops_answers_at_once_and_shutdown_ends(monkeypatch):
    batcher = Batcher(GatedModel(), max_batch_size=4, max_wait_s=0.001)

    async def broken_collect():
        await asyncio.sleep(0.001)
        raise RuntimeError("injected failure while collecting")

    monkeypatch.setattr(batcher, "_collect", broken_collect)
    batcher.start()
    while batcher.alive:
        await asyncio.sleep(0.005)
    assert batcher.restarts == Batcher.MAX_RESTARTS + 1
    with pytest.raises(BatchFailed, match="stopped"):
        await asyncio.wait_for(batcher.submit(image(1), 0.0), 1)
    await asyncio.wait_for(batcher.stop(), 2)

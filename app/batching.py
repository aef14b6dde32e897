"""Dynamic batching: concurrent requests wait in a queue and share one session call.

Shape taken from Ray Serve's batch queue: one future per request; a collector that takes
at most ``max_batch_size`` items or whatever arrived within ``max_wait`` of the first; one
model call off the event loop; results (or the batch's exception) fanned out to every
caller. Timestamps use ``time.monotonic()``.

One refinement: the collector waits for more items only while requests are known to be on
their way (announced with :meth:`Batcher.expect` before their decode and preprocessing).
A lone request therefore runs at once, and ``max_wait`` is only spent when it can pay off.

A second: two lanes. Work submitted as ``background`` (an explanation's occluded copies) waits
behind every plain request in the queue and never joins a batch that holds one, so a clinician's
single radiograph is never queued behind the sixty-odd model inputs of someone else's heatmap: it
waits for the batch already running at most. (A plain request may join a batch of background work
still filling: it would wait for that batch anyway. A plain batch that meets queued background work
closes at once rather than waiting ``max_wait`` for more plain requests.) Background work has no
ageing: under plain load that never pauses, it waits until the request that queued it times out (an
explanation then answers 504).

The queue itself has no bound: the service bounds every prediction request from its first
byte (``app/admission.py``), which also bounds this queue, and refuses before the upload is
read rather than after it has been decoded and preprocessed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger("boneage")


class BatchFailed(RuntimeError):
    """The model call for this request's batch failed; other batches are unaffected."""


@dataclass(order=True)
class _Item:
    #: (lane, arrival number): plain requests (lane 0) leave the queue before background work (lane 1),
    #: each lane first come, first served.
    rank: tuple[int, int]
    image: np.ndarray = field(compare=False)
    sex: float = field(compare=False)
    future: asyncio.Future = field(compare=False)
    enqueued: float = field(default_factory=time.monotonic, compare=False)


class Expected:
    """A request announced to the batcher; it stops counting when it submits or gives up."""

    def __init__(self, batcher: Batcher):
        self.batcher = batcher
        self.pending = True
        batcher.incoming += 1

    def arrived(self) -> None:
        if self.pending:
            self.pending = False
            self.batcher.incoming -= 1

    def __enter__(self) -> Expected:
        return self

    def __exit__(self, *exc) -> None:
        self.arrived()  # Failed in preprocessing or validation: no longer on its way.


class Batcher:
    """``await batcher.submit(image, sex)`` → that image's result, batched with whoever else is waiting.

    ``predict(images, sex)`` returns one result per image, in order (the service's is a
    :class:`app.inference.Prediction`); the batcher hands each caller its own.
    """

    def __init__(
        self,
        predict: Callable[[np.ndarray, np.ndarray], Sequence[Any]],
        max_batch_size: int = 16,
        max_wait_s: float = 0.005,
        on_batch: Callable[[int, list[float], float], None] | None = None,
    ):
        self.predict = predict
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.queue: asyncio.PriorityQueue[_Item] = asyncio.PriorityQueue()
        self._arrivals = itertools.count()
        self.on_batch = on_batch  # (batch size, queue waits in s, model seconds) → metrics
        self.incoming = 0  # Requests being decoded/preprocessed that will submit soon.
        self._task: asyncio.Task | None = None
        # One thread: model calls never overlap; ONNX Runtime parallelises inside each call.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="onnxruntime")

    @property
    def depth(self) -> int:
        return self.queue.qsize()

    #: Restarts in a row (a served batch resets the count) after an unexpected failure of the loop
    #: itself; beyond it the batcher stays down: ``alive`` is False, so readiness and liveness fail
    #: and an orchestrator replaces the process.
    MAX_RESTARTS = 5

    def start(self) -> None:
        self.restarts = 0
        self._task = asyncio.get_running_loop().create_task(self._supervise(), name="batcher")

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _supervise(self) -> None:
        """Run the batching loop; if it dies of anything but cancellation, log and restart it.

        A failure inside one model call is handled per batch in :meth:`_run`; this catches what
        lies outside it (collecting, stacking), which would otherwise leave every later request
        waiting for its deadline while readiness still said ready.
        """
        while True:
            try:
                await self._run()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.restarts += 1
                log.exception("batcher loop failed (restart %d of %d)", self.restarts, self.MAX_RESTARTS)
                if self.restarts > self.MAX_RESTARTS:
                    log.error(
                        "batcher stopped after %d failed restarts in a row: the service is neither ready nor live",
                        self.MAX_RESTARTS,
                    )
                    self._fail_queued(BatchFailed("the batcher stopped"))
                    return
                await asyncio.sleep(min(0.01 * 2**self.restarts, 1.0))  # a persistent fault: back off

    def _fail_queued(self, exc: Exception) -> None:
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(exc)

    async def stop(self) -> None:
        """Answer everything already queued, then stop (graceful shutdown)."""
        while not self.queue.empty() and self.alive:
            await asyncio.sleep(0.01)
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    def expect(self) -> Expected:
        """Announce a request that will submit after its preprocessing (use as a context manager)."""
        return Expected(self)

    async def submit(
        self,
        image: np.ndarray,
        sex: float,
        timeout: float | None = None,
        expected: Expected | None = None,
        background: bool = False,
    ) -> Any:
        """Queue one preprocessed image; return its result, or raise TimeoutError or BatchFailed.

        ``background`` work is taken only when no plain request is waiting (see the module's docstring).
        """
        if expected is not None:
            expected.arrived()
        if self._task is not None and self._task.done():
            raise BatchFailed("the batcher has stopped")
        rank = (1 if background else 0, next(self._arrivals))
        item = _Item(rank, image, sex, asyncio.get_running_loop().create_future())
        self.queue.put_nowait(item)
        return await asyncio.wait_for(item.future, timeout)  # Cancels the future on timeout.

    async def _collect(self) -> list[_Item]:
        batch: list[_Item] = []
        try:
            return await self._fill(batch)
        except BaseException as exc:  # Whoever was taken off the queue is answered, not left waiting.
            failure = BatchFailed(f"batch collection failed: {exc!r}")
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(failure)
            raise

    async def _fill(self, batch: list[_Item]) -> list[_Item]:
        batch.append(await self.queue.get())
        plain = batch[0].rank[0] == 0  # once a plain request is in, no background work joins
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                item = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.incoming == 0:
                    break  # Out of time, or nobody else is on the way: run what we have.
                try:
                    # Re-check every millisecond whether the announced requests are still coming.
                    item = await asyncio.wait_for(self.queue.get(), min(remaining, 0.001))
                except TimeoutError:
                    continue
            if plain and item.rank[0] > 0:
                # Background work does not ride with plain requests: on a CPU every extra image
                # lengthens the call. It goes back in its place; the next batch takes it.
                self.queue.put_nowait(item)
                break
            plain = plain or item.rank[0] == 0  # a plain request may join background work, not the reverse
            batch.append(item)
        return [item for item in batch if not item.future.done()]  # Drop callers that timed out.

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                continue
            started = time.monotonic()
            try:
                images = np.stack([item.image for item in batch])
                sex = np.array([[item.sex] for item in batch], dtype=np.float32)
                results = await loop.run_in_executor(self._executor, self.predict, images, sex)
                if len(results) != len(batch):
                    raise RuntimeError(f"model returned {len(results)} results for {len(batch)} inputs")
            except Exception as exc:
                log.error("batch of %d failed: %s", len(batch), exc)
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(BatchFailed(str(exc)))
                continue
            for item, value in zip(batch, results, strict=True):
                if not item.future.done():
                    item.future.set_result(value)
            self.restarts = 0
            if self.on_batch:
                self.on_batch(len(batch), [started - i.enqueued for i in batch], time.monotonic() - started)

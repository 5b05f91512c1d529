"""A dynamic batcher that forms the next batch when the model is free: everything that arrived while a batch ran
goes into the next one.

Why not `@serve.batch`: in Ray 2.60 its loop forms a batch, hands it to a task that waits for the model
(`max_concurrent_batches`), and at once starts forming the next batch from what arrives in the following
`batch_wait_timeout_s`. Under load the model's queue fills with many batches of one or two requests (measured:
1.4 images per batch at concurrency 32, requests 700 ms in the queue, 0.5 of the model's batch-32 speed).
Here one worker per replica takes, each time the model is free, every waiting image up to `max_batch_images`,
so a batch holds what arrived during the previous one and an idle model starts a lone request at once
(`wait_s`, default 0, makes an idle model wait that long for company first).

Images are counted, not requests (a request may carry many), and a batch holds the images of one model only: an
item is run by the model its images were prepared for, so a hot swap never mixes versions in a batch. Cancelled
callers (a request past its deadline) are dropped before their batch runs. No torch, no Ray.
"""
from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any, Callable, Optional

import numpy as np

logger = logging.getLogger(__name__)


class _Item:
    __slots__ = ("model", "x", "future")

    def __init__(self, model: Any, x: np.ndarray, future: asyncio.Future):
        self.model, self.x, self.future = model, x, future


class ModelBatcher:
    """`await batcher.run(model, x)` -> model.run(x) computed in a batch with other callers' images of the same
    model. `on_batch(images)` is told each batch's size (metrics)."""

    def __init__(self, max_batch_images: int = 32, wait_s: float = 0.0,
                 on_batch: Optional[Callable[[int], None]] = None):
        if max_batch_images < 1 or wait_s < 0:
            raise ValueError("max_batch_images must be >= 1 and wait_s >= 0")
        self.max_batch_images, self.wait_s = int(max_batch_images), float(wait_s)
        self._on_batch = on_batch or (lambda n: None)
        self._waiting: collections.deque[_Item] = collections.deque()
        self._arrived: Optional[asyncio.Event] = None
        self._worker: Optional[asyncio.Task] = None

    @property
    def alive(self) -> bool:
        """False only when the worker was started and has stopped (it never stops on a model's error)."""
        return self._worker is None or not self._worker.done()

    @property
    def queued_images(self) -> int:
        return sum(len(item.x) for item in self._waiting)

    async def run(self, model: Any, x: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._arrived = asyncio.Event()
            self._worker = loop.create_task(self._work())
        item = _Item(model, x, loop.create_future())
        self._waiting.append(item)
        self._arrived.set()
        return await item.future

    async def _work(self) -> None:
        while True:
            await self._next_arrival()
            if self.wait_s and self.queued_images < self.max_batch_images:
                await asyncio.sleep(self.wait_s)  # an idle model: give other requests a moment to join
            batch = self._take()
            if not batch:
                continue
            model, sizes = batch[0].model, [len(item.x) for item in batch]
            try:
                self._on_batch(sum(sizes))
            except Exception:  # a metric that fails must not stop the worker (every later request would wait)
                logger.exception("the batch-size callback failed; batching goes on")
            try:
                out = await asyncio.to_thread(model.run, np.concatenate([item.x for item in batch]))
            except Exception as e:  # the model failed: every caller of this batch gets the error
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(e)
                continue
            start = 0
            for item, n in zip(batch, sizes):
                if not item.future.done():
                    item.future.set_result(out[start:start + n])
                start += n

    async def _next_arrival(self) -> None:
        while not self._waiting:
            self._arrived.clear()
            await self._arrived.wait()

    def _take(self) -> list[_Item]:
        """The waiting items of the first live item's model, in arrival order, up to max_batch_images (a single
        item larger than that runs alone); items of other models keep their place."""
        batch: list[_Item] = []
        kept: collections.deque[_Item] = collections.deque()
        images = 0
        while self._waiting:
            item = self._waiting.popleft()
            if item.future.done():  # cancelled while waiting
                continue
            fits = not batch or (item.model is batch[0].model and images + len(item.x) <= self.max_batch_images)
            if fits:
                batch.append(item)
                images += len(item.x)
            else:
                kept.append(item)
            if images >= self.max_batch_images:
                break
        kept.extend(self._waiting)
        self._waiting = kept
        return batch

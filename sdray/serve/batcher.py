"""Adaptive request batching for one engine: a batch forms when the engine is free.

Ray Serve's `@serve.batch` forms the next batch as soon as the previous one starts, then waits
out its window even for a lone client. Here the batch forms only once the engine is free, from
every image queued by then (up to `max_batch_size`), so requests that arrived while the engine
worked ride together without waiting; it waits (at most `max_wait_s`) only while the batch is
not full and more requests are on their way in (their bodies being read by this replica).
A lone client therefore never waits, and a busy replica fills its batches from its queue.

A batch holds items of one key (`key(item)`: for images, what must match to share a denoising
batch — size, steps, scheduler, guidance): it forms around the oldest item queued and takes the
queued items of that key, in order, leaving the others for the batches after. So mixed
traffic still rides in full batches, none skipped over for long (the oldest goes first).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

log = logging.getLogger(__name__)


class AdaptiveBatcher:
    """Queue items for `run_batch(items) -> results` (one result per item, in order)."""

    def __init__(
        self,
        run_batch: Callable[[list[Any]], Awaitable[list[Any]]],
        max_batch_size: int,
        max_wait_s: float,
        key: Callable[[Any], Hashable] = lambda item: None,
    ) -> None:
        self.run_batch = run_batch
        self.key = key
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.arriving = 0  # requests being read that will queue items
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reset()

    def _reset(self) -> None:
        self._queue: deque[tuple[Any, asyncio.Future]] = deque()  # oldest first
        self._changed = asyncio.Event()  # something was queued, or an arrival ended
        self.waiting = asyncio.Event()  # set while a forming batch waits for arrivals

    def _start(self) -> None:
        """Start the batching task on the running loop (afresh if an earlier loop closed)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._worker is None or self._worker.done():
            if self._loop is not None and self._loop is not loop:
                self._reset()
            self._loop = loop
            self._worker = loop.create_task(self._work(), name="sdray-batcher")

    @contextlib.contextmanager
    def incoming(self):
        """Mark a request as arriving while its body is read, so a forming batch waits for it."""
        self.arriving += 1
        try:
            yield
        finally:
            self.arriving -= 1
            self._changed.set()

    async def submit(self, items: list[Any]) -> list[Any]:
        """Queue items together (so they can share a batch) and wait for their results."""
        self._start()
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        self._queue.extend(zip(items, futures, strict=True))
        self._changed.set()
        return list(await asyncio.gather(*futures))

    def _take_queued(self, batch: list, key: Hashable) -> None:
        """Move the queued items of `key` into `batch`, oldest first, up to a full batch."""
        kept: deque = deque()
        while self._queue:
            item, future = self._queue.popleft()
            if future.done():  # a caller that timed out is gone
                continue
            if len(batch) < self.max_batch_size and self.key(item) == key:
                batch.append((item, future))
            else:
                kept.append((item, future))
        self._queue = kept

    async def _oldest_key(self) -> Hashable:
        """The key of the oldest live item queued, once there is one."""
        while True:
            while self._queue and self._queue[0][1].done():
                self._queue.popleft()
            if self._queue:
                return self.key(self._queue[0][0])
            self._changed.clear()
            await self._changed.wait()

    async def _form(self) -> list:
        """The next batch: the oldest item and the queued items of its key, plus those that
        arrive while more are on their way."""
        key = await self._oldest_key()
        batch: list = []
        deadline = time.monotonic() + self.max_wait_s
        while True:
            self._take_queued(batch, key)
            remaining = deadline - time.monotonic()
            if len(batch) >= self.max_batch_size or self.arriving == 0 or remaining <= 0:
                return batch
            self._changed.clear()
            self.waiting.set()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
            self.waiting.clear()

    async def _work(self) -> None:
        while True:
            batch = await self._form()
            if not batch:  # its oldest caller gave up meanwhile, alone with its key
                continue
            try:
                results = await self.run_batch([item for item, _ in batch])
            except Exception as error:  # noqa: BLE001 - handed to each caller
                log.exception("a batch of %d failed", len(batch))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)

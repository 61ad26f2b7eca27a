"""Previews and departing clients in the replica, on the tiny engine: previews reach only the
requests that asked and never change an image; a client that leaves mid-batch frees its slot
at once, and the others in its batch get the images they would have had."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import numpy as np
import pytest

from sdray.serve.app import ImageJob, ImageReplica
from tests.unit import test_serve_replica as replica_tests

make_replica = replica_tests.make_replica  # the fixture: an ImageReplica on the tiny engine
request = replica_tests.request


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


class PairBatcher:
    """Stands in for Serve's @serve.batch, which runs only inside a Serve replica: every `size`
    jobs queued run as one batch, and a job whose caller was cancelled before its batch started
    is dropped from it, as Serve does."""

    def __init__(self, replica: ImageReplica, size: int) -> None:
        self.replica, self.size, self.pending = replica, size, []
        self.tasks: set[asyncio.Task] = set()

    async def __call__(self, job: ImageJob):
        future = asyncio.get_running_loop().create_future()
        self.pending.append((job, future))
        if len(self.pending) == self.size:
            batch, self.pending = self.pending, []
            task = asyncio.ensure_future(self._run(batch))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return await future

    async def _run(self, batch) -> None:
        live = [(job, future) for job, future in batch if not future.cancelled()]
        outcomes = await self.replica.generate_batch([job for job, _ in live])
        for (_, future), outcome in zip(live, outcomes, strict=True):
            if not future.done():
                future.set_result(outcome)


def with_previews(index: int, steps: int, preview_at: tuple[int, ...]):
    return dataclasses.replace(request(index), steps=steps, preview_at=preview_at)


def test_previews_reach_only_the_requests_that_asked_and_never_change_an_image(
    make_replica, tiny_engine
):
    replica, engine = make_replica()
    replica._run_batch = PairBatcher(replica, 2)
    watched = with_previews(0, 4, (1, 2, 3))
    plain = with_previews(1, 4, ())
    seen: list[tuple[int, int, tuple]] = []

    async def scenario():
        return await asyncio.gather(
            replica.generate([watched], lambda i, step, px: seen.append((i, step, px.shape))),
            replica.generate([plain]),
        )

    (first,), (second,) = asyncio.run(scenario())
    assert seen == [(0, 1, (64, 64, 3)), (0, 2, (64, 64, 3)), (0, 3, (64, 64, 3))]
    assert engine.calls[-1] == ["r0", "r1"] and first.batch_size == second.batch_size == 2
    for outcome, alone in zip(
        (first, second), tiny_engine.generate([with_previews(0, 4, ()), plain]), strict=True
    ):
        assert outcome.error is None and np.array_equal(outcome.image, alone.image)


def test_a_client_that_leaves_mid_batch_frees_its_slot_and_the_batch_goes_on(
    make_replica, tiny_engine
):
    replica, engine = make_replica()
    replica._run_batch = PairBatcher(replica, 2)
    leaving = with_previews(0, 5, (1, 2, 3, 4))
    staying = with_previews(1, 5, (1, 2, 3, 4))
    left_steps: list[int] = []
    stayed_steps: list[int] = []
    released: list[bool] = []
    gone = threading.Event()

    async def scenario():
        loop = asyncio.get_running_loop()
        first_preview = asyncio.Event()

        def on_leaving(index, step, pixels):
            left_steps.append(step)
            loop.call_soon_threadsafe(first_preview.set)

        def on_staying(index, step, pixels):
            stayed_steps.append(step)
            if step == 2:  # hold the engine mid-batch until the leaving request has ended
                released.append(gone.wait(60))

        leaver = asyncio.ensure_future(replica.generate([leaving], on_leaving))
        stayer = asyncio.ensure_future(replica.generate([staying], on_staying))
        await asyncio.wait_for(first_preview.wait(), 120)
        leaver.cancel()  # what Serve does when the client disconnects
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(leaver, 30)
        gone.set()  # the leaver's slot is free while the engine call is still running
        return await asyncio.wait_for(stayer, 120)

    started = time.monotonic()
    (outcome,) = asyncio.run(scenario())
    assert released == [True], (
        f"the leaving request waited on the engine ({time.monotonic() - started:.0f}s)"
    )
    # One engine call for both, never retried; the leaver's previews stop once it has gone.
    assert engine.calls[-1] == ["r0", "r1"] and len(engine.calls) == 2  # warm-up + the batch
    assert 1 in left_steps and set(left_steps) <= {1, 2}
    assert stayed_steps == [1, 2, 3, 4]
    (alone,) = tiny_engine.generate([staying])
    assert outcome.error is None and outcome.batch_size == 2
    assert psnr(outcome.image, alone.image) >= 40


def test_images_whose_client_left_are_skipped_where_they_have_not_run(make_replica):
    replica, engine = make_replica()
    now = time.perf_counter()
    quick = ImageJob(with_previews(0, 2, (1,)), now)
    later = ImageJob(with_previews(1, 3, ()), now)  # other steps: a second engine call
    quick.on_preview = lambda step, pixels: setattr(later, "abandoned", True)
    outcomes = asyncio.run(replica.generate_batch([quick, later]))
    assert engine.calls[-1] == ["r0"]  # the second call never ran
    assert outcomes[0].error is None and outcomes[1].error == "abandoned"


def test_a_preview_sink_that_fails_breaks_no_batch(make_replica):
    replica, engine = make_replica()
    now = time.perf_counter()
    broken = ImageJob(with_previews(0, 3, (1, 2)), now)
    broken.on_preview = lambda step, pixels: 1 / 0
    other = ImageJob(with_previews(1, 3, ()), now)
    outcomes = asyncio.run(replica.generate_batch([broken, other]))
    assert [o.error for o in outcomes] == [None, None]
    assert engine.calls[-1] == ["r0", "r1"]  # one call, no retry

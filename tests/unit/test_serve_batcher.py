"""The replica's adaptive batcher: no wait when alone, full batches from the queue when busy,
a short wait only for requests on their way in. Every wait here is on an event, bounded."""

from __future__ import annotations

import asyncio

import pytest

from sdray.serve.batcher import AdaptiveBatcher

BOUND_S = 10  # a generous bound on every wait; the batcher's own window is an hour


class Engine:
    """Records each batch; the first batch can be held until released."""

    def __init__(self, hold_first: bool = False) -> None:
        self.batches: list[list] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        if not hold_first:
            self.release.set()

    async def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        self.started.set()
        await self.release.wait()
        if "boom" in items:
            raise RuntimeError("engine failed")
        return [f"image of {item}" for item in items]


def test_a_lone_request_does_not_wait_for_company():
    async def go():
        engine = Engine()
        batcher = AdaptiveBatcher(engine, max_batch_size=4, max_wait_s=3600)
        return await asyncio.wait_for(batcher.submit(["a"]), BOUND_S), engine

    results, engine = asyncio.run(go())
    assert results == ["image of a"] and engine.batches == [["a"]]


def test_requests_queued_while_the_engine_works_share_the_next_batch():
    async def go():
        engine = Engine(hold_first=True)
        batcher = AdaptiveBatcher(engine, max_batch_size=4, max_wait_s=3600)
        first = asyncio.ensure_future(batcher.submit(["a"]))
        await asyncio.wait_for(engine.started.wait(), BOUND_S)
        rest = [asyncio.ensure_future(batcher.submit([f"r{i}"])) for i in range(5)]
        await asyncio.sleep(0)  # let them queue (no timing: they queue on this tick)
        engine.release.set()
        return await asyncio.wait_for(asyncio.gather(first, *rest), BOUND_S), engine

    results, engine = asyncio.run(go())
    assert engine.batches == [["a"], ["r0", "r1", "r2", "r3"], ["r4"]]
    assert results[1] == ["image of r0"]


def test_the_images_of_one_request_go_together():
    async def go():
        engine = Engine()
        batcher = AdaptiveBatcher(engine, max_batch_size=8, max_wait_s=3600)
        return await asyncio.wait_for(batcher.submit(["x", "y", "z"]), BOUND_S), engine

    results, engine = asyncio.run(go())
    assert engine.batches == [["x", "y", "z"]] and results[2] == "image of z"


def test_a_forming_batch_waits_only_while_a_request_is_arriving():
    async def go():
        engine = Engine()
        batcher = AdaptiveBatcher(engine, max_batch_size=4, max_wait_s=3600)
        with batcher.incoming():  # a second request's body is being read
            first = asyncio.ensure_future(batcher.submit(["a"]))
            await asyncio.wait_for(batcher.waiting.wait(), BOUND_S)
            assert not engine.batches
            second = asyncio.ensure_future(batcher.submit(["b"]))
        both = await asyncio.wait_for(asyncio.gather(first, second), BOUND_S)
        # A request that arrives and then queues nothing (a bad body) releases the wait too.
        with batcher.incoming():
            third = asyncio.ensure_future(batcher.submit(["c"]))
            await asyncio.wait_for(batcher.waiting.wait(), BOUND_S)
        return both, await asyncio.wait_for(third, BOUND_S), engine

    both, third, engine = asyncio.run(go())
    assert engine.batches == [["a", "b"], ["c"]]
    assert both == [["image of a"], ["image of b"]] and third == ["image of c"]


def test_a_failed_batch_fails_each_of_its_callers_and_the_batcher_goes_on():
    async def go():
        engine = Engine()
        batcher = AdaptiveBatcher(engine, max_batch_size=4, max_wait_s=0)
        with pytest.raises(RuntimeError, match="engine failed"):
            await asyncio.wait_for(batcher.submit(["boom", "ok"]), BOUND_S)
        return await asyncio.wait_for(batcher.submit(["next"]), BOUND_S)

    assert asyncio.run(go()) == ["image of next"]


def test_a_caller_that_gave_up_is_left_out_of_the_batch():
    async def go():
        engine = Engine(hold_first=True)
        batcher = AdaptiveBatcher(engine, max_batch_size=4, max_wait_s=0)
        first = asyncio.ensure_future(batcher.submit(["a"]))
        await asyncio.wait_for(engine.started.wait(), BOUND_S)
        gone = asyncio.ensure_future(batcher.submit(["gone"]))
        kept = asyncio.ensure_future(batcher.submit(["kept"]))
        await asyncio.sleep(0)
        gone.cancel()  # as the API's request timeout does
        engine.release.set()
        await asyncio.wait_for(asyncio.gather(first, kept), BOUND_S)
        return engine

    assert asyncio.run(go()).batches == [["a"], ["kept"]]


def test_mixed_traffic_forms_full_batches_by_key_oldest_first():
    """Images of two kinds queued alternately ride in batches of one kind each, the kind of
    the oldest image first, not one image per batch."""

    async def go():
        engine = Engine(hold_first=True)
        batcher = AdaptiveBatcher(
            engine, max_batch_size=4, max_wait_s=3600, key=lambda item: item.split(":")[0]
        )
        first = asyncio.ensure_future(batcher.submit(["b:0"]))
        await asyncio.wait_for(engine.started.wait(), BOUND_S)
        mixed = [f"{kind}:{i}" for i in range(1, 6) for kind in ("a", "b")]
        rest = [asyncio.ensure_future(batcher.submit([item])) for item in mixed]
        await asyncio.sleep(0)  # let them queue (no timing: they queue on this tick)
        engine.release.set()
        results = await asyncio.wait_for(asyncio.gather(first, *rest), BOUND_S)
        return results, engine

    results, engine = asyncio.run(go())
    assert engine.batches == [
        ["b:0"],
        ["a:1", "a:2", "a:3", "a:4"],
        ["b:1", "b:2", "b:3", "b:4"],
        ["a:5"],
        ["b:5"],
    ]
    assert results[1] == ["image of a:1"]

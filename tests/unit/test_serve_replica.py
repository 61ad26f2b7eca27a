"""The replica without Serve, on the tiny engine: failure isolation in a batch, out-of-memory,
fatal engine errors, health checks and a warm-up that must succeed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np
import pytest

from sdray.requests import GenerationRequest
from sdray.serve.api import OUT_OF_MEMORY, SERVER_ERROR, UNAVAILABLE
from sdray.serve.app import FAILURES_BEFORE_PROBE, ImageJob, ImageReplica

CONFIG = {
    "model": {"source": "tiny", "device": "cpu"},
    "generation": {"width": 64, "height": 64, "steps": 2},
    "serve": {"max_batch_size": 8},
}


class FlakyEngine:
    """The tiny engine, raising `fail(requests)` when that returns an exception."""

    def __init__(self, engine, fail: Callable[[list], Exception | None] | None = None):
        self.engine = engine
        self.fail = fail
        self.calls: list[list[str]] = []
        self.model_name = engine.model_name
        self.plan = engine.plan
        self.device = engine.device
        self.load_seconds = engine.load_seconds
        self.max_batch_size = engine.max_batch_size

    def generate(self, requests, on_preview=None):
        self.calls.append([r.id for r in requests])
        error = self.fail(requests) if self.fail else None
        if error is not None:
            raise error
        return self.engine.generate(requests, on_preview=on_preview)


@pytest.fixture
def make_replica(monkeypatch, tiny_engine):
    """Build an ImageReplica around a FlakyEngine over the session's tiny engine."""
    from sdray.engine import DiffusionEngine

    def make(fail=None) -> tuple[ImageReplica, FlakyEngine]:
        engine = FlakyEngine(tiny_engine, fail)
        monkeypatch.setattr(DiffusionEngine, "from_config", staticmethod(lambda *a, **k: engine))
        return ImageReplica(CONFIG), engine

    return make


def request(index: int, prompt: str | None = None) -> GenerationRequest:
    return GenerationRequest(
        id=f"r{index}",
        prompt=prompt or f"a red cube {index}",
        negative_prompt="",
        seed=index,
        steps=2,
        guidance_scale=7.5,
        width=64,
        height=64,
        scheduler="ddim",
    )


def run(replica: ImageReplica, requests: list[GenerationRequest]):
    jobs = [ImageJob(r, time.perf_counter()) for r in requests]
    return asyncio.run(replica.generate_batch(jobs))


def only(ids: list[str]) -> Callable[[list], Exception | None]:
    """Fail every call that holds one of `ids`, with a generic (not fatal) error."""
    return lambda requests: ValueError("bad input") if any(r.id in ids for r in requests) else None


def test_one_bad_prompt_fails_alone_and_the_rest_of_its_batch_succeeds(make_replica, tiny_engine):
    replica, engine = make_replica()
    # A lone surrogate makes the real tokenizer raise TypeError for the whole batch.
    requests = [request(0), request(1, "bad \ud800 prompt"), request(2), request(3)]
    outcomes = run(replica, requests)
    assert [o.error is None for o in outcomes] == [True, False, True, True]
    bad = outcomes[1]
    assert bad.image is None and bad.error_code == SERVER_ERROR and bad.error_id
    assert "TypeError" in bad.error  # for the server's log; the API shows only the id
    # One batched call, then each request on its own; the good ones are the images they
    # would have been alone.
    assert engine.calls[1:] == [["r0", "r1", "r2", "r3"], ["r0"], ["r1"], ["r2"], ["r3"]]
    for index in (0, 2, 3):
        (alone,) = tiny_engine.generate([requests[index]])
        assert np.array_equal(outcomes[index].image, alone.image)
        assert outcomes[index].batch_size == 1
    assert replica.ready()
    replica.check_health()


def test_a_batch_that_succeeds_is_one_engine_call(make_replica):
    replica, engine = make_replica()
    outcomes = run(replica, [request(i) for i in range(3)])
    assert all(o.error is None for o in outcomes)
    assert engine.calls[1:] == [["r0", "r1", "r2"]]
    assert {o.batch_size for o in outcomes} == {3} and len({o.call_id for o in outcomes}) == 1


def test_out_of_memory_in_a_batch_retries_one_by_one(make_replica):
    import torch

    def oom_if_batched(requests):
        return torch.OutOfMemoryError("CUDA out of memory") if len(requests) > 1 else None

    replica, engine = make_replica(oom_if_batched)
    outcomes = run(replica, [request(0), request(1)])
    assert all(o.error is None for o in outcomes)
    assert engine.calls[1:] == [["r0", "r1"], ["r0"], ["r1"]]
    assert replica.ready()


def test_out_of_memory_alone_is_retryable_and_the_replica_stays_healthy(make_replica):
    import torch

    def always_oom(requests):
        return None if requests[0].id == "probe" else torch.OutOfMemoryError("CUDA OOM")

    replica, _ = make_replica(always_oom)
    for _ in range(FAILURES_BEFORE_PROBE + 1):
        (outcome,) = run(replica, [request(0)])
        assert outcome.error_code == OUT_OF_MEMORY
    assert replica.ready()
    replica.check_health()


def test_a_cuda_error_makes_the_replica_unhealthy(make_replica):
    broken = False

    def cuda_fault(requests):
        return (
            RuntimeError("CUDA error: an illegal memory access was encountered") if broken else None
        )

    replica, engine = make_replica(cuda_fault)
    broken = True
    outcomes = run(replica, [request(0), request(1)])
    assert {o.error_code for o in outcomes} == {UNAVAILABLE}
    assert engine.calls[1:] == [["r0", "r1"]]  # no retries on a broken device
    assert not replica.ready()
    with pytest.raises(RuntimeError, match="illegal memory access"):
        replica.check_health()
    # Later requests fail fast without touching the engine.
    (outcome,) = run(replica, [request(2)])
    assert outcome.error_code == UNAVAILABLE and len(engine.calls) == 2


def test_repeated_failures_with_a_failing_probe_make_the_replica_unhealthy(make_replica):
    broken = False
    replica, engine = make_replica(lambda requests: ValueError("weights gone") if broken else None)
    broken = True
    for _ in range(FAILURES_BEFORE_PROBE - 1):
        run(replica, [request(0)])
        assert replica.ready()
    run(replica, [request(0)])
    assert engine.calls[-1] == ["probe"]
    assert not replica.ready()
    with pytest.raises(RuntimeError, match="probe failed"):
        replica.check_health()


def test_repeated_bad_requests_with_a_working_probe_keep_the_replica_healthy(make_replica):
    replica, engine = make_replica(only(["r0", "r1", "r2"]))
    outcomes = run(replica, [request(0), request(1), request(2)])
    assert all(o.error_code == SERVER_ERROR for o in outcomes)
    assert ["probe"] in engine.calls[1:]
    assert replica.ready()
    replica.check_health()
    (good,) = run(replica, [request(3)])
    assert good.error is None


def test_a_failed_warm_up_fails_the_replica(make_replica):
    with pytest.raises(RuntimeError, match="warm-up generation failed"):
        make_replica(lambda requests: RuntimeError("no kernel image is available"))

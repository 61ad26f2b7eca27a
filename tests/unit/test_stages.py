"""Pipeline stages called directly on small batches, no cluster."""

import hashlib
import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from sdray.batch.stages import IMAGE_COLUMN, PIXELS_COLUMN, EncodeStage, GenerateStage, PrepareStage
from sdray.config import GenerationConfig, ModelConfig, OutputConfig
from sdray.images import encode_image, infotext, read_infotext

PARAMS = dict(
    prompt="a fox",
    negative_prompt="blurry",
    scheduler="euler_ancestral",
    guidance_scale=7.5,
    steps=20,
    seed=42,
    width=64,
    height=32,
    model="tiny",
)

GENERATION = GenerationConfig(width=64, height=64)  # as a job resolves it from the model


@pytest.fixture(scope="module")
def generate_stage(model_cache):
    return GenerateStage(ModelConfig(device="cpu"), model_name="tiny", batch_size=4)


def test_stages_chain_keeps_every_row_and_column(generate_stage):
    table = pa.table(
        {
            "id": ["a", "b", "c"],
            "prompt": ["a fox", None, "a cat"],
            "width": [64, 64, 128],
            "height": [64, 64, 64],
            "steps": [2, 2, 2],
            "extra": [1, 2, 3],
        }
    )
    prepared = PrepareStage(GENERATION)(table)
    generated = generate_stage(prepared)
    assert generated.column("status").to_pylist() == ["ok", "error", "ok"]
    assert generated.column("truncated").to_pylist() == [False, None, False]
    assert generated.column(PIXELS_COLUMN).to_pylist()[1] is None
    encoded = EncodeStage(OutputConfig())(generated)
    assert PIXELS_COLUMN not in encoded.column_names
    assert encoded.column("extra").to_pylist() == [1, 2, 3]
    images = encoded.column(IMAGE_COLUMN).to_pylist()
    digests = encoded.column("sha256").to_pylist()
    assert images[1] is None and digests[1] is None
    assert Image.open(io.BytesIO(images[2])).size == (128, 64)
    assert digests[0] == hashlib.sha256(images[0]).hexdigest()
    assert "Size: 64x64" in read_infotext(images[0])


def test_stage_names_missing_columns(generate_stage):
    with pytest.raises(ValueError, match="generate: missing input columns .*seed"):
        generate_stage(pa.table({"id": ["a"], "prompt": ["x"]}))


def test_engine_failure_becomes_an_error_row(generate_stage, monkeypatch):
    prepared = PrepareStage(GENERATION)(
        pa.table({"id": ["a", "b"], "prompt": ["x", "y"], "steps": [2, 2]})
    )

    def fail_on_b(requests):
        if any(r.id == "b" for r in requests):
            raise RuntimeError("CUDA out of memory (simulated)")
        return original(requests)

    original = generate_stage.engine.generate
    monkeypatch.setattr(generate_stage.engine, "generate", fail_on_b)
    out = generate_stage(prepared)
    assert out.column("status").to_pylist() == ["ok", "error"]
    assert "out of memory" in out.column("error").to_pylist()[1]


def test_a_failing_denoising_batch_keeps_the_batches_made_before_it(generate_stage, monkeypatch):
    """Rows of two sizes are two denoising batches in one call: the second raising costs the
    first nothing (it is generated once, not again row by row)."""
    prepared = PrepareStage(GENERATION)(
        pa.table(
            {
                "id": ["a", "b", "c", "d"],
                "prompt": ["w", "x", "y", "z"],
                "steps": [2, 2, 2, 2],
                "width": [64, 64, 128, 128],
            }
        )
    )
    calls: list[list[str]] = []

    def fail_on_wide(requests):
        calls.append([r.id for r in requests])
        if any(r.width == 128 for r in requests):
            raise RuntimeError("simulated failure")
        return original(requests)

    original = generate_stage.engine.generate
    monkeypatch.setattr(generate_stage.engine, "generate", fail_on_wide)
    out = generate_stage(prepared)
    assert out.column("status").to_pylist() == ["ok", "ok", "error", "error"]
    assert calls == [["a", "b"], ["c", "d"], ["c"], ["d"]]


def test_infotext_a1111_form():
    assert infotext(PARAMS) == (
        "a fox\nNegative prompt: blurry\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 64x32, Model: tiny"
    )
    assert "Negative prompt" not in infotext({**PARAMS, "negative_prompt": ""})


@pytest.mark.parametrize("image_format", ["png", "jpeg", "webp"])
def test_every_image_format_carries_its_parameters(image_format):
    pixels = np.random.default_rng(0).integers(0, 255, (32, 64, 3), dtype=np.uint8)
    data = encode_image(pixels, image_format, infotext(PARAMS))
    image = Image.open(io.BytesIO(data))
    assert image.size == (64, 32)
    assert image.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[image_format]
    assert read_infotext(data) == infotext(PARAMS)


def test_mostly_failing_run_is_aborted(model_cache, monkeypatch):
    """batch.max_error_fraction stops a model actor once too many of its rows failed."""
    from sdray.batch.stages import ErrorBudgetExceeded

    stage = GenerateStage(
        ModelConfig(device="cpu"),
        model_name="tiny",
        batch_size=4,
        max_error_fraction=0.5,
        min_rows_for_budget=4,
    )

    def always_fail(requests):
        raise RuntimeError("NaN everywhere (simulated)")

    monkeypatch.setattr(stage.engine, "generate", always_fail)
    prepared = PrepareStage(GENERATION)(pa.table({"prompt": ["a", "b"], "steps": [1, 1]}))
    out = stage(prepared)  # 2 of 2 failed, but fewer rows than the budget's minimum
    assert out.column("status").to_pylist() == ["error", "error"]
    with pytest.raises(ErrorBudgetExceeded, match="4 of 4 rows failed"):
        stage(prepared)


def test_device_fault_ends_the_actor_instead_of_failing_rows(generate_stage, monkeypatch):
    """A broken CUDA context is no row's fault: the actor exits so Ray retries the batch."""
    from sdray.batch import stages

    def cuda_fault(requests):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def exit_actor():
        raise SystemExit("actor exited")

    monkeypatch.setattr(generate_stage.engine, "generate", cuda_fault)
    monkeypatch.setattr(stages, "_exit_actor", exit_actor)
    prepared = PrepareStage(GENERATION)(pa.table({"prompt": ["a", "b"], "steps": [1, 1]}))
    with pytest.raises(SystemExit, match="actor exited"):
        generate_stage(prepared)


def test_overlapping_calls_take_turns_at_the_engine(generate_stage, monkeypatch):
    """With batch.overlap Ray Data runs two calls of one model actor at once: the second waits
    for the engine while the first holds it, then runs."""
    import threading

    prepared = PrepareStage(GENERATION)(pa.table({"id": ["a"], "prompt": ["x"], "steps": [1]}))
    entered = [threading.Event(), threading.Event()]
    release = threading.Event()
    calls = []
    original = generate_stage.engine.generate

    def held(requests):
        calls.append(threading.current_thread().name)
        entered[len(calls) - 1].set()
        if len(calls) == 1:
            assert release.wait(30)
        return original(requests)

    monkeypatch.setattr(generate_stage.engine, "generate", held)
    results = {}
    threads = [
        threading.Thread(
            target=lambda n=n: results.__setitem__(n, generate_stage(prepared)), name=f"t{n}"
        )
        for n in range(2)
    ]
    threads[0].start()
    assert entered[0].wait(30)
    threads[1].start()
    assert not entered[1].wait(1.0)  # the engine is busy: the second call waits its turn
    release.set()
    assert entered[1].wait(30)
    for thread in threads:
        thread.join(30)
    assert calls == ["t0", "t1"]
    assert [results[n].column("status").to_pylist() for n in range(2)] == [["ok"], ["ok"]]

"""The engine on the tiny model: determinism, batch invariance, schedulers, guidance, truncation."""

import numpy as np
import pytest

from sdray.requests import GenerationRequest
from sdray.schedulers import SCHEDULERS, build_scheduler


def request(i=0, **overrides):
    fields = dict(
        id=f"r{i}",
        prompt=f"a small red fox number {i}",
        negative_prompt="",
        seed=1000 + i,
        steps=3,
        guidance_scale=7.5,
        width=64,
        height=64,
        scheduler="ddim",
    )
    fields.update(overrides)
    return GenerationRequest(**fields)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_same_request_same_image(tiny_engine):
    a = tiny_engine.generate([request()])[0]
    b = tiny_engine.generate([request()])[0]
    assert a.error is None and a.image.shape == (64, 64, 3) and a.image.dtype == np.uint8
    np.testing.assert_array_equal(a.image, b.image)


def test_different_seeds_differ(tiny_engine):
    a, b = tiny_engine.generate([request(seed=1), request(seed=2)])
    assert psnr(a.image, b.image) < 40


@pytest.mark.parametrize("scheduler", ["ddim", "euler_ancestral"])
def test_batch_invariance(tiny_engine, scheduler):
    """What the README promises: a row's image is bit-identical in the same batch, and within
    one level of 255 per channel whichever rows share its batch, in whatever order (float32
    products sum in a batch-size-dependent order; the noise is the row's own)."""
    rows = [request(i, scheduler=scheduler) for i in range(4)]
    alone = [tiny_engine.generate([r])[0].image for r in rows]
    together = [r.image for r in tiny_engine.generate(rows)]
    again = [r.image for r in tiny_engine.generate(rows)]
    reordered = [r.image for r in tiny_engine.generate(rows[::-1])][::-1]
    for single, batched, repeated, shuffled in zip(alone, together, again, reordered, strict=True):
        np.testing.assert_array_equal(batched, repeated)
        assert np.abs(single.astype(np.int16) - batched).max() <= 1
        assert np.abs(single.astype(np.int16) - shuffled).max() <= 1


def test_mixed_requests_are_split_and_keep_their_parameters(tiny_engine):
    rows = [
        request(0, width=64, height=64),
        request(1, width=128, height=64),
        request(2, steps=2),
        request(3, scheduler="euler"),
        request(4, guidance_scale=1.0),
    ]
    results = tiny_engine.generate(rows)
    assert [r.request.id for r in results] == [r.id for r in rows]
    assert results[1].image.shape == (64, 128, 3)
    for row, result in zip(rows, results, strict=True):
        expected = tiny_engine.generate([row])[0].image
        assert psnr(expected, result.image) >= 40


def test_every_named_scheduler_runs_and_differs(tiny_engine):
    images = {}
    for name in SCHEDULERS:
        result = tiny_engine.generate([request(scheduler=name, steps=4)])[0]
        assert result.error is None, name
        images[name] = result.image
    assert psnr(images["ddim"], images["euler_ancestral"]) < 60


def test_scheduler_is_built_from_model_config(tiny_engine):
    scheduler = build_scheduler("dpmpp_2m", tiny_engine.scheduler_config)
    assert type(scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert scheduler.config.beta_schedule == tiny_engine.scheduler_config["beta_schedule"]
    with pytest.raises(KeyError):
        build_scheduler("warp_drive", tiny_engine.scheduler_config)


def test_negative_prompt_matters_only_with_guidance(tiny_engine):
    with_cfg = tiny_engine.generate(
        [request(negative_prompt=""), request(negative_prompt="blurry, dark")]
    )
    assert psnr(with_cfg[0].image, with_cfg[1].image) < 60
    no_cfg = tiny_engine.generate(
        [
            request(guidance_scale=1.0, negative_prompt=""),
            request(guidance_scale=1.0, negative_prompt="blurry, dark"),
        ]
    )
    np.testing.assert_array_equal(no_cfg[0].image, no_cfg[1].image)


def test_long_prompts_are_truncated_and_flagged(tiny_engine):
    long_prompt = "word " * 200
    short, long = tiny_engine.generate([request(prompt="a fox"), request(prompt=long_prompt)])
    assert short.truncated is False
    assert long.truncated is True and long.error is None
    assert tiny_engine.truncated(["a fox", long_prompt]) == [False, True]


def test_engine_matches_plain_diffusers_pipeline(tiny_engine):
    """Same model, prompts and per-row generators as StableDiffusionPipeline: same pixels."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=tiny_engine.vae,
        text_encoder=tiny_engine.text_encoder,
        tokenizer=tiny_engine.tokenizer,
        unet=tiny_engine.unet,
        scheduler=DDIMScheduler.from_config(tiny_engine.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    rows = [request(0, negative_prompt="blurry"), request(1)]
    expected = pipe(
        [r.prompt for r in rows],
        negative_prompt=[r.negative_prompt for r in rows],
        num_inference_steps=3,
        guidance_scale=7.5,
        height=64,
        width=64,
        generator=[torch.Generator().manual_seed(r.seed) for r in rows],
        output_type="np",
    ).images
    for want, got in zip(expected, tiny_engine.generate(rows), strict=True):
        assert psnr((want * 255).round().astype(np.uint8), got.image) >= 40

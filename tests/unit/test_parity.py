"""The engine's images equal diffusers' own pipelines for the same prompts, parameters and
per-row generators: SD (`tiny`) and SDXL (`tiny-xl`), every scheduler sdray offers, guidance on
and off, negative prompts empty and not, batches of 1 and 4."""

from __future__ import annotations

import numpy as np
import pytest

from sdray.requests import GenerationRequest
from sdray.schedulers import SCHEDULERS

PROMPTS = ["a red fox in the snow", "a lighthouse at dusk", "two cats", "a tiny blue robot"]
STEPS = 3
SIZE = 64
MIN_PSNR = 45.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module", params=["tiny", "tiny-xl"])
def model(request, model_cache):
    """(engine, diffusers pipeline) of one embedded model, each loaded from its own files."""
    import diffusers

    from sdray.config import ModelConfig
    from sdray.engine import DiffusionEngine

    engine = DiffusionEngine.from_config(ModelConfig(source=request.param, device="cpu"))
    if engine.plan.family == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(
            engine.files.directory, add_watermarker=False
        )
    else:
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(
            engine.files.directory, safety_checker=None, requires_safety_checker=False
        )
    pipe.set_progress_bar_config(disable=True)
    pipe.original_scheduler_config = pipe.scheduler.config
    return engine, pipe


def diffusers_images(pipe, scheduler, prompts, negative, guidance, seeds):
    """What a diffusers user writes: the scheduler swapped in from the model's own config."""
    import diffusers
    import torch

    spec = SCHEDULERS[scheduler]
    pipe.scheduler = getattr(diffusers, spec.class_name).from_config(
        pipe.original_scheduler_config, **spec.options
    )
    out = pipe(
        prompt=prompts,
        negative_prompt=[negative] * len(prompts) if negative else None,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        width=SIZE,
        height=SIZE,
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        output_type="np",
    ).images
    return (out * 255).round().astype(np.uint8)


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_engine_equals_diffusers(model, scheduler):
    engine, pipe = model
    worst = float("inf")
    cases = [(1.0, ""), (7.5, ""), (7.5, "blurry, low quality")]  # negatives unused without CFG
    for guidance, negative in cases:
        for batch in (1, 4):
            prompts, seeds = PROMPTS[:batch], [100 + i for i in range(batch)]
            requests = [
                GenerationRequest(
                    id=str(i),
                    prompt=p,
                    negative_prompt=negative,
                    seed=s,
                    steps=STEPS,
                    guidance_scale=guidance,
                    width=SIZE,
                    height=SIZE,
                    scheduler=scheduler,
                )
                for i, (p, s) in enumerate(zip(prompts, seeds, strict=True))
            ]
            ours = [r.image for r in engine.generate(requests)]
            theirs = diffusers_images(pipe, scheduler, prompts, negative, guidance, seeds)
            for a, b in zip(ours, theirs, strict=True):
                value = psnr(a, b)
                worst = min(worst, value)
                assert value >= MIN_PSNR, (guidance, negative, batch, value)
    print(f"{engine.plan.family} {scheduler}: worst PSNR {worst:.1f} dB")

"""Image-to-image and inpainting in the engine equal diffusers' own pipelines
(StableDiffusionImg2Img/Inpaint, StableDiffusionXLImg2Img/Inpaint), for 4-channel UNets (latent
blending) and 9-channel inpainting models; and per-step previews."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sdray.config import ModelConfig
from sdray.requests import GenerationRequest

SIZE = 64
STEPS = 4
MIN_PSNR = 45.0


def psnr(a, b) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def picture(i: int) -> Image.Image:
    """A starting picture drawn in code: a coloured background and a shape."""
    image = Image.new("RGB", (SIZE, SIZE), (40 + 50 * i, 90, 200 - 40 * i))
    draw = ImageDraw.Draw(image)
    draw.ellipse((12 + 4 * i, 14, 44 + 4 * i, 50), fill=(230, 210 - 60 * i, 30))
    return image


def mask(i: int) -> Image.Image:
    image = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(image).rectangle((8 + 8 * i, 16, 40 + 8 * i, 56), fill=255)
    return image


def inpainting_model(tmp_path_factory, source: str):
    """A copy of an embedded model whose UNet takes 9 channels (latents, mask, masked image)."""
    import diffusers
    import torch
    from diffusers import UNet2DConditionModel

    from sdray.models import resolve_model

    base = resolve_model(source).directory
    directory = tmp_path_factory.mktemp(f"{source}-inpaint") / "model"
    shutil.copytree(base, directory)
    config = dict(UNet2DConditionModel.load_config(base / "unet"))
    config["in_channels"] = 9
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(config).save_pretrained(directory / "unet")
    index = json.loads((directory / "model_index.json").read_text())
    name = index["_class_name"].replace("Pipeline", "InpaintPipeline")
    index = {"_diffusers_version": diffusers.__version__, **index, "_class_name": name}
    (directory / "model_index.json").write_text(json.dumps(index))
    return str(directory)


@pytest.fixture(scope="module", params=["tiny", "tiny-xl", "tiny-inpaint", "tiny-xl-inpaint"])
def model(request, tmp_path_factory, model_cache):
    from sdray.engine import DiffusionEngine

    source = request.param
    if source.endswith("-inpaint"):
        source = inpainting_model(tmp_path_factory, source.removesuffix("-inpaint"))
    return DiffusionEngine.from_config(ModelConfig(source=source, device="cpu"))


def reference(engine, kind: str):
    """diffusers' pipeline of this kind for the engine's model, loaded from its directory."""
    import diffusers

    xl = engine.plan.family == "sdxl"
    name = {"img2img": "Img2ImgPipeline", "inpaint": "InpaintPipeline"}[kind]
    cls = getattr(diffusers, ("StableDiffusionXL" if xl else "StableDiffusion") + name)
    extra = (
        {"add_watermarker": False}
        if xl
        else {"safety_checker": None, "requires_safety_checker": False}
    )
    base = diffusers.DiffusionPipeline.from_pretrained(engine.files.directory, **extra)
    pipe = cls.from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def rows(kind, scheduler, strength, negative=""):
    return [
        GenerationRequest(
            id=str(i),
            prompt=f"a painting number {i}",
            negative_prompt=negative,
            seed=50 + i,
            steps=STEPS,
            guidance_scale=5.0,
            width=SIZE,
            height=SIZE,
            scheduler=scheduler,
            init_image=np.asarray(picture(i)),
            mask_image=np.asarray(mask(i)) if kind == "inpaint" else None,
            strength=strength,
        )
        for i in range(2)
    ]


CASES = [
    ("img2img", "ddim", 0.6),
    ("img2img", "euler_ancestral", 0.75),
    ("img2img", "dpmpp_2m", 1.0),
    ("inpaint", "ddim", 0.6),
    ("inpaint", "euler_ancestral", 1.0),
    ("inpaint", "heun", 0.75),
]


@pytest.mark.parametrize("kind, scheduler, strength", CASES)
def test_engine_equals_diffusers(model, kind, scheduler, strength):
    import diffusers
    import torch

    from sdray.schedulers import SCHEDULERS

    if kind == "img2img" and model.plan.inpainting:
        pytest.skip("inpainting models inpaint")
    pipe = reference(model, kind)
    spec = SCHEDULERS[scheduler]
    pipe.scheduler = getattr(diffusers, spec.class_name).from_config(
        pipe.scheduler.config, **spec.options
    )
    batch = rows(kind, scheduler, strength, negative="blurry")
    images = {"image": [picture(i) for i in range(2)]}
    if kind == "inpaint":
        images.update(mask_image=[mask(i) for i in range(2)], width=SIZE, height=SIZE)
    theirs = pipe(
        prompt=[r.prompt for r in batch],
        negative_prompt=["blurry"] * 2,
        strength=strength,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        generator=[torch.Generator().manual_seed(r.seed) for r in batch],
        output_type="np",
        **images,
    ).images
    ours = model.generate(batch)
    for result, image in zip(ours, theirs, strict=True):
        assert result.error is None
        value = psnr(result.image, (image * 255).round().astype(np.uint8))
        assert value >= MIN_PSNR, (kind, scheduler, strength, value)


def test_a_row_keeps_its_image_whatever_its_batch(model):
    kind = "inpaint" if model.plan.inpainting else "img2img"
    batch = rows(kind, "euler_ancestral", 0.7)
    together = model.generate(batch)
    for row, result in zip(batch, together, strict=True):
        assert psnr(model.generate([row])[0].image, result.image) >= 45


def world_request(prompt, strength, mask_image=None, seed=3):
    """A row over a picture of the embedded model's own world: a red square in the top left
    corner on white (what its VAE gives back well)."""
    import random

    from sdray.quality import world

    scene = world.sample_scene(
        random.Random(seed),
        colour="red",
        shape="square",
        position="top left",
        size="large",
        background="white",
        held_out=None,
    )
    return GenerationRequest(
        id="w",
        prompt=prompt,
        negative_prompt="",
        seed=seed,
        steps=8,
        guidance_scale=7.5,
        width=SIZE,
        height=SIZE,
        scheduler="ddim",
        init_image=world.render(scene),
        mask_image=mask_image,
        strength=strength,
    )


def test_strength_sets_how_far_from_the_picture(model):
    """Low strength keeps the picture (red on white); full strength draws what the prompt asks
    (a blue circle) and leaves the picture far behind."""
    from sdray.quality.scorer import score

    if model.model_name != "tiny":
        pytest.skip("needs a model that draws what it is asked: the trained embedded model")
    prompt = "a blue circle in the bottom right corner"
    near, far = model.generate([world_request(prompt, 0.25), world_request(prompt, 1.0)])
    source = world_request(prompt, 1.0).init_image
    assert psnr(near.image, source) > psnr(far.image, source) + 5
    kept = score(near.image, "a red square on a white background")
    assert kept["colour"] and kept["background"], kept
    assert score(far.image, "a blue circle")["colour"]


def test_inpainting_keeps_the_picture_outside_the_mask(model):
    """4-channel UNets blend the re-noised picture back outside the mask at every step: with the
    right half masked, the left half (the red square) changes much less than when the same row
    runs unmasked, and less than the masked half. (The tiny VAE's decoder sees the whole 8x8
    latent, so even kept latents decode a little changed.)"""
    if model.model_name != "tiny":
        pytest.skip("needs a model that draws what it is asked: the trained embedded model")
    right = np.zeros((SIZE, SIZE), np.uint8)
    right[:, SIZE // 2 :] = 255
    prompt = "a blue circle on the right on a white background"
    masked, unmasked = model.generate(
        [world_request(prompt, 1.0, right), world_request(prompt, 1.0)]
    )
    source = world_request(prompt, 1.0).init_image.astype(float)

    def change(result, columns):  # whole latent cells, off the VAE borders
        return np.abs(result.image.astype(float) - source).mean(axis=2)[8:-8, columns].mean()

    left, right_half = slice(8, SIZE // 2 - 8), slice(SIZE // 2 + 8, SIZE - 8)
    kept, redrawn = change(masked, left), change(masked, right_half)
    assert kept < 0.7 * change(unmasked, left), (kept, change(unmasked, left))
    assert kept < redrawn, (kept, redrawn)


def test_previews_show_the_image_emerging(model):
    kind = "inpaint" if model.plan.inpainting else "txt2img"
    (row,) = rows(kind, "euler", 1.0)[:1]
    if kind == "txt2img":
        row = GenerationRequest(**{**row.__dict__, "init_image": None, "strength": None})
    row = GenerationRequest(**{**row.__dict__, "preview_at": (1, 2, STEPS)})
    seen = []
    (result,) = model.generate([row], on_preview=lambda i, step, image: seen.append((i, step)))
    assert seen == [(0, 1), (0, 2), (0, STEPS)]
    assert [step for step, _ in result.previews] == [1, 2, STEPS]
    first, last = result.previews[0][1], result.previews[-1][1]
    assert first.shape == last.shape == result.image.shape
    # The last estimate is the final image up to the last step's change; the first is far.
    assert psnr(last, result.image) > psnr(first, result.image)
    plain = GenerationRequest(**{**row.__dict__, "preview_at": ()})
    np.testing.assert_array_equal(model.generate([plain])[0].image, result.image)

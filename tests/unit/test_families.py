"""Model families: recognised from model_index.json, planned from configs in the driver (also at
full SD 1.5 / SDXL size, without weights), refused in one line when sdray cannot run them; SDXL's
own conditioning, per row, equal to diffusers'; the float16 VAE upcast."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sdray.config import GenerationConfig, ModelConfig
from sdray.errors import ConfigError, ModelError
from sdray.families import family_class, with_model_defaults
from sdray.models import plan_directory, resolve_model
from sdray.models.reference import PARAMETERS, build_modules, write_reference_model
from sdray.requests import GenerationRequest


def request(i=0, **fields):
    base = dict(
        id=f"r{i}",
        prompt=f"a blue square number {i}",
        negative_prompt="",
        seed=10 + i,
        steps=3,
        guidance_scale=6.0,
        width=64,
        height=64,
        scheduler="euler",
    )
    return GenerationRequest(**{**base, **fields})


def psnr(a, b) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def xl_engine(model_cache):
    from sdray.engine import DiffusionEngine

    return DiffusionEngine.from_config(ModelConfig(source="tiny-xl", device="cpu"))


def test_embedded_models_are_planned_by_family(model_cache):
    sd, xl = resolve_model("tiny").plan, resolve_model("tiny-xl").plan
    assert (sd.family, sd.class_name, sd.default_size) == (
        "sd",
        "StableDiffusionPipeline",
        (64, 64),  # the trained embedded model draws 64x64 pictures
    )
    assert (xl.family, xl.class_name, xl.default_size) == (
        "sdxl",
        "StableDiffusionXLPipeline",
        (96, 96),
    )
    assert xl.text_hidden_sizes == (16, 32) and xl.cross_attention_dim == 48
    assert xl.latent_shape(64, 96) == (4, 12, 8)


@pytest.mark.parametrize(
    "name, family, size, fp16_vae",
    [("sd15", "sd", 512, "float16"), ("sdxl", "sdxl", 1024, "float32")],
)
def test_full_size_architectures_are_planned_without_weights(
    tmp_path, name, family, size, fp16_vae
):
    """The published SD 1.5 / SDXL configs: the plan, and the family's conditioning driving the
    full-size UNet and VAE on the meta device (shapes only, no memory)."""
    import torch
    from transformers import CLIPTokenizer

    directory = write_reference_model(name, tmp_path / name)
    plan = plan_directory(directory, name)
    assert (plan.family, plan.default_size) == (family, (size, size))
    assert plan.latent_shape(size, size) == (4, size // 8, size // 8)
    assert plan.vae_dtype("float16") == fp16_vae and plan.vae_dtype("bfloat16") == "bfloat16"

    modules = build_modules(name)
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in modules.items()}
    assert counts == PARAMETERS[name]  # the published architectures, parameter for parameter
    folders = [k for k in modules if k.startswith("text_encoder")]
    tokenizers = [
        CLIPTokenizer.from_pretrained(directory / f.replace("text_encoder", "tokenizer"))
        for f in folders
    ]
    conditioner = family_class(family)(plan, tokenizers, [modules[f] for f in folders], "meta")
    rows = [request(i, width=size, height=size) for i in range(2)]
    conditioning = conditioner.condition(rows, guided=True)
    assert tuple(conditioning.embeds.shape) == (4, 77, plan.cross_attention_dim)
    latents = torch.empty((4, *plan.latent_shape(size, size)), device="meta")
    noise = modules["unet"](
        latents,
        torch.tensor(999),
        encoder_hidden_states=conditioning.embeds,
        **conditioning.unet_kwargs,
        return_dict=False,
    )[0]
    assert noise.shape == latents.shape
    assert tuple(modules["vae"].decode(noise[:1]).sample.shape) == (1, 3, size, size)


def _model_dir(tmp_path: Path, source: str, edit) -> Path:
    """A copy of an embedded model's configs and tokenizers (no weights), edited."""
    directory = tmp_path / "model"
    shutil.copytree(
        resolve_model(source).directory, directory, ignore=shutil.ignore_patterns("*.safetensors")
    )
    edit(directory)
    return directory


def _index(directory: Path, **changes):
    path = directory / "model_index.json"
    index = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps({k: v for k, v in index.items() if v is not ...}))


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda d: _index(d, _class_name="FluxPipeline"),
            "is a FluxPipeline, which sdray does not run",
        ),
        (
            lambda d: _index(d, _class_name="StableDiffusion3Pipeline"),
            "is a StableDiffusion3Pipeline, which sdray does not run",
        ),
        (lambda d: _index(d, _class_name="PixArtAlphaPipeline"), "is a PixArtAlphaPipeline"),
        (lambda d: _index(d, _class_name="KandinskyV22Pipeline"), "is a KandinskyV22Pipeline"),
        (
            lambda d: _index(
                d,
                _class_name="StableDiffusionXLImg2ImgPipeline",
                text_encoder=[None, None],
                tokenizer=[None, None],
                requires_aesthetics_score=True,
            ),
            "refiner-only SDXL StableDiffusionXLImg2ImgPipeline",
        ),
        (lambda d: (d / "model_index.json").unlink(), "has no model_index.json"),
        (lambda d: shutil.rmtree(d / "tokenizer_2"), r"\(SDXL\) is missing tokenizer_2/"),
        (
            lambda d: [(d / "tokenizer_2" / f).unlink() for f in ("merges.txt", "tokenizer.json")],
            "tokenizer_2/ is broken: it has neither vocab.json",
        ),
        (lambda d: shutil.rmtree(d / "text_encoder_2"), "is missing text_encoder_2/"),
    ],
    ids=[
        "flux",
        "sd3",
        "pixart",
        "kandinsky",
        "refiner",
        "no-index",
        "no-tokenizer_2",
        "broken-tokenizer_2",
        "no-text_encoder_2",
    ],
)
def test_models_sdray_cannot_run_are_refused_in_one_line(tmp_path, model_cache, edit, message):
    directory = _model_dir(tmp_path, "tiny-xl", edit)
    with pytest.raises(ModelError, match=message) as refused:
        plan_directory(directory, "my-model")
    assert "\n" not in str(refused.value)
    if "sdray does not run" in message:
        assert "SDXL (StableDiffusionXLPipeline" in str(refused.value)
        assert "SD 1.x/2.x (StableDiffusionPipeline" in str(refused.value)


def test_components_that_do_not_belong_together_are_refused(tmp_path, model_cache):
    def widen(directory: Path) -> None:
        path = directory / "unet" / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "addition_time_embed_dim": 4}))

    with pytest.raises(ModelError, match="added embedding of 56 inputs"):
        plan_directory(_model_dir(tmp_path, "tiny-xl", widen), "m")

    def other_encoder(directory: Path) -> None:
        path = directory / "text_encoder" / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "hidden_size": 24}))

    with pytest.raises(ModelError, match="the text encoders give 24 \\+ 32"):
        plan_directory(_model_dir(tmp_path / "b", "tiny-xl", other_encoder), "m")


def test_sdxl_micro_conditioning_equals_diffusers(xl_engine):
    """Per-row original size and crop, as diffusers' `original_size`/`crops_coords_top_left`."""
    import diffusers
    import torch

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(
        xl_engine.files.directory, add_watermarker=False
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    rows = [
        request(i, original_width=256, original_height=192, crop_top=16, crop_left=8)
        for i in range(2)
    ]
    theirs = pipe(
        prompt=[r.prompt for r in rows],
        num_inference_steps=3,
        guidance_scale=6.0,
        width=64,
        height=64,
        original_size=(192, 256),
        crops_coords_top_left=(16, 8),
        generator=[torch.Generator().manual_seed(r.seed) for r in rows],
        output_type="np",
    ).images
    ours = [r.image for r in xl_engine.generate(rows)]
    default = xl_engine.generate([request(0)])[0].image
    for a, b in zip(ours, theirs, strict=True):
        assert psnr(a, (b * 255).round().astype(np.uint8)) >= 45
    assert psnr(ours[0], default) < 40  # the conditioning reaches the UNet


def test_sdxl_rows_with_different_negatives_and_conditioning_share_a_batch(xl_engine):
    rows = [
        request(0),
        request(1, negative_prompt="blurry"),
        request(2, original_width=128, original_height=128),
        request(3, crop_top=8, negative_prompt="dark"),
    ]
    together = xl_engine.generate(rows)
    for row, result in zip(rows, together, strict=True):
        assert psnr(xl_engine.generate([row])[0].image, result.image) >= 45, row.id


def test_an_empty_sdxl_negative_prompt_is_zeros_not_the_empty_text(xl_engine):
    """force_zeros_for_empty_prompt, as in diffusers: "" conditions on zeros, not on encoding ""."""
    conditioning = xl_engine.family.condition([request(0)], guided=True)
    negative, positive = conditioning.embeds.chunk(2)
    assert not negative.any() and positive.abs().sum() > 0
    pooled = conditioning.unet_kwargs["added_cond_kwargs"]["text_embeds"]
    assert not pooled[0].any() and pooled[1].abs().sum() > 0


def test_a_float16_sdxl_vae_is_upcast_so_images_stay_finite(tmp_path, model_cache):
    """A VAE whose activations overflow float16 (as SDXL's does): decoded in float32 when its
    config asks for the upcast, NaN without it."""
    import torch
    from diffusers import AutoencoderKL

    from sdray.engine import DiffusionEngine

    def hot_vae(upcast: bool) -> str:
        directory = tmp_path / f"upcast-{upcast}"
        shutil.copytree(resolve_model("tiny-xl").directory, directory)
        vae = AutoencoderKL.from_pretrained(directory / "vae")
        with torch.no_grad():
            vae.decoder.conv_in.weight.mul_(3e5)  # float16 overflows above 65504
        vae.register_to_config(force_upcast=upcast)
        vae.save_pretrained(directory / "vae")
        return str(directory)

    rows = [request(0, steps=2)]
    upcast = DiffusionEngine.from_config(
        ModelConfig(source=hot_vae(True), device="cpu", dtype="float16")
    )
    assert upcast.unet.dtype == torch.float16 and upcast.vae.dtype == torch.float32
    assert upcast.generate(rows)[0].error is None
    plain = DiffusionEngine.from_config(
        ModelConfig(source=hot_vae(False), device="cpu", dtype="float16")
    )
    assert plain.vae.dtype == torch.float16
    assert "non-finite values" in plain.generate(rows)[0].error


def test_the_watermark_is_off_unless_asked_and_needs_its_package(model_cache):
    from diffusers.utils import is_invisible_watermark_available

    from sdray.engine import DiffusionEngine

    assert ModelConfig().watermark is False
    assert DiffusionEngine.from_config(ModelConfig(source="tiny-xl")).watermarker is None
    if not is_invisible_watermark_available():  # as on a fresh install: it is not pinned
        with pytest.raises(ModelError, match="needs the invisible-watermark package"):
            DiffusionEngine.from_config(ModelConfig(source="tiny-xl", watermark=True))


def test_unset_sizes_come_from_the_model_within_the_limits(model_cache):
    xl = resolve_model("tiny-xl").plan
    assert (
        with_model_defaults(GenerationConfig(), xl).width,
        with_model_defaults(GenerationConfig(), xl).height,
    ) == (96, 96)
    kept = with_model_defaults(GenerationConfig(width=64), xl)
    assert (kept.width, kept.height) == (64, 96)
    with pytest.raises(ConfigError, match="generation.width is unset, so the model's native 96"):
        with_model_defaults(GenerationConfig(max_width=64), xl)


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp_2m"])
def test_v_prediction_models_equal_diffusers(tmp_path, model_cache, scheduler):
    """SD 2.x 768-v style: the scheduler config's prediction_type, followed as diffusers does."""
    import diffusers
    import torch

    from sdray.engine import DiffusionEngine
    from sdray.schedulers import SCHEDULERS

    directory = tmp_path / "v-model"
    shutil.copytree(resolve_model("tiny").directory, directory)
    path = directory / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": "v_prediction"}))
    engine = DiffusionEngine.from_config(ModelConfig(source=str(directory), device="cpu"))
    assert engine.plan.prediction_type == "v_prediction"
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        directory, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    spec = SCHEDULERS[scheduler]
    pipe.scheduler = getattr(diffusers, spec.class_name).from_config(
        pipe.scheduler.config, **spec.options
    )
    rows = [request(i, scheduler=scheduler) for i in range(2)]
    theirs = pipe(
        prompt=[r.prompt for r in rows],
        num_inference_steps=3,
        guidance_scale=6.0,
        width=64,
        height=64,
        generator=[torch.Generator().manual_seed(r.seed) for r in rows],
        output_type="np",
    ).images
    for ours, image in zip(engine.generate(rows), theirs, strict=True):
        assert psnr(ours.image, (image * 255).round().astype(np.uint8)) >= 45

"""Speed levers on CPU: each gives the image it gives without it, within a stated PSNR.

Thresholds (tiny model, 64x64, 3 DDIM steps, against the same engine with the lever off):
- float32 kernel choices (attention backends, fused QKV, channels-last, slicing, compile):
  >= 60 dB. They only reorder float32 arithmetic; measured 86 dB to identical.
- precision: bfloat16 >= 35 dB (measured 39.7 with the trained embedded model, 46-47 with random
  weights), float16 >= 50 dB (measured 58).
- VAE tiling, at 256x256 (tiles of the tiny VAE's 64 px): >= 15 dB (measured 19; 35 with the
  earlier random-weight model's 128 px tiles): tiles are blended where they overlap, which is
  what lets 2048x2048 decode in bounded memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sdray.config import ModelConfig
from sdray.engine import DiffusionEngine
from sdray.errors import ConfigError, ModelError
from sdray.requests import GenerationRequest

from .test_engine import psnr


def request(i: int = 0, size: int = 64, **overrides) -> GenerationRequest:
    fields = dict(
        id=f"r{i}",
        prompt=f"a small red fox number {i}",
        negative_prompt="",
        seed=1000 + i,
        steps=3,
        guidance_scale=7.5,
        width=size,
        height=size,
        scheduler="ddim",
    )
    fields.update(overrides)
    return GenerationRequest(**fields)


ROWS = [request(0), request(1)]


def engine(**levers) -> DiffusionEngine:
    return DiffusionEngine.from_config(ModelConfig(source="tiny", **levers), max_batch_size=4)


@pytest.fixture(scope="module")
def reference(tiny_engine):
    """The lever-off images."""
    return [r.image for r in tiny_engine.generate(ROWS)]


@pytest.mark.parametrize(
    ("levers", "min_psnr"),
    [
        ({"attention": "classic"}, 60),
        ({"attention": "math"}, 60),
        ({"attention": "flash"}, 60),
        ({"fused_qkv": True}, 60),
        ({"fused_qkv": True, "attention": "math"}, 60),
        ({"channels_last": True}, 60),
        ({"vae_slicing": True}, 60),
        ({"dtype": "bfloat16"}, 35),
        ({"dtype": "float16"}, 50),
    ],
    ids=lambda value: (
        "-".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else None
    ),
)
def test_lever_keeps_the_image(reference, levers, min_psnr):
    fast = engine(**levers)
    images = [r.image for r in fast.generate(ROWS)]
    for slow, quick in zip(reference, images, strict=True):
        assert psnr(slow, quick) >= min_psnr, levers


def test_levers_reach_the_modules():
    from diffusers.models.attention_processor import AttnProcessor, FusedAttnProcessor2_0

    from sdray.levers import SDPABackend

    classic = engine(attention="classic")
    assert {type(p) for p in classic.unet.attn_processors.values()} == {AttnProcessor}
    assert {type(p) for p in classic.vae.attn_processors.values()} == {AttnProcessor}
    fused = engine(fused_qkv=True, attention="math", channels_last=True, vae_slicing=True)
    processors = list(fused.unet.attn_processors.values())
    assert all(isinstance(p, SDPABackend) and p.backend == "math" for p in processors)
    assert all(isinstance(p.processor, FusedAttnProcessor2_0) for p in processors)
    conv = fused.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=__import__("torch").channels_last)
    assert fused.vae.use_slicing and not fused.vae.use_tiling


def test_vae_tiling_bounds_what_the_decoder_sees(tiny_engine):
    """With tiling, a large image reaches the VAE decoder only as tiles of the VAE's own
    size, so peak memory no longer grows with the image (2048x2048 on a GPU: see the README)."""
    big = [request(5, size=256)]
    tiled = engine(vae_tiling=True)
    seen = []
    tiled.vae.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    image = tiled.generate(big)[0].image
    tile = tiled.vae.tile_latent_min_size
    assert seen and all(shape[-1] <= tile and shape[-2] <= tile for shape in seen)
    assert len(seen) >= 4  # 256 px of latents 32 wide, in tiles of 16 with overlap
    # Tiles blend where they overlap; the embedded model's decoder sees its whole 8x8-latent
    # tile, so the blend shows more than a real model's would (measured 19 dB here).
    assert psnr(tiny_engine.generate(big)[0].image, image) >= 15
    # Images within one tile decode exactly as without tiling.
    small = tiled.generate(ROWS[:1])[0].image
    assert psnr(tiny_engine.generate(ROWS[:1])[0].image, small) == float("inf")


def test_bad_lever_settings_are_refused_naming_them():
    from sdray.config import config_from_dict

    with pytest.raises(ConfigError, match="fused_qkv needs an SDPA attention"):
        config_from_dict({"model": {"fused_qkv": True, "attention": "classic"}})
    with pytest.raises(ConfigError, match="model.attention = 'xformers'"):
        config_from_dict({"model": {"attention": "xformers"}})
    with pytest.raises(ConfigError, match="size '64x60'"):
        config_from_dict({"model": {"compile": {"sizes": ["64x60"]}}})
    with pytest.raises(ConfigError, match="unknown config key 'model.compile.fullgraph'"):
        config_from_dict({"model": {"compile": {"fullgraph": True}}})
    with pytest.raises(ModelError, match="attention='efficient' is a CUDA kernel"):
        engine(attention="efficient")


def test_pixel_levers_are_fingerprinted_and_slicing_is_not():
    from sdray.batch.job import fingerprint, fingerprint_parts
    from sdray.config import config_from_dict

    model = {"sha256": "x", "family": "sd"}

    def print_of(**levers):
        return fingerprint(fingerprint_parts(config_from_dict({"model": levers}), model))

    base = print_of()
    assert print_of(vae_slicing=True) == base
    assert print_of(compile={"batch_sizes": [1, 2]}) == base  # buckets: no compile, no change
    for levers in (
        {"attention": "classic"},
        {"fused_qkv": True},
        {"channels_last": True},
        {"vae_tiling": True},
        {"compile": {"unet": True}},
        {"dtype": "bfloat16"},
    ):
        assert print_of(**levers) != base, levers


def test_a_resume_with_another_pixel_lever_is_refused_naming_it():
    from sdray.batch.job import _check_resumable, fingerprint_parts
    from sdray.config import config_from_dict
    from sdray.errors import SdrayError

    model = {"sha256": "m", "family": "sd"}
    before = fingerprint_parts(config_from_dict({"model": {"device": "cpu"}}), model)
    previous = {"fingerprint_parts": before, "config": {"model": {"device": "cpu"}}}
    same = config_from_dict({"model": {"device": "cpu", "vae_slicing": True}})
    _check_resumable(previous, fingerprint_parts(same, model), "out")  # slicing may change
    tiled = config_from_dict({"model": {"device": "cpu", "vae_tiling": True}})
    with pytest.raises(SdrayError, match="levers.vae_tiling: False -> True"):
        _check_resumable(previous, fingerprint_parts(tiled, model), "out")
    # An output written before the levers existed records none: it resumes.
    old = {k: v for k, v in before.items() if k != "levers"}
    _check_resumable({**previous, "fingerprint_parts": old}, fingerprint_parts(tiled, model), "o")


# --- torch.compile: one engine, compiled for batches of up to 2 images at 64x64 -------------

COMPILE = {"unet": True, "vae": True, "batch_sizes": [2], "sizes": ["64x64"]}


# Compiling takes a minute of CPU per graph here (Inductor's C++ kernels); allow for a busy machine.
COMPILE_TIMEOUT = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    cache = tmp_path_factory.mktemp("compile-cache")
    fast = engine(compile={**COMPILE, "cache_dir": str(cache)}, vae_slicing=True)
    return fast, cache


@COMPILE_TIMEOUT
def test_compiled_engine_warms_up_at_load_and_never_recompiles(compiled, tiny_engine):
    """The declared shapes are compiled while the engine loads; afterwards batch sizes (padded
    to the bucket) and schedulers (int or float timesteps) reuse them, and an undeclared size
    runs uncompiled instead of recompiling."""
    import torch

    fast, _ = compiled
    assert fast.levers["compiled_shapes"] == ["2x64x64"] and fast.levers["compile_s"] > 0
    previous = torch._dynamo.config.error_on_recompile
    torch._dynamo.config.error_on_recompile = True  # any recompilation raises
    try:
        for scheduler in ("ddim", "euler"):
            rows = [request(i, scheduler=scheduler) for i in range(2)]
            expected = [r.image for r in tiny_engine.generate(rows)]
            pair = [r.image for r in fast.generate(rows)]
            alone = fast.generate(rows[:1])[0].image
            for slow, quick in zip(expected, pair, strict=True):
                assert psnr(slow, quick) >= 60, scheduler
            assert psnr(expected[0], alone) >= 60, scheduler
        assert fast.unet.eager_calls == 0 and fast.vae.decoder.eager_calls == 0
        odd = request(7, size=96)
        image = fast.generate([odd])[0].image
    finally:
        torch._dynamo.config.error_on_recompile = previous
    assert fast.unet.eager_calls == odd.steps and fast.vae.decoder.eager_calls == 1
    assert psnr(tiny_engine.generate([odd])[0].image, image) >= 60


@COMPILE_TIMEOUT
def test_a_second_process_loads_compiled_code_from_the_cache(compiled):
    """What the first engine compiled is on disk: a new process (the next actor or replica)
    finds every graph in the cache and compiles none."""
    _, cache = compiled
    script = (
        "import json, sys\n"
        "from torch._dynamo.utils import counters\n"
        "from sdray.config import ModelConfig\n"
        "from sdray.engine import DiffusionEngine\n"
        "config = ModelConfig(source='tiny', vae_slicing=True, compile=json.loads(sys.argv[1]))\n"
        "engine = DiffusionEngine.from_config(config, max_batch_size=4)\n"
        "print(json.dumps({**dict(counters['inductor']), **engine.levers}))\n"
    )
    settings = json.dumps({**COMPILE, "cache_dir": str(cache)})
    done = subprocess.run(
        [sys.executable, "-c", script, settings],
        capture_output=True,
        text=True,
        timeout=1500,
        env=dict(os.environ),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures.get("fxgraph_cache_hit", 0) >= 2, figures  # the UNet's graph and the VAE's
    assert figures.get("fxgraph_cache_miss", 0) == 0, figures
    print(f"second process: warm-up {figures['compile_s']:.1f}s from the cache")

"""Speed levers, applied to a loaded engine's UNet and VAE (`model.*` in the config).

Precision is the engine's `model.dtype` (the family decides the VAE's upcast). Here: the
attention kernel, fused QKV projections, channels-last weights, VAE slicing and tiling, and
`torch.compile` of the UNet and VAE decoder with a compile cache and declared shapes:

- every declared (batch bucket, image size) is compiled while the model loads (the warm-up), so
  no request ever waits on a compiler; compiled code lands in `model.compile.cache_dir`, so
  the next actor or replica on the node loads it instead of compiling;
- a call pads its rows up to the next declared bucket (copies of its last row, dropped from
  the output: rows never mix in a UNet or VAE), so batch sizes never recompile; image sizes
  that were not declared run uncompiled rather than recompile (`eager_calls` counts them).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from sdray.config import ModelConfig, parse_size
from sdray.errors import ModelError

log = logging.getLogger(__name__)

# SDPA backends by the name `model.attention` gives them.
SDPA_BACKENDS = {
    "math": "MATH",
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
}
CUDA_ONLY = ("efficient", "cudnn")


def apply_levers(engine, model: ModelConfig) -> dict[str, Any]:
    """Apply `model`'s levers to `engine` (its UNet and VAE, in place; compiling wraps them),
    warm up the compiled shapes, and return what was done, with the compile time."""
    unet, vae = engine.unet, engine.vae
    if model.attention in CUDA_ONLY and engine.device != "cuda":
        raise ModelError(
            f"model.attention={model.attention!r} is a CUDA kernel; on {engine.device} use "
            "sdpa, math, flash or classic"
        )
    if model.fused_qkv:
        unet.fuse_qkv_projections()
        vae.fuse_qkv_projections()
    set_attention(unet, model.attention)
    # The VAE's one 512-wide attention head is beyond flash attention's head size: it keeps
    # SDPA's own choice unless the whole model runs the classic kernel.
    set_attention(vae, "classic" if model.attention == "classic" else "sdpa")
    if model.channels_last:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    if model.vae_slicing:
        vae.enable_slicing()
    if model.vae_tiling:
        vae.enable_tiling()
    report: dict[str, Any] = {"compile_s": None, "compiled_shapes": []}
    if model.compile.unet or model.compile.vae:
        report.update(compile_engine(engine, model))
    return report


class SDPABackend:
    """An attention processor run with PyTorch's SDPA held to one backend."""

    def __init__(self, processor, backend: str) -> None:
        self.processor = processor
        self.backend = backend

    def __call__(self, attn, hidden_states, *args, **kwargs):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[self.backend])):
            return self.processor(attn, hidden_states, *args, **kwargs)


def set_attention(module, attention: str) -> None:
    """Set the attention kernel of every attention layer of a diffusers model."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if attention == "classic":
        module.set_attn_processor(AttnProcessor())
        return
    fused = any("Fused" in type(p).__name__ for p in module.attn_processors.values())
    if not fused:
        module.set_attn_processor(AttnProcessor2_0())
    if attention in SDPA_BACKENDS:
        module.set_attn_processor(
            {name: SDPABackend(p, attention) for name, p in module.attn_processors.items()}
        )


def compile_cache_dir(model: ModelConfig) -> Path:
    """Where compiled code is cached: `model.compile.cache_dir`, else beside the models."""
    from sdray.models import cache_root

    if model.compile.cache_dir:
        return Path(model.compile.cache_dir)
    return cache_root(model.cache_dir) / "torch-compile" / torch.__version__


def batch_buckets(model: ModelConfig, max_batch_size: int) -> list[int]:
    """Declared images-per-call buckets: the config's, else powers of two up to the maximum."""
    if model.compile.batch_sizes:
        return sorted(set(model.compile.batch_sizes))
    buckets, size = [], 1
    while size < max_batch_size:
        buckets.append(size)
        size *= 2
    return [*buckets, max_batch_size]


def compile_engine(engine, model: ModelConfig) -> dict[str, Any]:
    """Compile the UNet and/or VAE decoder for the declared shapes and warm them up."""
    cache = compile_cache_dir(model)
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    torch._inductor.config.fx_graph_cache = True

    buckets = batch_buckets(model, engine.max_batch_size)
    sizes = [parse_size(s) for s in model.compile.sizes or []] or [engine.plan.default_size]
    factor = engine.vae_scale_factor
    latents = {(h // factor, w // factor) for w, h in sizes}
    guidable = engine.unet.config.time_cond_proj_dim is None
    shapes = len(buckets) * len(sizes)
    # One graph per shape (static shapes compile the fastest kernels); leave room for them all.
    torch._dynamo.config.recompile_limit = max(8, 2 * shapes + 4)
    torch._dynamo.config.accumulated_recompile_limit = max(256, 8 * shapes)

    if model.compile.unet:
        rows = [b * (2 if guidable else 1) for b in buckets]
        engine.unet = CompiledShapes(
            engine.unet, rows=rows, spatial=latents, mode=model.compile.mode, timestep=True
        )
    if model.compile.vae:
        vae = engine.vae
        spatial = set(latents)
        if vae.use_tiling:
            spatial.add((vae.tile_latent_min_size, vae.tile_latent_min_size))
        vae.decoder = CompiledShapes(
            vae.decoder,
            rows=[1] if vae.use_slicing else buckets,
            spatial=spatial,
            mode=model.compile.mode,
        )
    started = time.perf_counter()
    warm_up(engine, buckets, sizes)
    seconds = time.perf_counter() - started
    log.info("compiled %d shapes in %.1fs (cache %s)", shapes, seconds, cache)
    return {
        "compile_s": round(seconds, 3),
        "compiled_shapes": [f"{b}x{w}x{h}" for b in buckets for w, h in sizes],
        "compile_cache_dir": str(cache),
    }


def warm_up(engine, buckets: list[int], sizes: list[tuple[int, int]]) -> None:
    """One one-step generation per declared (bucket, size): every compiled shape is compiled
    (or loaded from the cache) now, while the model loads."""
    from sdray.requests import GenerationRequest

    for width, height in sizes:
        for bucket in buckets:
            probe = GenerationRequest(
                id="warm-up",
                prompt="warm up",
                negative_prompt="",
                seed=0,
                steps=1,
                guidance_scale=7.5,
                width=width,
                height=height,
                scheduler="ddim",
            )
            engine.generate([probe] * bucket)


class CompiledShapes(torch.nn.Module):
    """A module compiled once per declared shape: rows padded up to the next bucket,
    declared spatial sizes compiled, other sizes run eagerly (counted, never recompiled).
    Attributes it does not have (`config`, `dtype`, ...) are the wrapped module's."""

    def __init__(self, module, *, rows, spatial, mode: str, timestep: bool = False):
        super().__init__()
        self.inner = module
        self.rows = sorted(set(rows))
        self.spatial = set(spatial)
        self.timestep = timestep
        self.eager_calls = 0
        # Not registered as a submodule: it shares the wrapped module's parameters.
        object.__setattr__(self, "compiled", torch.compile(module, mode=mode, dynamic=False))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)

    def forward(self, sample, *args, **kwargs):
        from torch.utils._pytree import tree_map

        rows = sample.shape[0]
        bucket = next((b for b in self.rows if b >= rows), None)
        if bucket is None or tuple(sample.shape[-2:]) not in self.spatial:
            self.eager_calls += 1
            return self.inner(sample, *args, **kwargs)
        if self.timestep:
            # One timestep form for every scheduler (int or float, 0-d or per row): the
            # UNet takes float32 timesteps anyway, so this changes no value.
            timestep = torch.as_tensor(args[0], device=sample.device)
            args = (timestep.to(torch.float32).expand(rows), *args[1:])

        def pad(value):
            # Padded or not, contiguous: strides are guarded too, and must never differ.
            if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == rows:
                extra = value[-1:].expand(bucket - rows, *value.shape[1:])
                return torch.cat([value, extra]) if bucket > rows else value.contiguous()
            return value

        def crop(value):
            if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == bucket:
                return value[:rows]
            return value

        output = self.compiled(pad(sample), *tree_map(pad, args), **tree_map(pad, kwargs))
        return tree_map(crop, output)

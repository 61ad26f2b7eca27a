"""DiffusionEngine: load a Stable Diffusion-family model once, then turn requests into images.

The only module that runs torch and diffusers in the hot path; what differs between families
(prompt encoding, extra UNet conditioning) is the family's (`sdray.families`). It knows nothing
of Ray: batch actors and Serve replicas each hold one engine.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdray.config import ModelConfig
from sdray.errors import ModelError
from sdray.families import SDXL, family_class
from sdray.models import ModelFiles, load_denoiser, model_hash, quiet_libraries, resolve_model
from sdray.requests import GenerationRequest
from sdray.schedulers import build_scheduler


@dataclass
class GenerationResult:
    """One request's outcome: an HxWx3 uint8 image, or an error message."""

    request: GenerationRequest
    image: np.ndarray | None
    truncated: bool = False
    error: str | None = None


# Messages of errors after which the device cannot be trusted (a CUDA context does not recover
# from an illegal memory access or a device-side assert): the process holding it must go.
_DEVICE_FAULT_MARKERS = (
    "CUDA error",
    "CUBLAS_STATUS",
    "CUDNN_STATUS",
    "cuDNN error",
    "device-side assert",
)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is torch's device out-of-memory error (without importing torch)."""
    oom = getattr(sys.modules.get("torch"), "OutOfMemoryError", None)
    return oom is not None and isinstance(error, oom)


def is_device_fault(error: BaseException) -> bool:
    """Whether `error` leaves the device unusable (an accelerator fault, not a bad request)."""
    if is_out_of_memory(error):
        return False
    accelerator_error = getattr(sys.modules.get("torch"), "AcceleratorError", None)
    if accelerator_error is not None and isinstance(error, accelerator_error):
        return True
    return any(marker in str(error) for marker in _DEVICE_FAULT_MARKERS)


def free_device_memory() -> None:
    """Return cached device memory after an out-of-memory error, so smaller calls can fit."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def resolve_device(device: str, dtype: str) -> tuple[str, str]:
    """Pick the concrete torch device and dtype for `auto` settings."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "float16" if device == "cuda" else "float32"
    return device, dtype


def group_compatible(requests: Sequence[GenerationRequest], max_batch_size: int) -> list[list[int]]:
    """Indices of requests split into batches that share size, steps, scheduler and guidance."""
    groups: dict[tuple, list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(request.batch_key(), []).append(index)
    batches = []
    for indices in groups.values():
        for start in range(0, len(indices), max_batch_size):
            batches.append(indices[start : start + max_batch_size])
    return batches


class DiffusionEngine:
    """A model's text conditioning (its family's), UNet with per-row schedulers, and VAE decoder
    on one device. `generate` reads as diffusers' pipelines do, in numbered steps, written once
    for every family."""

    def __init__(
        self,
        files: ModelFiles,
        *,
        device: str = "auto",
        dtype: str = "auto",
        allow_pickle: bool = False,
        max_batch_size: int = 8,
        torch_threads: int | None = None,
        watermark: bool = False,
        levers: ModelConfig | None = None,
    ) -> None:
        import torch

        from sdray.levers import apply_levers

        started = time.perf_counter()
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device, self.dtype = resolve_device(device, dtype)
        self.files = files
        self.plan = files.plan
        self.model_name = files.name
        self.max_batch_size = max_batch_size
        quiet_libraries()
        self.family = family_class(self.plan.family).load(
            files.directory,
            self.plan,
            device=self.device,
            dtype=getattr(torch, self.dtype),
            use_safetensors=None if allow_pickle else True,
        )
        self.unet, self.vae, self.scheduler_config = load_denoiser(
            files, device=self.device, dtype=self.dtype, allow_pickle=allow_pickle
        )
        self.vae_scale_factor = self.plan.vae_scale_factor
        self.watermarker = _watermarker() if watermark and self.plan.family == SDXL else None
        # Speed levers (attention, fused QKV, channels-last, VAE slicing/tiling, compile and
        # its warm-up) from `levers` (a ModelConfig); `model.dtype` was applied above.
        self.levers = apply_levers(self, levers) if levers is not None else {}
        self.load_seconds = time.perf_counter() - started

    @classmethod
    def from_config(
        cls,
        config: ModelConfig,
        *,
        max_batch_size: int = 8,
        torch_threads: int | None = None,
        storage_options: dict[str, Any] | None = None,
        expected_sha256: str | None = None,
    ) -> DiffusionEngine:
        """Resolve `model.source` (building or copying it if needed) and load it.

        `expected_sha256` refuses a model whose identity is no longer the one given.
        """
        files = resolve_model(
            config.source,
            cache_dir=config.cache_dir,
            allow_pickle=config.allow_pickle,
            storage_options=storage_options,
            expected_sha256=expected_sha256,
        )
        return cls(
            files,
            device=config.device,
            dtype=config.dtype,
            allow_pickle=config.allow_pickle,
            max_batch_size=max_batch_size,
            torch_threads=torch_threads,
            watermark=config.watermark,
            levers=config,
        )

    @property
    def tokenizer(self):
        """The (first) tokenizer."""
        return self.family.tokenizers[0]

    @property
    def text_encoder(self):
        """The (first) text encoder."""
        return self.family.text_encoders[0]

    def model_hash(self) -> str:
        """sha256 of the model's files (its identity in manifests and fingerprints)."""
        return model_hash(self.files.directory)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Generate one image per request, in compatible sub-batches; results keep input order."""
        results: list[GenerationResult | None] = [None] * len(requests)
        for indices in group_compatible(requests, self.max_batch_size):
            batch = [requests[i] for i in indices]
            for index, result in zip(indices, self._generate_batch(batch), strict=True):
                results[index] = result
        return results  # type: ignore[return-value]

    def truncated(self, prompts: list[str]) -> list[bool]:
        """Whether each prompt is longer than the text encoders' context (and so cut)."""
        return self.family.truncated(prompts)

    def _generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        import torch

        first = requests[0]
        guidance = first.guidance_scale
        guided = guidance > 1.0 and self.unet.config.time_cond_proj_dim is None

        with torch.inference_mode():
            # 1. Conditioning, by the model's family; with guidance the negative half goes first.
            conditioning = self.family.condition(requests, guided)
            truncated = self.family.truncated([r.prompt for r in requests])

            # 2. Timesteps from a fresh scheduler of the row's kind, built from the model's config.
            scheduler = build_scheduler(first.scheduler, self.scheduler_config)
            scheduler.set_timesteps(first.steps, device=self.device)
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(0)

            # 3. Starting latents: one CPU generator per row, so a row's image never depends on
            #    its batch. The same generators feed stochastic schedulers' noise.
            generators = [torch.Generator("cpu").manual_seed(r.seed) for r in requests]
            shape = (
                1,
                self.unet.config.in_channels,
                *self.plan.latent_shape(first.width, first.height)[1:],
            )
            latents = torch.cat(
                [torch.randn(shape, generator=g, dtype=self.unet.dtype) for g in generators]
            )
            latents = latents.to(self.device) * scheduler.init_noise_sigma

            # 4. Denoising loop, classifier-free guidance as one doubled batch.
            step_kwargs = {"generator": generators} if _accepts(scheduler.step, "generator") else {}
            if _accepts(scheduler.step, "eta"):
                step_kwargs["eta"] = 0.0
            for t in scheduler.timesteps:
                model_input = torch.cat([latents] * 2) if guided else latents
                model_input = scheduler.scale_model_input(model_input, t)
                noise = self.unet(
                    model_input,
                    t,
                    encoder_hidden_states=conditioning.embeds,
                    **conditioning.unet_kwargs,
                    return_dict=False,
                )[0]
                if guided:
                    noise_uncond, noise_text = noise.chunk(2)
                    noise = noise_uncond + guidance * (noise_text - noise_uncond)
                latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]

            # 5. Decode with the VAE and convert to uint8 pixels.
            images = self._decode(latents)
            finite = torch.isfinite(images.flatten(1)).all(dim=1).tolist()
            pixels = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
            pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()

        results = []
        for request, image, ok, cut in zip(requests, pixels, finite, truncated, strict=True):
            if ok:
                results.append(GenerationResult(request, np.ascontiguousarray(image), cut))
            else:
                results.append(
                    GenerationResult(
                        request,
                        None,
                        cut,
                        f"non-finite values in the generated image (dtype {self.dtype}); "
                        "try model.dtype=float32",
                    )
                )
        return results

    def _decode(self, latents):
        """Latents to images in [-1, 1] with the VAE (in its own dtype: float32 where the
        family upcasts), undoing the latent scaling, then the watermark if asked for."""
        import torch

        config = self.vae.config
        latents = latents.to(self.vae.dtype)
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            view = (1, -1, 1, 1)
            mean = torch.tensor(mean).view(view).to(latents)
            std = torch.tensor(std).view(view).to(latents)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        images = self.vae.decode(latents, return_dict=False)[0]
        if self.watermarker is not None:
            images = self.watermarker.apply_watermark(images)
        return images


def _watermarker():
    """diffusers' SDXL invisible watermark (model.watermark), which needs its own package."""
    from diffusers.utils import is_invisible_watermark_available

    if not is_invisible_watermark_available():
        raise ModelError(
            "model.watermark=true needs the invisible-watermark package (pip install "
            "invisible-watermark), which is not installed here"
        )
    from diffusers.pipelines.stable_diffusion_xl.watermark import StableDiffusionXLWatermarker

    return StableDiffusionXLWatermarker()


def _accepts(function, name: str) -> bool:
    import inspect

    return name in inspect.signature(function).parameters

"""DiffusionEngine: load a Stable Diffusion-family model once, then turn requests into images.

The only module that runs torch and diffusers in the hot path; what differs between families
(prompt encoding, extra UNet conditioning) is the family's (`sdray.families`). It knows nothing
of Ray: batch actors and Serve replicas each hold one engine.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sdray.config import ModelConfig
from sdray.errors import ModelError
from sdray.families import SDXL, family_class
from sdray.models import ModelFiles, load_denoiser, model_hash, quiet_libraries, resolve_model
from sdray.requests import GenerationRequest, denoising_start
from sdray.schedulers import build_scheduler


@dataclass
class GenerationResult:
    """One request's outcome: an HxWx3 uint8 image, or an error message; and the previews it
    asked for, (step, HxWx3 uint8 image) each."""

    request: GenerationRequest
    image: np.ndarray | None
    truncated: bool = False
    error: str | None = None
    previews: list[tuple[int, np.ndarray]] = field(default_factory=list)


# Called from the engine's thread as each preview is decoded: (request index, step, pixels).
PreviewCallback = Callable[[int, int, np.ndarray], None]


@dataclass
class _Start:
    """Where denoising starts for a batch (step 3 of `_generate_batch`)."""

    latents: Any
    noise: Any = None  # the starting noise (inpainting blends re-noised image latents with it)
    image_latents: Any = None  # the init images' latents (img2img, 4-channel inpainting)
    mask: Any = None  # inpainting: the mask at latent size, 1 = repaint
    masked_image_latents: Any = None  # 9-channel inpainting models' extra input


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
        self.allow_pickle = allow_pickle
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
        return model_hash(
            self.files.directory, family=self.plan.family, allow_pickle=self.allow_pickle
        )

    def generate(
        self, requests: Sequence[GenerationRequest], on_preview: PreviewCallback | None = None
    ) -> list[GenerationResult]:
        """Generate one image per request, in compatible sub-batches; results keep input order.

        `on_preview(index, step, pixels)` receives each preview a request asked for
        (`preview_at`) as soon as it is decoded, `index` being the request's position here.
        """
        results: list[GenerationResult | None] = [None] * len(requests)
        for indices in group_compatible(requests, self.max_batch_size):
            batch = [requests[i] for i in indices]
            relay = None
            if on_preview is not None:
                relay = lambda row, step, pixels, at=indices: on_preview(at[row], step, pixels)  # noqa: E731
            for index, result in zip(indices, self._generate_batch(batch, relay), strict=True):
                results[index] = result
        return results  # type: ignore[return-value]

    def truncated(self, prompts: list[str]) -> list[bool]:
        """Whether each prompt is longer than the text encoders' context (and so cut)."""
        return self.family.truncated(prompts)

    def _generate_batch(
        self, requests: list[GenerationRequest], on_preview: PreviewCallback | None = None
    ) -> list[GenerationResult]:
        import torch

        first = requests[0]
        guidance = first.guidance_scale
        guided = guidance > 1.0 and self.unet.config.time_cond_proj_dim is None
        previews: list[list[tuple[int, np.ndarray]]] = [[] for _ in requests]

        with torch.inference_mode():
            # 1. Conditioning, by the model's family; with guidance the negative half goes first.
            conditioning = self.family.condition(requests, guided)
            truncated = self.family.truncated([r.prompt for r in requests])

            # 2. Timesteps from a fresh scheduler of the row's kind, built from the model's
            #    config; from an init image, only the last int(steps x strength) of them.
            scheduler = build_scheduler(first.scheduler, self.scheduler_config)
            scheduler.set_timesteps(first.steps, device=self.device)
            skip = denoising_start(first.steps, first.strength) * scheduler.order
            timesteps = scheduler.timesteps[skip:]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(skip)

            # 3. Starting latents: one CPU generator per row, so a row's image never depends on
            #    its batch. The same generators sample init images' latents and feed stochastic
            #    schedulers' noise, in diffusers' order.
            generators = [torch.Generator("cpu").manual_seed(r.seed) for r in requests]
            start = self._start(requests, scheduler, timesteps, generators)
            latents = start.latents

            # 4. Denoising loop, classifier-free guidance as one doubled batch. Inpainting models
            #    see the mask and masked image beside the latents; other UNets inpaint by
            #    blending the re-noised image back outside the mask after every step.
            step_kwargs = {"generator": generators} if _accepts(scheduler.step, "generator") else {}
            if _accepts(scheduler.step, "eta"):
                step_kwargs["eta"] = 0.0
            extra = None
            if start.masked_image_latents is not None:
                extra = torch.cat([start.mask, start.masked_image_latents], dim=1)
                extra = torch.cat([extra] * 2) if guided else extra
            warmup = len(timesteps) - (first.steps - skip // scheduler.order) * scheduler.order
            done = 0
            for i, t in enumerate(timesteps):
                model_input = torch.cat([latents] * 2) if guided else latents
                model_input = scheduler.scale_model_input(model_input, t)
                unet_input = model_input if extra is None else torch.cat([model_input, extra], 1)
                noise = self.unet(
                    unet_input,
                    t,
                    encoder_hidden_states=conditioning.embeds,
                    **conditioning.unet_kwargs,
                    return_dict=False,
                )[0]
                if guided:
                    noise_uncond, noise_text = noise.chunk(2)
                    noise = noise_uncond + guidance * (noise_text - noise_uncond)
                completes = i == len(timesteps) - 1 or (
                    i + 1 > warmup and (i + 1) % scheduler.order == 0
                )
                done += completes
                wanted = [k for k, r in enumerate(requests) if completes and done in r.preview_at]
                if wanted:
                    sample = model_input[: len(requests)]
                    estimate = _predicted_original(scheduler, sample, noise, t)
                    self._previews(estimate, wanted, done, previews, on_preview)
                latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
                if start.mask is not None and start.masked_image_latents is None:
                    proper = start.image_latents
                    if i < len(timesteps) - 1:
                        proper = scheduler.add_noise(proper, start.noise, timesteps[i + 1 : i + 2])
                    latents = (1 - start.mask) * proper + start.mask * latents

            # 5. Decode with the VAE and convert to uint8 pixels.
            images = self._decode(latents)
            finite = torch.isfinite(images.flatten(1)).all(dim=1).tolist()
            pixels = _to_pixels(images)

        results = []
        for request, image, ok, cut, shown in zip(
            requests, pixels, finite, truncated, previews, strict=True
        ):
            if ok:
                results.append(GenerationResult(request, image, cut, previews=shown))
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

    def _start(self, requests, scheduler, timesteps, generators) -> _Start:
        """Step 3: the starting latents, as diffusers' txt2img, img2img and inpaint pipelines
        make them, drawing from each row's generator in their order: the init image's latents
        (when used), the noise, then the masked image's latents (inpainting)."""
        import torch

        first = requests[0]
        dtype = self.unet.dtype
        shape = (
            1,
            self.plan.latent_channels,
            *self.plan.latent_shape(first.width, first.height)[1:],
        )

        def noise():
            rows = [torch.randn(shape, generator=g, dtype=dtype) for g in generators]
            return torch.cat(rows).to(self.device)

        if first.mode == "txt2img":
            return _Start(noise() * scheduler.init_noise_sigma)
        images = _from_pixels([r.init_image for r in requests], self.device)
        from_noise = first.mode == "inpaint" and first.strength == 1.0
        image_latents = None
        if not (from_noise and self.plan.inpainting):
            image_latents = self._encode(images, generators)
        start_noise = noise()
        if from_noise:
            latents = start_noise * scheduler.init_noise_sigma
        else:
            origin = timesteps[:1].repeat(len(requests))
            latents = scheduler.add_noise(image_latents, start_noise, origin)
        if first.mode == "img2img":
            return _Start(latents, start_noise, image_latents)
        masks = torch.from_numpy(np.stack([r.mask_image >= 128 for r in requests]))
        masks = masks[:, None].to(self.device, torch.float32)  # 1 = repaint
        latent_size = shape[-2:]
        mask = torch.nn.functional.interpolate(masks, size=latent_size).to(dtype)
        masked = images * (masks < 0.5)
        if self.plan.inpainting:
            masked_latents = self._encode(masked, generators)
        else:  # diffusers encodes the masked image and never uses it here: only draw alike
            masked_latents = None
            for generator in generators:
                torch.randn(shape, generator=generator, dtype=self.vae.dtype)
        return _Start(latents, start_noise, image_latents, mask, masked_latents)

    def _encode(self, images, generators):
        """Init images ([-1, 1]) to latents: the VAE encoder's distribution, sampled with each
        row's generator, scaled as the decoder expects."""
        import torch

        config = self.vae.config
        posterior = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        draws = [
            torch.randn(posterior.mean[:1].shape, generator=g, dtype=posterior.mean.dtype)
            for g in generators
        ]
        latents = posterior.mean + posterior.std * torch.cat(draws).to(self.device)
        mean, std = _latent_statistics(config, latents)
        if mean is not None:
            latents = (latents - mean) * config.scaling_factor / std
        else:
            latents = latents * config.scaling_factor
        return latents.to(self.unet.dtype)

    def _previews(self, estimate, rows, step, previews, on_preview) -> None:
        """Decode the estimate of the final image for the rows that asked at this step."""
        import torch

        pixels = _to_pixels(self._decode(estimate[torch.tensor(rows)]))
        for row, image in zip(rows, pixels, strict=True):
            previews[row].append((step, image))
            if on_preview is not None:
                on_preview(row, step, image)

    def _decode(self, latents):
        """Latents to images in [-1, 1] with the VAE (in its own dtype: float32 where the
        family upcasts), undoing the latent scaling, then the watermark if asked for."""
        config = self.vae.config
        latents = latents.to(self.vae.dtype)
        mean, std = _latent_statistics(config, latents)
        if mean is not None:
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        images = self.vae.decode(latents, return_dict=False)[0]
        if self.watermarker is not None:
            images = self.watermarker.apply_watermark(images)
        return images


def _latent_statistics(config, like):
    """The VAE's per-channel latent mean and std (some SDXL-family VAEs), else (None, None)."""
    import torch

    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is None or std is None:
        return None, None
    view = (1, -1, 1, 1)
    return torch.tensor(mean).view(view).to(like), torch.tensor(std).view(view).to(like)


def _from_pixels(images: Sequence[np.ndarray], device: str):
    """HxWx3 uint8 images to a (rows, 3, H, W) float32 batch in [-1, 1], as diffusers'
    VaeImageProcessor normalises them."""
    import torch

    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return (2.0 * batch - 1.0).to(device)


def _to_pixels(images) -> list[np.ndarray]:
    """(rows, 3, H, W) images in [-1, 1] to HxWx3 uint8 arrays."""
    import torch

    pixels = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [np.ascontiguousarray(p) for p in pixels.permute(0, 2, 3, 1).cpu().numpy()]


def _predicted_original(scheduler, sample, model_output, t):
    """The model's estimate of the clean latents from `sample` (the scaled model input, in
    variance-preserving form) and its output at `t`, for previews. The noise level comes from
    the scheduler's sigma at this step where it has sigmas, else from alphas_cumprod[t]."""
    import torch

    sigmas, index = getattr(scheduler, "sigmas", None), getattr(scheduler, "step_index", None)
    if sigmas is not None and index is not None and index < len(sigmas):
        alpha_bar = 1.0 / (1.0 + float(sigmas[index]) ** 2)
    else:
        alpha_bar = float(scheduler.alphas_cumprod[int(t)])
    a, b = alpha_bar**0.5, (1.0 - alpha_bar) ** 0.5
    sample, model_output = sample.float(), model_output.float()
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        estimate = a * sample - b * model_output
    elif kind == "sample":
        estimate = model_output
    else:
        estimate = (sample - b * model_output) / a
    return estimate.to(torch.get_default_dtype())


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

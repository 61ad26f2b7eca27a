"""Model families: what differs between Stable Diffusion 1.x/2.x and SDXL, behind one interface.

Two halves, so the driver never needs torch:

- here, the driver side: `detect_family` recognises a model's family from its
  `model_index.json`, and `plan_model` reads its configs (never its weights) into a `ModelPlan`:
  default size, latent shape, which conditioning it needs. Both refuse, in one line, models sdray
  cannot run, before any Ray actor or replica starts;
- in `sd.py` / `sdxl.py`, the engine side: each family's prompt encoding and extra UNet
  conditioning. The denoising loop, guidance, seeding and decoding live once, in the engine.

A new family is one new module with a subclass of `StableDiffusion`, registered in `FAMILIES`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from sdray.errors import ModelError

SD = "sd"
SDXL = "sdxl"

# Family name -> (engine module, class), imported only where a model is loaded.
FAMILIES: dict[str, tuple[str, str]] = {
    SD: ("sdray.families.sd", "StableDiffusion"),
    SDXL: ("sdray.families.sdxl", "StableDiffusionXL"),
}
# Which diffusers pipeline classes (model_index.json `_class_name`) belong to which family.
PIPELINE_CLASSES: dict[str, tuple[str, ...]] = {
    SD: (
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionInpaintPipeline",
    ),
    SDXL: (
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionXLInpaintPipeline",
    ),
}
# (tokenizer folder, text encoder folder) pairs each family encodes prompts with.
TEXT_PARTS: dict[str, tuple[tuple[str, str], ...]] = {
    SD: (("tokenizer", "text_encoder"),),
    SDXL: (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")),
}
TITLES = {SD: "SD 1.x/2.x", SDXL: "SDXL"}
DENOISER_PARTS = ("unet", "vae", "scheduler")
# Files a CLIP tokenizer folder needs: the slow tokenizer's vocabulary and merges, or the fast
# tokenizer's single file.
TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))


def components(family: str) -> tuple[str, ...]:
    """The component folders a model of this family loads."""
    return (*(part for pair in TEXT_PARTS[family] for part in pair), *DENOISER_PARTS)


def weight_components(family: str) -> tuple[str, ...]:
    """The component folders of this family that hold weights."""
    return (*(encoder for _, encoder in TEXT_PARTS[family]), "unet", "vae")


def supported() -> str:
    """The families sdray runs, for messages."""
    return "; ".join(
        f"{TITLES[name]} ({', '.join(classes)})" for name, classes in PIPELINE_CLASSES.items()
    )


def family_class(name: str):
    """The engine-side class of a family (imports torch-using code)."""
    module, cls = FAMILIES[name]
    return getattr(importlib.import_module(module), cls)


def _declared(entry: Any) -> bool:
    """Whether a model_index.json component entry names a class (`[null, null]` does not)."""
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def detect_family(index: dict[str, Any] | None, source: str) -> str:
    """The family of a model from its `model_index.json` (None: the file is missing)."""
    if index is None:
        raise ModelError(
            f"model {source!r} is not a diffusers pipeline directory: it has no model_index.json"
        )
    name = index.get("_class_name")
    family = next((f for f, classes in PIPELINE_CLASSES.items() if name in classes), None)
    if family is None:
        raise ModelError(
            f"model {source!r} is a {name or 'pipeline without a _class_name'}, which sdray does "
            f"not run. Supported families: {supported()}. Transformer-denoiser families (SD3, "
            "Flux, PixArt) are not supported yet."
        )
    absent = [encoder for _, encoder in TEXT_PARTS[family] if not _declared(index.get(encoder))]
    if absent or index.get("requires_aesthetics_score"):
        raise ModelError(
            f"model {source!r} is a refiner-only {TITLES[family]} {name} (no "
            f"{', '.join(absent) or 'prompt conditioning without aesthetic scores'}); sdray "
            "runs base models that generate from text. Use the base model's directory."
        )
    return family


@dataclass(frozen=True)
class ModelPlan:
    """What the driver knows of a model from its configs alone (no weights are read)."""

    family: str
    class_name: str
    sample_size: int  # the UNet's native latent size
    vae_scale_factor: int
    latent_channels: int
    unet_in_channels: int  # 9 for inpainting models (latents + mask + masked-image latents)
    prediction_type: str
    cross_attention_dim: int
    text_hidden_sizes: tuple[int, ...]
    force_zeros_for_empty_prompt: bool
    vae_force_upcast: bool

    @property
    def default_size(self) -> tuple[int, int]:
        """(width, height) when neither a row nor the config sets them."""
        side = self.sample_size * self.vae_scale_factor
        return side, side

    @property
    def inpainting(self) -> bool:
        return self.unet_in_channels == self.latent_channels * 2 + 1

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int]:
        """(channels, height, width) of one image's latents."""
        f = self.vae_scale_factor
        return self.latent_channels, height // f, width // f

    def vae_dtype(self, dtype: str) -> str:
        """The VAE's dtype: float32 where the family upcasts a float16 VAE that asks for it
        (SDXL's VAE overflows in float16 and decodes to NaN or black), else the model's."""
        upcast = self.family == SDXL and self.vae_force_upcast and dtype == "float16"
        return "float32" if upcast else dtype

    def summary(self) -> dict[str, Any]:
        """For manifests and /v1/models."""
        width, height = self.default_size
        return {
            "family": self.family,
            "class_name": self.class_name,
            "default_size": f"{width}x{height}",
            "latent_channels": self.latent_channels,
            "vae_scale_factor": self.vae_scale_factor,
            "prediction_type": self.prediction_type,
            "inpainting": self.inpainting,
        }


def plan_model(
    files: Collection[str], read_json: Callable[[str], dict[str, Any] | None], source: str
) -> ModelPlan:
    """Recognise and check a model from its file listing and configs, without its weights.

    `files` are the paths relative to the model's root; `read_json(relative)` returns a JSON
    file's content (None when absent). Refuses, naming the part: an unsupported family, missing
    component folders, a tokenizer without its files, text encoders whose widths do not add up to
    the UNet's cross-attention width, SDXL's time embedding of the wrong size.
    """
    index = read_json("model_index.json")
    family = detect_family(index, source)
    present = {path.split("/", 1)[0] for path in files if "/" in path}
    missing = [c for c in components(family) if c not in present]
    if missing:
        raise ModelError(
            f"model {source!r} ({TITLES[family]}) is missing {', '.join(m + '/' for m in missing)}"
        )
    for tokenizer, _ in TEXT_PARTS[family]:
        names = {path.split("/", 1)[1] for path in files if path.startswith(tokenizer + "/")}
        if not any(all(n in names for n in group) for group in TOKENIZER_FILES):
            raise ModelError(
                f"model {source!r}: {tokenizer}/ is broken: it has neither vocab.json + "
                "merges.txt nor tokenizer.json"
            )

    def config(component: str, name: str = "config.json") -> dict[str, Any]:
        data = read_json(f"{component}/{name}")
        if not isinstance(data, dict):
            raise ModelError(f"model {source!r}: {component}/{name} is missing or not a mapping")
        return data

    unet, vae = config("unet"), config("vae")
    scheduler = config("scheduler", "scheduler_config.json")
    encoders = [config(encoder) for _, encoder in TEXT_PARTS[family]]
    hidden = tuple(int(e.get("hidden_size", 0)) for e in encoders)
    cross = unet.get("cross_attention_dim")
    cross = cross[0] if isinstance(cross, list) else cross
    if cross != sum(hidden):
        raise ModelError(
            f"model {source!r}: the UNet attends to {cross}-wide text embeddings but the text "
            f"encoders give {' + '.join(map(str, hidden))}; the components do not belong together"
        )
    if family == SDXL:
        _check_time_embedding(unet, encoders[-1], source)
    blocks = vae.get("block_out_channels") or [0]
    sample = unet.get("sample_size", 64)
    return ModelPlan(
        family=family,
        class_name=index["_class_name"],
        sample_size=int(sample[0] if isinstance(sample, list) else sample),
        vae_scale_factor=2 ** (len(blocks) - 1),
        latent_channels=int(vae.get("latent_channels", 4)),
        unet_in_channels=int(unet.get("in_channels", 4)),
        prediction_type=scheduler.get("prediction_type", "epsilon"),
        cross_attention_dim=int(cross),
        text_hidden_sizes=hidden,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
        vae_force_upcast=bool(vae.get("force_upcast", True)),
    )


# SDXL's micro-conditioning: original size (2), crop top-left (2), target size (2).
TIME_IDS = 6


def _check_time_embedding(unet: dict[str, Any], encoder: dict[str, Any], source: str) -> None:
    expected = unet.get("projection_class_embeddings_input_dim")
    given = int(unet.get("addition_time_embed_dim") or 0) * TIME_IDS + int(
        encoder.get("projection_dim") or 0
    )
    if unet.get("addition_embed_type") != "text_time" or expected != given:
        raise ModelError(
            f"model {source!r}: an SDXL UNet needs addition_embed_type 'text_time' and an added "
            f"embedding of {given} inputs ({TIME_IDS} time ids x addition_time_embed_dim + the "
            f"pooled text projection), but its config says {unet.get('addition_embed_type')!r} "
            f"with {expected}"
        )


def with_model_defaults(generation: Any, plan: ModelPlan) -> Any:
    """`generation` (a GenerationConfig) with an unset width/height taken from the model."""
    from sdray.errors import ConfigError

    updates = {}
    for name, value in zip(("width", "height"), plan.default_size, strict=True):
        if getattr(generation, name) is None:
            limit = getattr(generation, f"max_{name}")
            if value > limit:
                raise ConfigError(
                    f"generation.{name} is unset, so the model's native {value} applies, which is "
                    f"above generation.max_{name}={limit}; set generation.{name}"
                )
            updates[name] = value
    return generation.model_copy(update=updates) if updates else generation

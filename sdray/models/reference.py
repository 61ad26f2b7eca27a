"""The real architectures, from their published configs: SD 1.5 and SDXL base 1.0.

Compute and memory depend on the architecture, not on the weight values, so these configs (as
published in the models' diffusers repositories) are how sdray plans, checks and benchmarks the
real sizes without a download: `write_reference_model` writes a diffusers directory of configs
and tokenizers, with random weights only when asked (`weights=True`, for GPU benchmarks).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_CLIP_L = {  # CLIP ViT-L/14's text tower: SD 1.5's encoder, and SDXL's first
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
_OPENCLIP_BIGG = {  # OpenCLIP ViT-bigG/14's text tower: SDXL's second encoder
    **_CLIP_L,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
}
_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

REFERENCE: dict[str, dict[str, Any]] = {
    "sd15": {
        "model_index": {"_class_name": "StableDiffusionPipeline"},
        "text_encoders": {"text_encoder": ("CLIPTextModel", _CLIP_L)},
        "unet": {
            "sample_size": 64,
            "in_channels": 4,
            "out_channels": 4,
            "layers_per_block": 2,
            "block_out_channels": [320, 640, 1280, 1280],
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
        },
        "vae": {**_VAE, "sample_size": 512, "scaling_factor": 0.18215},
        "scheduler": ("PNDMScheduler", _SCHEDULE),
    },
    "sdxl": {
        "model_index": {
            "_class_name": "StableDiffusionXLPipeline",
            "force_zeros_for_empty_prompt": True,
        },
        "text_encoders": {
            "text_encoder": ("CLIPTextModel", _CLIP_L),
            "text_encoder_2": ("CLIPTextModelWithProjection", _OPENCLIP_BIGG),
        },
        "unet": {
            "sample_size": 128,
            "in_channels": 4,
            "out_channels": 4,
            "layers_per_block": 2,
            "block_out_channels": [320, 640, 1280],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "transformer_layers_per_block": [1, 2, 10],
            "attention_head_dim": [5, 10, 20],
            "use_linear_projection": True,
            "cross_attention_dim": 2048,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
            "norm_num_groups": 32,
        },
        "vae": {**_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        "scheduler": (
            "EulerDiscreteScheduler",
            {**_SCHEDULE, "timestep_spacing": "leading", "interpolation_type": "linear"},
        ),
    },
}
# Published parameter counts, which the configs above must reproduce.
PARAMETERS = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sdxl": {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    },
}


def build_modules(name: str, device: str = "meta", dtype: Any = None) -> dict[str, Any]:
    """The reference model's torch modules with random weights (no memory on `meta`)."""
    import torch
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    spec = REFERENCE[name]
    dtype = dtype or torch.float32
    with torch.device(device):
        modules = {
            folder: getattr(transformers, cls)(transformers.CLIPTextConfig(**config))
            for folder, (cls, config) in spec["text_encoders"].items()
        }
        modules["unet"] = UNet2DConditionModel.from_config(spec["unet"])
        modules["vae"] = AutoencoderKL.from_config(spec["vae"])
    for module in modules.values():
        if dtype != torch.float32:
            module.to(dtype)
        module.eval().requires_grad_(False)
    return modules


def write_reference_model(
    name: str, directory: Path, *, weights: bool = False, device: str = "cpu"
) -> Path:
    """A diffusers directory of the reference model: its configs, tokenizers (sdray's byte-level
    CLIP tokenizer, whose ids all fall inside the real vocabulary) and, with `weights`, random
    float16 weights as safetensors (SDXL: about 7 GB), drawn on `device` (cuda: seconds)."""
    from sdray.models.tiny import write_tokenizer

    spec = REFERENCE[name]
    directory.mkdir(parents=True, exist_ok=True)
    import diffusers

    index = {**spec["model_index"], "_diffusers_version": diffusers.__version__}
    for folder, (cls, config) in spec["text_encoders"].items():
        tokenizer = folder.replace("text_encoder", "tokenizer")
        write_tokenizer(directory / tokenizer)
        index[tokenizer] = ["transformers", "CLIPTokenizer"]
        index[folder] = ["transformers", cls]
        _write_json(directory / folder / "config.json", {"architectures": [cls], **config})
    index["unet"] = ["diffusers", "UNet2DConditionModel"]
    index["vae"] = ["diffusers", "AutoencoderKL"]
    scheduler, schedule = spec["scheduler"]
    index["scheduler"] = ["diffusers", scheduler]
    _write_json(directory / "unet" / "config.json", spec["unet"])
    _write_json(directory / "vae" / "config.json", spec["vae"])
    _write_json(directory / "scheduler" / "scheduler_config.json", schedule)
    _write_json(directory / "model_index.json", index)
    if weights:
        import torch

        for folder, module in build_modules(name, device=device, dtype=torch.float16).items():
            module.save_pretrained(directory / folder, safe_serialization=True)
    return directory


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))

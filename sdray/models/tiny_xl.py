"""The embedded tiny SDXL: SDXL's structure at tiny widths, built in code, for tests and demos.

What makes it SDXL, as in the real model: two CLIP text encoders of different widths whose
penultimate hidden states are concatenated (16 + 32 = the UNet's 48-wide cross-attention), the
second with a text projection whose pooled output joins six size/crop time ids in the UNet's
`text_time` added embedding, linear-projection transformer blocks of several layers, SDXL's VAE
scaling factor and Euler scheduler config. Its weights are random: images are noise-like.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdray.models.tiny import write_tokenizer

# Bump when anything below changes: it names the cache directory, so old builds are never reused.
TINY_XL_VERSION = "tiny-xl-v1"
SEED = 0

TEXT_ENCODER_CONFIG = {
    "vocab_size": 514,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "bos_token_id": 512,
    "eos_token_id": 513,
    "pad_token_id": 513,
    "hidden_act": "quick_gelu",
    "projection_dim": 16,
}
TEXT_ENCODER_2_CONFIG = {
    **TEXT_ENCODER_CONFIG,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "hidden_act": "gelu",
    "projection_dim": 32,
}
ADDITION_TIME_EMBED_DIM = 8

UNET_CONFIG = {
    "sample_size": 12,  # 96x96 by default: not tiny's 64, so the default visibly comes from here
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2),
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "cross_attention_dim": TEXT_ENCODER_CONFIG["hidden_size"]
    + TEXT_ENCODER_2_CONFIG["hidden_size"],
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": ADDITION_TIME_EMBED_DIM,
    "projection_class_embeddings_input_dim": 6 * ADDITION_TIME_EMBED_DIM
    + TEXT_ENCODER_2_CONFIG["projection_dim"],
    "norm_num_groups": 8,
}
# Four blocks, so latents are 1/8 of the image size as in SDXL; SDXL's scaling factor, and the
# float16 upcast its VAE asks for.
VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (8, 16, 16, 16),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 96,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}

# SDXL base's scheduler config.
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "skip_prk_steps": True,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}


def build_tiny_xl_model(directory: Path) -> None:
    """Build the tiny SDXL deterministically and save it with diffusers' own
    `StableDiffusionXLPipeline.save_pretrained` into `directory`."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    from sdray.models import quiet_libraries

    quiet_libraries()
    # SDXL's second tokenizer pads with "!" where the first pads with its end token.
    write_tokenizer(directory / "tokenizer")
    write_tokenizer(directory / "tokenizer_2")
    settings = directory / "tokenizer_2" / "tokenizer_config.json"
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "pad_token": "!"}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG))
        torch.manual_seed(SEED + 1)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_2_CONFIG))
        torch.manual_seed(SEED)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        torch.manual_seed(SEED)
        vae = AutoencoderKL(**VAE_CONFIG)
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(directory / "tokenizer", model_max_length=77),
        tokenizer_2=CLIPTokenizer.from_pretrained(directory / "tokenizer_2", model_max_length=77),
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipeline.save_pretrained(directory, safe_serialization=True)
    # Keep the keys other schedulers read (DDIM's clip_sample...), as SDXL's own file does.
    saved = directory / "scheduler" / "scheduler_config.json"
    saved.write_text(json.dumps({**json.loads(saved.read_text()), **SCHEDULER_CONFIG}, indent=2))

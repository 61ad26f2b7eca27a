"""Stable Diffusion 1.x/2.x: one CLIP text encoder, its last hidden state as the conditioning.

The base family: SDXL (sdxl.py) overrides only what it adds. Mirrors diffusers'
`StableDiffusionPipeline.encode_prompt`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdray.families import SD, TEXT_PARTS, ModelPlan
from sdray.requests import GenerationRequest

MAX_TOKENS = 77


@dataclass
class Conditioning:
    """What the UNet attends to, for a batch; with guidance the negative half comes first."""

    embeds: Any  # torch.Tensor (rows, tokens, width)
    unet_kwargs: dict[str, Any] = field(default_factory=dict)  # extra UNet inputs, per row


class StableDiffusion:
    """Prompt encoding and extra UNet conditioning of one family; loads its text parts."""

    name = SD

    def __init__(self, plan: ModelPlan, tokenizers: list, text_encoders: list, device: str):
        self.plan = plan
        self.tokenizers = tokenizers
        self.text_encoders = text_encoders
        self.device = device

    @classmethod
    def load(
        cls,
        directory: Path,
        plan: ModelPlan,
        *,
        device: str,
        dtype: Any,
        use_safetensors: bool | None,
    ) -> StableDiffusion:
        """The family with its tokenizers and text encoders loaded from a model directory."""
        from transformers import CLIPTokenizer

        tokenizers, encoders = [], []
        for (tokenizer, encoder), module_class in zip(
            TEXT_PARTS[cls.name], cls.encoder_classes(), strict=True
        ):
            tokenizers.append(
                CLIPTokenizer.from_pretrained(directory / tokenizer, model_max_length=MAX_TOKENS)
            )
            module = module_class.from_pretrained(
                directory / encoder, torch_dtype=dtype, use_safetensors=use_safetensors
            )
            encoders.append(module.to(device).eval().requires_grad_(False))
        return cls(plan, tokenizers, encoders, device)

    @staticmethod
    def encoder_classes() -> tuple[type, ...]:
        from transformers import CLIPTextModel

        return (CLIPTextModel,)

    def _tokens(self, tokenizer, prompts: Sequence[str]):
        return tokenizer(
            list(prompts),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )

    def encode_text(self, prompts: Sequence[str]):
        """(rows, 77, width): the text encoder's last hidden state (final layer norm applied)."""
        tokenizer, encoder = self.tokenizers[0], self.text_encoders[0]
        tokens = self._tokens(tokenizer, prompts)
        mask = None
        if getattr(encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.device)
        return encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]

    def condition(self, requests: Sequence[GenerationRequest], guided: bool) -> Conditioning:
        """The batch's conditioning; with guidance, the negative prompts' rows first."""
        import torch

        embeds = self.encode_text([r.prompt for r in requests])
        if guided:
            negative = self.encode_text([r.negative_prompt for r in requests])
            embeds = torch.cat([negative, embeds])
        return Conditioning(embeds)

    def truncated(self, prompts: Sequence[str]) -> list[bool]:
        """Whether each prompt is longer than the text encoders' context (and so cut)."""
        tokenizer = self.tokenizers[0]
        lengths = tokenizer(list(prompts), truncation=False).input_ids
        return [len(ids) > tokenizer.model_max_length for ids in lengths]

    def modules(self) -> list[Any]:
        """The torch modules this family holds (for dtype/device/memory-format changes)."""
        return list(self.text_encoders)

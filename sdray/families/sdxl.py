"""SDXL: two CLIP text encoders, pooled text embeddings and size/crop micro-conditioning.

Mirrors diffusers' `StableDiffusionXLPipeline`: the penultimate hidden states of both encoders,
concatenated; the second encoder's pooled projection; `add_time_ids` of (original size, crop
top-left, target size), each (height, width); zeros for empty negative prompts when the model's
`force_zeros_for_empty_prompt` says so. One difference, on purpose: those are per row, so rows
with different micro-conditioning or negative prompts can share a denoising batch.
"""

from __future__ import annotations

from collections.abc import Sequence

from sdray.families import SDXL
from sdray.families.sd import Conditioning, StableDiffusion
from sdray.requests import GenerationRequest


class StableDiffusionXL(StableDiffusion):
    name = SDXL

    @staticmethod
    def encoder_classes() -> tuple[type, ...]:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        return (CLIPTextModel, CLIPTextModelWithProjection)

    def encode_both(self, prompts: Sequence[str]):
        """(embeds (rows, 77, width1 + width2), pooled (rows, projection))."""
        import torch

        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            tokens = self._tokens(tokenizer, prompts)
            out = encoder(tokens.input_ids.to(self.device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # the projection of the second encoder
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled

    def encode_text(self, prompts: Sequence[str]):
        return self.encode_both(prompts)[0]

    def condition(self, requests: Sequence[GenerationRequest], guided: bool) -> Conditioning:
        import torch

        embeds, pooled = self.encode_both([r.prompt for r in requests])
        time_ids = torch.tensor([time_ids_of(r) for r in requests], dtype=embeds.dtype)
        if guided:
            negatives = [r.negative_prompt for r in requests]
            negative, negative_pooled = self.encode_both(negatives)
            if self.plan.force_zeros_for_empty_prompt:
                empty = torch.tensor([not text for text in negatives], device=embeds.device)
                negative = torch.where(empty[:, None, None], 0, negative)
                negative_pooled = torch.where(empty[:, None], 0, negative_pooled)
            embeds = torch.cat([negative, embeds])
            pooled = torch.cat([negative_pooled, pooled])
            time_ids = torch.cat([time_ids, time_ids])
        added = {"text_embeds": pooled, "time_ids": time_ids.to(embeds.device)}
        return Conditioning(embeds, {"added_cond_kwargs": added})

    def truncated(self, prompts: Sequence[str]) -> list[bool]:
        cut = [False] * len(prompts)
        for tokenizer in self.tokenizers:
            lengths = tokenizer(list(prompts), truncation=False).input_ids
            cut = [
                c or len(ids) > tokenizer.model_max_length
                for c, ids in zip(cut, lengths, strict=True)
            ]
        return cut


def time_ids_of(request: GenerationRequest) -> list[int]:
    """SDXL's micro-conditioning of one row: original size, crop top-left, target size, each as
    (height, width); the original size defaults to the target size, the crop to (0, 0)."""
    original = (
        request.original_height or request.height,
        request.original_width or request.width,
    )
    crop = (request.crop_top or 0, request.crop_left or 0)
    return [*original, *crop, request.height, request.width]

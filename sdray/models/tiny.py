"""The embedded tiny model: Stable Diffusion's architecture at tiny widths, trained on the
synthetic world of `sdray.quality.world` and shipped in the package (`tiny_model/`).

This module holds the architecture (the configs `pipelines/train_tiny.py` builds it from), the
word-level tokenizer generated from the world's vocabulary, and the copy of the shipped files
into the model cache.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

# The shipped diffusers directory (written by pipelines/train_tiny.py).
SHIPPED = Path(__file__).with_name("tiny_model")

BOS_ID, EOS_ID = 512, 513  # after the 512 byte symbols, as in the byte-level vocabulary

TEXT_ENCODER_CONFIG = {
    # vocab_size: set from the tokenizer (`text_encoder_config`)
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "pad_token_id": EOS_ID,
    "hidden_act": "quick_gelu",
    "projection_dim": 64,
}

UNET_CONFIG = {
    "sample_size": 8,  # latents of 64x64 pictures: the size it was trained at
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (48, 96),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}

# Four blocks, as in SD's VAE, so latents are 1/8 of the image size like the real model.
VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (16, 32, 32, 32),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 1.0,  # training measures the latents' spread and sets 1/std
}

# SD 1.x's training schedule; every named scheduler is built from this config.
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def _byte_symbols() -> list[str]:
    """The printable stand-in for each byte used by byte-level BPE (GPT-2/CLIP convention)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one lower-case ASCII word, as CLIP's tokenizer does it."""
    symbols = [*word[:-1], word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = [
            (ranks.get(pair, len(ranks)), i, pair)
            for i, pair in enumerate(zip(symbols, symbols[1:], strict=False))
        ]
        rank, _, best = min(pairs)
        if rank == len(ranks):
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def tokenizer_files(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """A CLIP vocabulary and merges in which each of `words` is one token.

    The 512 byte symbols (alone and with `</w>`) and the start/end tokens come first, as in
    the byte-level vocabulary, so any other text still tokenizes (byte by byte).
    """
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": i + 256 for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = BOS_ID
    vocab["<|endoftext|>"] = EOS_ID
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        pieces = _bpe(word, ranks)
        while len(pieces) > 1:  # merge left to right until the word is whole
            ranks[(pieces[0], pieces[1])] = len(ranks)
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    return vocab, [f"{a} {b}" for (a, b), _ in sorted(ranks.items(), key=lambda kv: kv[1])]


def write_tokenizer(directory: Path, words: Sequence[str] = ()) -> None:
    """Write a CLIP tokenizer whose vocabulary holds `words` whole, into `directory` (with no
    words: the byte-level tokenizer, every text byte by byte)."""
    vocab, merges = tokenizer_files(words)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n")
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
            },
            indent=2,
        )
    )


def text_encoder_config(vocab_size: int) -> dict:
    return {**TEXT_ENCODER_CONFIG, "vocab_size": vocab_size}


MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    # diffusers' own pipelines read it (DiffusionPipeline.from_pretrained fails without it).
    "_diffusers_version": "0.42.1",
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
}


def shipped_version() -> str:
    """`tiny-` and a digest of the shipped files: names the cache copy, so a retrained model is
    never mistaken for an older copy."""
    digest = hashlib.sha256()
    for path in sorted(p for p in SHIPPED.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(SHIPPED)).encode() + b"\0" + path.read_bytes())
    return "tiny-" + digest.hexdigest()[:16]


def build_tiny_model(directory: Path) -> None:
    """Copy the shipped tiny model (an ordinary diffusers directory) into `directory`."""
    if not (SHIPPED / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the embedded model's files are missing from {SHIPPED}; reinstall sdray "
            "or run pipelines/train_tiny.py"
        )
    shutil.copytree(SHIPPED, directory)

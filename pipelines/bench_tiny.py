"""Seconds per image of the embedded (trained) tiny model against the random-weight tiny model
it replaced, through the same engine in one process, at the same sizes and settings.

    python pipelines/bench_tiny.py [--sizes 64 128] [--batch 4] [--steps 20] [--repeats 5]

The previous model is rebuilt here from its configs (UNet (32, 64), VAE (8, 16, 16, 16), CLIP
width 32, byte-level tokenizer), with random weights: speed depends on the architecture only.
Calls alternate between the two models and the medians are compared, as the machine is shared.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sdray.models import ModelFiles, plan_directory, resolve_model
from sdray.models.tiny import MODEL_INDEX, SCHEDULER_CONFIG, write_tokenizer

PREVIOUS_UNET = {
    "sample_size": 16,
    "layers_per_block": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
PREVIOUS_VAE = {
    "latent_channels": 4,
    "block_out_channels": (8, 16, 16, 16),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 128,
    "scaling_factor": 0.18215,
}
PREVIOUS_TEXT = {
    "vocab_size": 514,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "bos_token_id": 512,
    "eos_token_id": 513,
    "pad_token_id": 513,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
}


def build_previous(directory: Path) -> None:
    """The previous embedded model: the same architecture family, narrower, random weights."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    write_tokenizer(directory / "tokenizer", [])  # bytes only
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(**PREVIOUS_TEXT)).save_pretrained(directory / "text_encoder")
    UNet2DConditionModel(**PREVIOUS_UNET).save_pretrained(directory / "unet")
    AutoencoderKL(**PREVIOUS_VAE).save_pretrained(directory / "vae")
    DDIMScheduler(**SCHEDULER_CONFIG).save_pretrained(directory / "scheduler")
    (directory / "model_index.json").write_text(json.dumps(MODEL_INDEX))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    from sdray.engine import DiffusionEngine
    from sdray.requests import GenerationRequest

    with tempfile.TemporaryDirectory() as scratch:
        previous_dir = Path(scratch) / "previous"
        build_previous(previous_dir)
        engines = {
            "previous (random)": DiffusionEngine(
                ModelFiles(
                    "previous", previous_dir, "previous", plan_directory(previous_dir, "previous")
                ),
                device="cpu",
                torch_threads=args.threads,
            ),
            "trained": DiffusionEngine(
                resolve_model("tiny"), device="cpu", torch_threads=args.threads
            ),
        }
        print(f"batch {args.batch}, {args.steps} steps, ddim, guidance 7.5, {args.threads} thread")
        for size in args.sizes:
            requests = [
                GenerationRequest(
                    id=str(i),
                    prompt="a red circle in the top left corner",
                    negative_prompt="",
                    seed=i,
                    steps=args.steps,
                    guidance_scale=7.5,
                    width=size,
                    height=size,
                    scheduler="ddim",
                )
                for i in range(args.batch)
            ]
            times: dict[str, list[float]] = {name: [] for name in engines}
            for engine in engines.values():
                engine.generate(requests)  # warm-up
            for _ in range(args.repeats):
                for name, engine in engines.items():
                    started = time.perf_counter()
                    engine.generate(requests)
                    times[name].append((time.perf_counter() - started) / args.batch)
            median = {name: statistics.median(t) for name, t in times.items()}
            print(
                f"{size}x{size}: previous {1000 * median['previous (random)']:.0f} ms/image, "
                f"trained {1000 * median['trained']:.0f} ms/image, "
                f"ratio {median['trained'] / median['previous (random)']:.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""What previews (`output.preview_every`) cost: the engine with and without them, side by side.

    python pipelines/bench_previews.py [--source tiny] [--steps 20] [--size 128] [--rows 16]

Each preview decodes the model's current estimate of the final image with the full VAE, so its
cost is about one VAE decode per kept step; the denoising itself is unchanged (the images are
identical, which this script checks).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from sdray.config import ModelConfig
from sdray.engine import DiffusionEngine
from sdray.requests import GenerationRequest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    engine = DiffusionEngine.from_config(
        ModelConfig(source=args.source, device="auto"), max_batch_size=args.batch
    )

    def rows(every: int) -> list[GenerationRequest]:
        return [
            GenerationRequest(
                id=str(i),
                prompt=f"a red circle, variation {i}",
                negative_prompt="",
                seed=i,
                steps=args.steps,
                guidance_scale=7.5,
                width=args.size,
                height=args.size,
                scheduler="euler",
                preview_at=tuple(range(every, args.steps + 1, every)) if every else (),
            )
            for i in range(args.rows)
        ]

    engine.generate(rows(0)[: args.batch])  # warm up
    print(
        f"previews on {engine.model_name} ({engine.device}, {engine.dtype}): {args.rows} images "
        f"{args.size}x{args.size}, {args.steps} steps, batch {args.batch}; median of "
        f"{args.repeats} runs"
    )
    baseline = None
    for every in (0, 10, 5, 2, 1):
        if every > args.steps:
            continue
        timings, images = [], None
        for _ in range(args.repeats):
            started = time.perf_counter()
            results = engine.generate(rows(every))
            timings.append(time.perf_counter() - started)
            images = [r.image for r in results]
        seconds = float(np.median(timings))
        if baseline is None:
            baseline, reference = seconds, images
        same = all(np.array_equal(a, b) for a, b in zip(images, reference, strict=True))
        kept = len(range(every, args.steps + 1, every)) if every else 0
        print(
            f"  preview_every={every:<3} ({kept:2d} previews/image): {seconds:7.2f}s  "
            f"x{seconds / baseline:4.2f} of none  images identical: {same}"
        )


if __name__ == "__main__":
    main()

"""Train the embedded tiny model on the synthetic world and write it where the package ships it.

    nice -n 5 python pipelines/train_tiny.py [--output sdray/models/tiny_model] [--set unet_steps=8000 ...]

About an hour on two CPU cores with the defaults (`sdray.tools.training.TrainSettings`).
Logs losses as it goes; writes `training.json` (settings, losses, wall and CPU time, held-out
quality) beside the weights. Thin: the training itself is `sdray.tools.training.train`.
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from sdray.models.tiny import SHIPPED
from sdray.tools.training import TrainSettings, add_quality, train


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=SHIPPED, help="model directory to write")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a TrainSettings field, e.g. unet_steps=500",
    )
    parser.add_argument(
        "--vae-from", type=Path, help="reuse this model directory's VAE instead of training one"
    )
    parser.add_argument(
        "--unet-from",
        type=Path,
        help="continue training this model directory's UNet and text encoder",
    )
    parser.add_argument(
        "--evaluate-only",
        action="store_true",
        help="only measure the model in --output (e.g. of a run stopped early) into its record",
    )
    args = parser.parse_args(argv)
    types = {f.name: f.type for f in dataclasses.fields(TrainSettings)}
    overrides = {}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in types:
            parser.error(f"unknown setting {name!r}; choose from {', '.join(types)}")
        overrides[name] = float(value) if types[name] in (float, "float") else int(value)
    start = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - start:7.0f}s] {line}", flush=True)

    settings = TrainSettings(**overrides)
    if args.evaluate_only:
        add_quality(args.output, settings.eval_prompts, log)
        return 0
    record = train(args.output, settings, log, vae_from=args.vae_from, unet_from=args.unet_from)
    log(
        f"done: wall {record['training_wall_seconds']:.0f}s, "
        f"CPU {record['training_cpu_seconds']:.0f}s; model in {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

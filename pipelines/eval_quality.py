"""Does the embedded model draw what it is asked? Held-out prompts through the real batch
pipeline (`sdray.batch.run_generate`), scored by `sdray.quality`.

    python pipelines/eval_quality.py --work eval-output                # default settings + table
    python pipelines/eval_quality.py --work eval-output --no-sweep --set model.dtype=bfloat16
    python pipelines/eval_quality.py --work eval-output --guard        # the suite's quality test
    python pipelines/eval_quality.py --work eval-output --guard --break guidance

Prints accuracy per attribute at the default settings, then (unless --no-sweep) a table against
guidance scale, scheduler and steps, plotted in WORK/quality.png; WORK/summary.json holds it
all. `--guard` runs the quality test's prompts and says whether its thresholds pass. `--break`
breaks the engine on purpose (see `break_engine`) to show that the guard notices.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import pyarrow.parquet as pq

from sdray.config import load_config
from sdray.quality import evaluate, world

BREAKAGES = ("prompt", "guidance", "sigma")


def break_engine(kind: str) -> None:
    """Break the engine in this process on purpose (run in every Ray worker as its setup hook).

    The one place that knows the engine's internals, so adapt it when they change:
    - prompt:   the SD family's `condition` encodes every prompt as the empty prompt, so the
                picture ignores what was asked (guidance then contrasts "" with "").
    - guidance: while a batch with guidance > 1 runs, the UNet stand-in returns (uncond,
                2*uncond - text) for the doubled batch, so the engine's `uncond + g*(text -
                uncond)` becomes `uncond - g*(text - uncond)`: the guidance sign flipped.
    - sigma:    `sdray.engine.build_scheduler` returns schedulers whose `init_noise_sigma` is
                1, so the starting latents are not scaled by it (matters where it is not 1:
                Euler, Heun, LMS... not DDIM).
    """
    import dataclasses

    import torch

    from sdray import engine
    from sdray.families.sd import StableDiffusion

    cls = engine.DiffusionEngine
    if kind == "prompt":
        condition = StableDiffusion.condition

        def ignored(self, requests, guided):
            blank = [dataclasses.replace(r, prompt="") for r in requests]
            return condition(self, blank, guided)

        StableDiffusion.condition = ignored
    elif kind == "guidance":

        class FlippedGuidance:
            def __init__(self, unet):
                self.unet = unet

            def __getattr__(self, name):
                return getattr(self.unet, name)

            def __call__(self, sample, t, **kwargs):
                uncond, text = self.unet(sample, t, **kwargs)[0].chunk(2)
                return (torch.cat([uncond, 2 * uncond - text]),)

        generate_batch = cls._generate_batch

        def flipped(self, requests, *args, **kwargs):
            if requests[0].guidance_scale <= 1:
                return generate_batch(self, requests, *args, **kwargs)
            unet, self.unet = self.unet, FlippedGuidance(self.unet)
            try:
                return generate_batch(self, requests, *args, **kwargs)
            finally:
                self.unet = unet

        cls._generate_batch = flipped
    elif kind == "sigma":
        build = engine.build_scheduler

        def unscaled(name, config):
            scheduler = build(name, config)
            kind_ = type(scheduler)
            scheduler.__class__ = type(kind_.__name__, (kind_,), {"init_noise_sigma": 1.0})
            return scheduler

        engine.build_scheduler = unscaled
    else:
        raise ValueError(f"unknown breakage {kind!r}; choose one of {', '.join(BREAKAGES)}")


def start_ray(breakage: str | None) -> None:
    """Start or join Ray like `sdray generate` (the driver's forwarded variables set in every
    worker by a setup hook), with the breakage added to that hook."""
    import ray

    from sdray.batch.cluster import forwarded_env

    env = forwarded_env()

    def setup_hook() -> None:  # a named function: Ray exports it by value
        os.environ.update(env)
        if breakage:
            break_engine(breakage)

    ray.init(
        include_dashboard=False,
        logging_level="WARNING",
        runtime_env={"worker_process_setup_hook": setup_hook},
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("eval-output"), help="work directory")
    parser.add_argument("--prompts", type=int, default=72, help="held-out prompts per variant")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt set")
    parser.add_argument("--no-sweep", action="store_true", help="default settings only")
    parser.add_argument(
        "--training-triples", action="store_true", help="prompts seen in training instead"
    )
    parser.add_argument("--guard", action="store_true", help="the suite's quality test set")
    parser.add_argument("--break", dest="breakage", choices=BREAKAGES, help="break the engine")
    parser.add_argument("--config", help="sdray config (default: the embedded CPU config)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    config = load_config(args.config, args.set)
    config.output.format, config.output.image_format = "files", "png"  # lossless, to score
    g = config.generation
    if args.guard:
        prompts = evaluate.guard_prompts()  # each with its own scheduler
        table = evaluate.prompt_table(
            prompts, evaluate.variants(g.steps, g.guidance_scale, "", False)
        )
    else:
        prompts = world.evaluation_prompts(
            args.prompts, args.seed, held_out=not args.training_triples
        )
        chosen = evaluate.variants(g.steps, g.guidance_scale, g.scheduler, not args.no_sweep)
        table = evaluate.prompt_table(prompts, chosen)
    args.work.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, args.work / "prompts.parquet")

    from sdray.batch import run_generate

    start_ray(args.breakage)
    output = str((args.work / "images").resolve())
    summary_line = run_generate(
        str(args.work / "prompts.parquet"), output, config, overwrite=True, progress=False
    ).line()
    print(summary_line)
    scored = evaluate.score_output(output)
    by = "scheduler" if args.guard else "variant"
    summary = evaluate.summarize(scored, by=by)
    label = f"held-out accuracy (break: {args.breakage or 'none'}, dtype {config.model.dtype})"
    print(f"\n{label}\n" + evaluate.format_table(summary, title=by))
    report = {"label": label, "by": by, "summary": summary, "config_sets": args.set}
    if not args.guard and not args.no_sweep:
        laid_out = evaluate.by_axis(summary, chosen[0])
        print("\nagainst one setting at a time (* the default)\n" + evaluate.format_table(laid_out))
        evaluate.plot(laid_out, args.work / "quality.png")
        print(f"\nplot: {args.work / 'quality.png'}")
    if args.guard:
        verdicts = {
            name: all(figures[a] >= t for a, t in evaluate.GUARD_THRESHOLDS.items())
            for name, figures in summary.items()
        }
        agreement = sorted(evaluate.scheduler_agreement(output).values())
        lowest = agreement[0] if agreement else 0.0
        verdicts["ddim~euler"] = lowest >= evaluate.GUARD_AGREEMENT_DB
        report["guard_passes"] = verdicts
        report["agreement_db"] = agreement
        print(
            f"\nsame prompt and seed, DDIM vs Euler: PSNR lowest {lowest:.1f} dB, median "
            f"{agreement[len(agreement) // 2] if agreement else 0.0:.1f} dB over {len(agreement)} "
            f"pairs (the test wants >= {evaluate.GUARD_AGREEMENT_DB:.0f} dB)"
        )
        print(f"quality test thresholds {evaluate.GUARD_THRESHOLDS}: ", end="")
        print(", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in verdicts.items()))
    (args.work / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

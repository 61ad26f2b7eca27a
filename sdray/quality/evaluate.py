"""The quality guard end to end: held-out prompts through the real batch pipeline, then scored.

`prompt_table` writes the held-out prompts once per generation variant (the default settings,
and one axis at a time: guidance scale, scheduler, steps); `run_generate` makes the images like
any job; `score_output` scores every row of an output against its prompt; `summarize` gives
accuracy per attribute and variant. `pipelines/eval_quality.py` runs it all.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from sdray.quality import world
from sdray.quality.scorer import ATTRIBUTES, accuracy, parse_prompt, score

GUIDANCE_SCALES = (1.0, 3.0, 5.0, 7.5, 10.0)
SCHEDULER_NAMES = ("ddim", "euler", "euler_ancestral", "dpmpp_2m", "unipc")
STEP_COUNTS = (5, 10, 20, 40)

# The suite's quality test (tests/integration/test_quality.py): held-out prompts, each drawn
# with DDIM and with Euler (whose initial noise is not unit-scaled), the accuracy each scheduler
# must reach, and how alike the two pictures of one prompt and seed must be (set from
# measurements of the shipped model, with margin; see the README).
GUARD_PROMPTS = 12
GUARD_SEED = 7
GUARD_SCHEDULERS = ("ddim", "euler")
GUARD_THRESHOLDS = {"colour": 0.8, "shape": 0.5}
# DDIM (eta 0) and Euler are both the Euler method on the same probability-flow ODE, so from
# the same noise they draw the same picture up to discretisation; an engine that scales one
# scheduler's initial noise wrongly (or feeds it the wrong timesteps) draws two different ones.
GUARD_AGREEMENT_DB = 30.0


@dataclass(frozen=True)
class Variant:
    """One setting of the generation parameters the table compares."""

    axis: str  # "default", "guidance_scale", "scheduler" or "steps"
    steps: int
    guidance_scale: float
    scheduler: str

    @property
    def value(self) -> str:
        if self.axis == "default":
            return "default"
        return str(getattr(self, self.axis))

    @property
    def name(self) -> str:
        return self.axis if self.axis == "default" else f"{self.axis}={self.value}"


AXES: dict[str, Iterable[Any]] = {
    "guidance_scale": GUIDANCE_SCALES,
    "scheduler": SCHEDULER_NAMES,
    "steps": STEP_COUNTS,
}


def variants(steps: int, guidance_scale: float, scheduler: str, sweep: bool) -> list[Variant]:
    """The default settings, then (with `sweep`) each axis's other values, the rest at default."""
    base = Variant("default", steps, guidance_scale, scheduler)
    found = [base]
    for axis, values in AXES.items() if sweep else ():
        for value in values:
            if value != getattr(base, axis):
                settings = {"steps": steps, "guidance_scale": guidance_scale}
                found.append(Variant(axis, **{**settings, "scheduler": scheduler, axis: value}))
    return found


def by_axis(summary: dict[str, dict[str, float]], base: Variant) -> dict[str, dict[str, float]]:
    """The summary of a sweep laid out axis by axis, the default settings in their place on
    each axis (named `axis=value*`)."""
    laid_out = {}
    for axis, values in AXES.items():
        for value in values:
            if value == getattr(base, axis):
                laid_out[f"{axis}={value}*"] = summary["default"]
            elif f"{axis}={value}" in summary:
                laid_out[f"{axis}={value}"] = summary[f"{axis}={value}"]
    return laid_out


def prompt_table(
    prompts: list[dict], variants: list[Variant], size: int = world.IMAGE_SIZE
) -> pa.Table:
    """One row per (variant, prompt): the prompt's id, text and seed, the variant's settings.

    The same seed across variants, so they differ only by the setting compared; a prompt with
    its own `scheduler` keeps it.
    """
    rows = [
        {
            "id": f"{v.name}/{p['id']}",
            "prompt": p["prompt"],
            "seed": p["seed"],
            "steps": v.steps,
            "guidance_scale": v.guidance_scale,
            "scheduler": p.get("scheduler", v.scheduler),
            "width": size,
            "height": size,
            "variant": v.name,
            "axis": v.axis,
            "value": v.value,
        }
        for v in variants
        for p in prompts
    ]
    return pa.Table.from_pylist(rows)


def guard_prompts() -> list[dict]:
    """The quality test's rows: each held-out prompt once with every guard scheduler (same
    seed), its id suffixed with the scheduler's name."""
    return [
        {**row, "id": f"{row['id']}-{scheduler}", "scheduler": scheduler}
        for row in world.evaluation_prompts(GUARD_PROMPTS, seed=GUARD_SEED)
        for scheduler in GUARD_SCHEDULERS
    ]


def _read_image(fs, root: str, row: dict):
    from PIL import Image

    from sdray.storage import join

    with fs.open(join(root, row["image_path"]), "rb") as handle:
        return Image.open(io.BytesIO(handle.read())).convert("RGB")


def score_output(output_uri: str, storage_options: dict | None = None) -> list[dict]:
    """Each metadata row of an output (format `files`) with its hits per attribute named in its
    prompt; a row that failed counts as a miss on every one."""
    from sdray.batch import read_metadata
    from sdray.storage import filesystem

    fs, root = filesystem(output_uri, storage_options)
    scored = []
    for row in read_metadata(output_uri, storage_options).to_pylist():
        if row["status"] == "ok":
            hits = score(_read_image(fs, root, row), row["prompt"])
        else:
            spec = parse_prompt(row["prompt"] or "")
            hits = {a: False for a in ATTRIBUTES if getattr(spec, a) is not None}
        scored.append({**row, "hits": hits})
    return scored


def scheduler_agreement(
    output_uri: str, storage_options: dict | None = None
) -> dict[tuple[str, int], float]:
    """PSNR (dB) between the pictures of one (prompt, seed) drawn with two schedulers, for every
    such pair in an output (format `files`); a pair with a failed row reads 0 dB."""
    import numpy as np

    from sdray.batch import read_metadata
    from sdray.storage import filesystem

    fs, root = filesystem(output_uri, storage_options)
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in read_metadata(output_uri, storage_options).to_pylist():
        groups.setdefault((row["prompt"], row["seed"]), []).append(row)
    agreement = {}
    for key, rows in sorted(groups.items()):
        if len({r["scheduler"] for r in rows}) != 2 or len(rows) != 2:
            continue
        if any(r["status"] != "ok" for r in rows):
            agreement[key] = 0.0
            continue
        first, second = (np.asarray(_read_image(fs, root, r), dtype=np.float64) for r in rows)
        error = float(((first - second) ** 2).mean())
        agreement[key] = float("inf") if error == 0 else 10 * math.log10(255**2 / error)
    return agreement


def summarize(scored: list[dict], by: str = "variant") -> dict[str, dict[str, float]]:
    """Accuracy per attribute (and `all`, `n`) for each value of the column `by`."""
    groups: dict[str, list[dict]] = {}
    for row in scored:
        groups.setdefault(str(row.get(by, "all")), []).append(row["hits"])
    return {
        name: {**accuracy(hits), "n": float(len(hits))} for name, hits in sorted(groups.items())
    }


def format_table(summary: dict[str, dict[str, float]], title: str = "variant") -> str:
    """A fixed-width text table: one line per group, a column per attribute (percent)."""
    columns = [a for a in (*ATTRIBUTES, "all") if any(a in s for s in summary.values())]
    width = max(len(title), *(len(k) for k in summary))
    lines = [f"{title:<{width}}  " + "  ".join(f"{c:>10}" for c in columns) + "      n"]
    for name, figures in summary.items():
        cells = [f"{100 * figures[c]:>9.1f}%" if c in figures else f"{'-':>10}" for c in columns]
        lines.append(f"{name:<{width}}  " + "  ".join(cells) + f"  {int(figures['n']):>5}")
    return "\n".join(lines)


def plot(summary: dict[str, dict[str, float]], path: Path) -> None:
    """Accuracy per attribute against guidance scale, scheduler and steps (a `by_axis`
    summary), as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_names = ("guidance_scale", "scheduler", "steps")
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=True)
    for ax, axis in zip(axes, axes_names, strict=True):
        names = [n for n in summary if n.startswith(axis + "=")]
        labels = [n.split("=", 1)[1].rstrip("*") for n in names]
        for attribute in ("colour", "shape", "position", "all"):
            values = [100 * summary[n].get(attribute, float("nan")) for n in names]
            ax.plot(labels, values, marker="o", label=attribute)
        ax.set_title(axis)
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out accuracy (%)")
    axes[-1].legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)

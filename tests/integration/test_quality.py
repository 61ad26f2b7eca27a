"""The quality guard: `sdray generate` draws held-out prompts with the embedded model, and the
pictures show the colour, shape and position asked for, with DDIM and with Euler (whose initial
noise is not unit-scaled). A broken engine (prompt ignored, guidance flipped, initial noise not
scaled) fails it: see `pipelines/eval_quality.py --guard --break ...`."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from sdray.quality import evaluate

from .cli import run_cli

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, sdray_env):
    root = tmp_path_factory.mktemp("quality")
    prompts = evaluate.guard_prompts()
    table = evaluate.prompt_table(prompts, evaluate.variants(20, 7.5, "ddim", sweep=False))
    pq.write_table(table, root / "prompts.parquet")
    output = root / "out"
    result = run_cli(
        [
            "generate",
            "--input",
            str(root / "prompts.parquet"),
            "--output",
            str(output),
            "--set",
            "batch.min_actors=2",
            "--set",
            "batch.max_actors=2",
        ],
        sdray_env,
    )
    assert result.returncode == 0, result.stderr
    return prompts, evaluate.score_output(str(output))


def test_every_prompt_was_drawn_with_its_scheduler(guarded):
    prompts, scored = guarded
    assert sorted(r["id"] for r in scored) == sorted(f"default/{p['id']}" for p in prompts)
    assert all(r["status"] == "ok" and r["width"] == 64 for r in scored)
    assert {r["scheduler"] for r in scored} == set(evaluate.GUARD_SCHEDULERS)


@pytest.mark.parametrize("scheduler", evaluate.GUARD_SCHEDULERS)
def test_held_out_prompts_are_drawn_as_asked(guarded, scheduler):
    _, scored = guarded
    figures = evaluate.summarize([r for r in scored if r["scheduler"] == scheduler], by="scheduler")
    reached = figures[scheduler]
    for attribute, threshold in evaluate.GUARD_THRESHOLDS.items():
        assert reached[attribute] >= threshold, (attribute, reached)

"""The quality guard: `sdray generate` draws held-out prompts with the embedded model, each with
DDIM and with Euler (whose initial noise is not unit-scaled); the pictures show the colour and
shape asked for, and the two pictures of one prompt and seed agree (both schedulers solve the
same ODE from the same noise). A broken engine (prompt ignored, guidance flipped, initial noise
not scaled) fails it: see `pipelines/eval_quality.py --guard --break ...`."""

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
    return prompts, evaluate.score_output(str(output)), str(output)


def test_every_prompt_was_drawn_with_its_scheduler(guarded):
    prompts, scored, _ = guarded
    assert sorted(r["id"] for r in scored) == sorted(f"default/{p['id']}" for p in prompts)
    assert all(r["status"] == "ok" and r["width"] == 64 for r in scored)
    assert {r["scheduler"] for r in scored} == set(evaluate.GUARD_SCHEDULERS)


@pytest.mark.parametrize("scheduler", evaluate.GUARD_SCHEDULERS)
def test_held_out_prompts_are_drawn_as_asked(guarded, scheduler):
    _, scored, _ = guarded
    figures = evaluate.summarize([r for r in scored if r["scheduler"] == scheduler], by="scheduler")
    reached = figures[scheduler]
    for attribute, threshold in evaluate.GUARD_THRESHOLDS.items():
        assert reached[attribute] >= threshold, (attribute, reached)


def test_ddim_and_euler_draw_the_same_picture_from_the_same_seed(guarded):
    prompts, _, output = guarded
    agreement = evaluate.scheduler_agreement(output)
    assert len(agreement) == len(prompts) // len(evaluate.GUARD_SCHEDULERS)
    lowest = min(agreement.values())
    assert lowest >= evaluate.GUARD_AGREEMENT_DB, sorted(agreement.values())

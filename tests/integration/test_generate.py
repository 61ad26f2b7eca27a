"""`sdray generate` end to end on a local Ray cluster with the tiny model."""

from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from .cli import read_metadata, run_cli

pytestmark = pytest.mark.integration

FAST = ["--set", "generation.steps=2", "--set", "batch.max_actors=2", "--set", "batch.min_actors=2"]

ROWS = [
    # id, prompt, width, height, scheduler, seed, extra
    ("plain", "a red fox", None, None, None, 1, "a"),
    ("../../escape", "path-like id", 64, 64, "euler", 2, "b"),
    ("/abs/path", "absolute id", 64, 128, "dpmpp_2m", None, "c"),
    ("wide", "a wide image", 128, 64, None, 4, "d"),
    ("bad-width", "not a multiple of 8", 100, 64, None, 5, "e"),
    ("bad-sched", "unknown scheduler", None, None, "warp_drive", 6, "f"),
    ("null-prompt", None, None, None, None, 7, "g"),
    ("bad-seed", "negative seed", None, None, None, -3, "h"),
    ("long", "word " * 120, None, None, "euler_ancestral", 9, "i"),
    ("tiny-steps", "one step", 64, 64, None, 10, "j"),
]
INVALID = {
    "bad-width": "width=100",
    "bad-sched": "scheduler='warp_drive'",
    "null-prompt": "prompt=None",
    "bad-seed": "seed=-3",
}


@pytest.fixture(scope="module")
def generated(tmp_path_factory, sdray_env):
    root = tmp_path_factory.mktemp("gen")
    table = pa.table(
        {
            "id": [r[0] for r in ROWS],
            "prompt": [r[1] for r in ROWS],
            "width": pa.array([r[2] for r in ROWS], pa.int64()),
            "height": pa.array([r[3] for r in ROWS], pa.int64()),
            "scheduler": [r[4] for r in ROWS],
            "seed": pa.array([r[5] for r in ROWS], pa.int64()),
            "extra": [r[6] for r in ROWS],
            "score": [float(i) for i in range(len(ROWS))],
        }
    )
    inputs = root / "in"
    inputs.mkdir()
    pq.write_table(table.slice(0, 5), inputs / "part-a.parquet")
    pq.write_table(table.slice(5), inputs / "part-b.parquet")
    output = root / "out"
    result = run_cli(
        [
            "generate",
            "--input",
            str(inputs),
            "--output",
            str(output),
            *FAST,
            "--set",
            "generation.width=64",
            "--set",
            "generation.height=64",
            "--set",
            "output.rows_per_shard=3",
        ],
        sdray_env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {"root": root, "output": output, "result": result, "table": table, "input": inputs}


def test_every_row_once_with_status_and_error(generated):
    rows = {r["id"]: r for r in read_metadata(generated["output"])}
    assert len(rows) == len(ROWS) == len(read_metadata(generated["output"]))
    for row_id, row in rows.items():
        if row_id in INVALID:
            assert row["status"] == "error"
            assert INVALID[row_id] in row["error"]
            assert row["image_path"] is None and row["sha256"] is None
        else:
            assert row["status"] == "ok", row
            assert row["error"] is None
    assert "10 rows" not in generated["result"].stdout
    assert "6 images ok, 4 rows in error" in generated["result"].stdout
    # Invalid rows are reported (they cost no generation), with their messages.
    assert "4 invalid rows recorded with status=error" in generated["result"].stderr
    assert "bad-width: width=100: must be a positive multiple of 8" in generated["result"].stderr


def test_images_match_metadata(generated):
    output = generated["output"]
    for row in read_metadata(output):
        if row["status"] != "ok":
            continue
        data = (output / row["image_path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        assert Image.open(io.BytesIO(data)).size == (row["width"], row["height"])
        assert row["model"] == "tiny" and row["steps"] == 2


def test_parameters_defaults_and_carried_columns(generated):
    rows = {r["id"]: r for r in read_metadata(generated["output"])}
    assert rows["plain"]["scheduler"] == "ddim" and rows["plain"]["seed"] == 1
    assert rows["wide"]["width"] == 128 and rows["wide"]["height"] == 64
    assert rows["/abs/path"]["seed"] is not None  # derived
    assert rows["long"]["truncated"] is True and rows["plain"]["truncated"] is False
    for i, (row_id, *_rest, extra) in enumerate(ROWS):
        assert rows[row_id]["extra"] == extra
        assert rows[row_id]["score"] == float(i)


def test_nothing_lands_outside_the_output(generated):
    root, output = generated["root"], generated["output"]
    outside = [p for p in root.rglob("*") if output not in p.parents and p != output]
    assert sorted(p.relative_to(root).as_posix() for p in outside) == [
        "in",
        "in/part-a.parquet",
        "in/part-b.parquet",
    ]
    for path in output.rglob("*"):
        assert path.resolve().is_relative_to(output.resolve())
        assert "escape" not in path.name and "abs" not in path.name


def test_shards_and_manifest(generated):
    output = generated["output"]
    shards = list((output / "metadata").glob("*.parquet"))
    # 10 rows at 3 per shard: every shard is full but the run's last one.
    assert sorted(pq.read_metadata(s).num_rows for s in shards) == [1, 3, 3, 3]
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["counts"] == {"rows": 10, "ok": 6, "error": 4, "generated_this_run": 6}
    assert manifest["model"]["source"] == "tiny" and len(manifest["model"]["sha256"]) == 64
    assert manifest["config"]["generation"]["steps"] == 2
    assert {"ray", "torch", "diffusers", "sdray"} <= set(manifest["versions"])
    assert manifest["throughput"]["images_per_s"] > 0
    assert manifest["timings"]["wall_s"] > 0
    # Who made what: the model actors' running totals, carried by the units to the sink, add
    # up to the images the output holds (the 4 invalid rows never reached a model actor).
    actors, (node,) = manifest["actors"], manifest["nodes"]
    assert sum(a["images"] for a in actors) == node["images"] == 6
    assert sum(a["errors"] for a in actors) == node["errors"] == 0
    assert node["actors"] == len(actors) and all(a["busy_s"] > 0 for a in actors)


def test_same_rows_same_images_on_rerun_with_other_batching(generated, tmp_path, sdray_env):
    output = tmp_path / "again"
    result = run_cli(
        [
            "generate",
            "--input",
            str(generated["input"]),
            "--output",
            str(output),
            *FAST,
            "--set",
            "generation.width=64",
            "--set",
            "generation.height=64",
            "--set",
            "batch.batch_size=1",
            "--set",
            "batch.sort_by_shape=false",
        ],
        sdray_env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    first = {r["id"]: r for r in read_metadata(generated["output"])}
    second = {r["id"]: r for r in read_metadata(output)}
    assert first.keys() == second.keys()
    for row_id, row in first.items():
        assert row["seed"] == second[row_id]["seed"] and row["status"] == second[row_id]["status"]
        if row["status"] == "ok":
            a = np.asarray(Image.open(generated["output"] / row["image_path"]), np.float64)
            b = np.asarray(Image.open(output / second[row_id]["image_path"]), np.float64)
            mse = np.mean((a - b) ** 2)
            assert mse == 0 or 10 * np.log10(255**2 / mse) >= 40, row_id


def test_non_empty_output_is_refused(generated, sdray_env):
    result = run_cli(
        ["generate", "--input", str(generated["input"]), "--output", str(generated["output"])],
        sdray_env,
    )
    assert result.returncode != 0
    assert "--overwrite" in result.stderr and "--resume" in result.stderr
    assert "Traceback" not in result.stderr


def in_process(args, capsys):
    from sdray.cli import main

    code = main(args)
    return code, capsys.readouterr()


def test_duplicate_ids_become_error_rows_naming_the_row_that_keeps_them(
    tmp_path, ray_cluster, capsys
):
    source = tmp_path / "dupes.csv"
    source.write_text("id,prompt,width\na,x,64\nb,y,64\na,z,64\nc,w,64\nc,v,wide\n")
    output = tmp_path / "o"
    code, out = in_process(
        [
            *("generate", "--input", str(source), "--output", str(output), "--no-progress"),
            *("--set", "generation.steps=1", "--set", "generation.height=64"),
        ],
        capsys,
    )
    assert code == 0, out.err
    rows = read_metadata(output)
    assert sorted(r["prompt"] for r in rows) == ["v", "w", "x", "y", "z"]  # every row once
    ids = [r["id"] for r in rows if r["id"] is not None]
    assert sorted(ids) == ["a", "b", "c"]  # no two rows share an id
    by_prompt = {r["prompt"]: r for r in rows}
    for prompt in "xyw":
        assert by_prompt[prompt]["status"] == "ok"
    assert by_prompt["z"]["id"] is None and by_prompt["z"]["status"] == "error"
    assert by_prompt["z"]["error"] == "id='a': also the id of dupes.csv:0, which keeps it"
    assert by_prompt["v"]["error"] == (
        "width='wide': must be a positive multiple of 8; "
        "id='c': also the id of dupes.csv:3, which keeps it"
    )
    assert by_prompt["z"]["image_path"] is None and by_prompt["v"]["image_path"] is None
    assert "2 invalid rows recorded with status=error" in out.err
    assert "id='a': also the id of dupes.csv:0" in out.err


def test_table_without_prompt_column_refused(tmp_path, ray_cluster, capsys):
    source = tmp_path / "noprompt.jsonl"
    source.write_text('{"text": "a fox"}\n')
    code, out = in_process(
        ["generate", "--input", str(source), "--output", str(tmp_path / "o")], capsys
    )
    assert code == 2 and "no 'prompt' column" in out.err and "text" in out.err
    assert "Traceback" not in out.err


def test_config_errors_name_key_and_value(tmp_path, capsys):
    source = tmp_path / "p.csv"
    source.write_text("prompt\nx\n")
    code, out = in_process(
        [
            "generate",
            "--input",
            str(source),
            "--output",
            str(tmp_path / "o"),
            "--set",
            "generation.stepz=3",
        ],
        capsys,
    )
    assert code == 2 and "generation.stepz" in out.err
    code, out = in_process(
        [
            "generate",
            "--input",
            str(source),
            "--output",
            str(tmp_path / "o"),
            "--set",
            "batch.batch_size=zero",
        ],
        capsys,
    )
    assert code == 2 and "batch.batch_size = 'zero'" in out.err


def test_overwrite_keeps_the_old_output_when_the_job_cannot_run(generated, tmp_path, capsys):
    output = generated["output"]
    before = sorted(p.relative_to(output) for p in output.rglob("*"))
    code, out = in_process(
        ["generate", "--input", str(tmp_path / "typo.csv"), "--output", str(output), "--overwrite"],
        capsys,
    )
    assert code == 2 and "does not exist" in out.err
    assert sorted(p.relative_to(output) for p in output.rglob("*")) == before


def test_missing_input_is_a_clear_error(tmp_path, capsys):
    code, out = in_process(
        ["generate", "--input", str(tmp_path / "nope.csv"), "--output", str(tmp_path / "o")], capsys
    )
    assert code == 2 and "does not exist" in out.err


def test_csv_and_jsonl_inputs(tmp_path, ray_cluster, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.csv").write_text("prompt,width,tag\na fox,64,x\n,64,y\n")
    (tmp_path / "in" / "b.jsonl").write_text(
        '{"prompt": "a cat", "width": 64, "tag": "z"}\n{"prompt": "a dog", "width": "wide", "tag": "w"}\n'
    )
    code, out = in_process(
        [
            "generate",
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(tmp_path / "o"),
            "--no-progress",
            "--set",
            "generation.steps=1",
            "--set",
            "generation.height=64",
        ],
        capsys,
    )
    assert code == 0, out.err
    rows = {r["id"]: r for r in read_metadata(tmp_path / "o")}
    assert set(rows) == {"a.csv:0", "a.csv:1", "b.jsonl:0", "b.jsonl:1"}
    assert rows["a.csv:1"]["status"] == "error" and "prompt" in rows["a.csv:1"]["error"]
    assert rows["b.jsonl:1"]["status"] == "error" and "width='wide'" in rows["b.jsonl:1"]["error"]
    assert rows["b.jsonl:0"]["status"] == "ok" and rows["b.jsonl:0"]["tag"] == "z"
    assert os.path.exists(tmp_path / "o" / rows["a.csv:0"]["image_path"])


def test_a_ray_that_sdray_starts_keeps_room_for_idle_task_workers(tmp_path):
    """A driver without RAY_ADDRESS starts its own Ray: its raylet (whose environment every
    worker inherits) was started with the larger idle-worker limit, and the driver's own
    environment is as it was."""
    import subprocess
    import sys

    from sdray.batch.cluster import WORKER_POOL_ENV, worker_pool_size

    script = (
        "import json, os, ray\n"
        "from sdray.batch.job import ensure_ray\n"
        "ensure_ray()\n"
        f"seen = ray.get(ray.remote(lambda: os.environ.get({WORKER_POOL_ENV!r})).remote())\n"
        f"print(json.dumps([seen, os.environ.get({WORKER_POOL_ENV!r})]))\n"
        "ray.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", WORKER_POOL_ENV)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    worker, driver = json.loads(done.stdout.strip().splitlines()[-1])
    assert worker == str(worker_pool_size())
    assert driver is None

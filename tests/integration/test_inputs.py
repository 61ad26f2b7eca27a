"""`sdray generate` on inputs whose files disagree on column types, and CSV text that looks numeric."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from .cli import read_metadata, run_cli

pytestmark = pytest.mark.integration

FAST = [
    *("--set", "generation.steps=1"),
    *("--set", "generation.width=64"),
    *("--set", "generation.height=64"),
    *("--set", "batch.min_actors=1"),
    *("--set", "batch.max_actors=1"),
    "--no-progress",
]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, sdray_env):
    """a.parquet (tag, width int64), b.csv (tag, width text), c.jsonl, generated in one run."""
    root = tmp_path_factory.mktemp("inputs")
    inputs = root / "in"
    inputs.mkdir()
    pq.write_table(
        pa.table(
            {
                "id": ["a1", "a2"],
                "prompt": ["a red fox", "an owl"],
                "tag": pa.array([1, 2], pa.int64()),
                "width": pa.array([64, 64], pa.int64()),
            }
        ),
        inputs / "a.parquet",
    )
    (inputs / "b.csv").write_text("id,prompt,tag,width\n007,123,red,64\n7,a cat,NA,wide\n")
    (inputs / "c.jsonl").write_text(
        json.dumps({"id": 8, "prompt": "a dog", "tag": [1, 2], "width": 64}) + "\n"
    )
    output = root / "out"
    result = run_cli(
        ["generate", "--input", str(inputs), "--output", str(output), *FAST], sdray_env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {"output": output, "result": result}


def test_every_row_once_with_carried_tag_as_text(mixed):
    rows = read_metadata(mixed["output"])
    by_id = {r["id"]: r for r in rows}
    assert len(rows) == len(by_id) == 5
    assert {k: r["tag"] for k, r in by_id.items()} == {
        "a1": "1",
        "a2": "2",
        "007": "red",
        "7": "NA",
        "8": "[1, 2]",
    }
    assert {k for k, r in by_id.items() if r["status"] == "ok"} == {"a1", "a2", "007", "8"}
    assert by_id["007"]["prompt"] == "123" and by_id["007"]["width"] == 64
    assert by_id["7"]["status"] == "error" and "width='wide'" in by_id["7"]["error"]
    assert by_id["7"]["image_path"] is None
    assert "4 images ok, 1 rows in error" in mixed["result"].stdout


def test_number_and_text_ids_across_files_are_duplicates(tmp_path, sdray_env):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.jsonl").write_text('{"id": 7, "prompt": "a"}\n{"id": "007", "prompt": "b"}\n')
    (inputs / "b.csv").write_text("id,prompt\n7,c\n")
    result = run_cli(
        ["generate", "--input", str(inputs), "--output", str(tmp_path / "out"), *FAST],
        sdray_env,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["prompt"]: r for r in read_metadata(tmp_path / "out")}
    assert {p: r["id"] for p, r in rows.items()} == {"a": "7", "b": "007", "c": None}
    assert rows["c"]["status"] == "error"
    assert rows["c"]["error"] == "id='7': also the id of a.jsonl:0, which keeps it"
    assert rows["a"]["status"] == rows["b"]["status"] == "ok"

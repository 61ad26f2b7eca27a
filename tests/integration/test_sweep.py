"""`sdray sweep` end to end on the tiny model: metadata, contact sheets, gallery in Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
from PIL import Image

from .cli import read_metadata, run_cli

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
FAST = ["--set", "batch.min_actors=2", "--set", "batch.max_actors=2"]
# Hive partitions by an axis: sheets and gallery must read axis values back from paths.
PARTITIONED = ["--set", "output.partition_by=[steps]"]
PROMPTS_CSV = (
    "id,prompt,style\nfox,a red fox in the snow,photo\nhouse,a lighthouse at dusk,painting\n"
)
SPEC = """
name: it-sweep
prompts_file: prompts.csv
negative_prompt: blurry
axes:
  guidance_scale: [1.0, 7.5]
  steps: {start: 2, stop: 4}
  seed: [0, 1]
  width: 64
  height: 64
sheet: {rows: steps, cols: guidance_scale}
"""
GUIDANCE, STEPS, SEEDS = [1.0, 7.5], [2, 3], [0, 1]
PROMPTS = {"fox": ("a red fox in the snow", "photo"), "house": ("a lighthouse at dusk", "painting")}


@pytest.fixture(scope="module")
def swept(tmp_path_factory, sdray_env):
    """One sweep run through the CLI, shared by the tests below."""
    root = tmp_path_factory.mktemp("sweep")
    (root / "prompts.csv").write_text(PROMPTS_CSV)
    (root / "spec.yaml").write_text(SPEC)
    output = root / "out"
    result = run_cli(
        ["sweep", str(root / "spec.yaml"), "--output", str(output), *FAST, *PARTITIONED],
        sdray_env,
    )
    assert result.returncode == 0, result.stderr
    return {"root": root, "output": output, "stdout": result.stdout, "env": sdray_env}


def expected_ids() -> set[str]:
    return {
        f"{p}/guidance_scale={g!r}/steps={s}/seed={seed}"
        for p in PROMPTS
        for g in GUIDANCE
        for s in STEPS
        for seed in SEEDS
    }


def test_one_metadata_row_per_combination_with_axis_values(swept):
    rows = read_metadata(swept["output"])
    assert sorted(r["id"] for r in rows) == sorted(expected_ids())
    for row in rows:
        prompt_id, guidance, steps, seed = row["id"].split("/")
        assert row["status"] == "ok", row["error"]
        assert row["guidance_scale"] == float(guidance.split("=")[1])
        assert int(row["steps"]) == int(steps.split("=")[1])
        assert row["seed"] == int(seed.split("=")[1])
        assert (row["width"], row["height"], row["negative_prompt"]) == (64, 64, "blurry")
        assert (row["prompt"], row["style"]) == PROMPTS[prompt_id]  # carried from prompts_file
        assert row["prompt_id"] == prompt_id
        assert (swept["output"] / row["image_path"]).is_file()
    assert "16 images ok, 0 rows in error" in swept["stdout"]
    assert "4 contact sheets" in swept["stdout"]


def test_expansion_is_kept_in_the_output(swept):
    table = pads.dataset(swept["output"] / "sweep.parquet").to_table()
    assert table.num_rows == 16
    assert {"guidance_scale", "steps", "seed", "width", "height", "prompt_index"} <= set(
        table.column_names
    )
    record = json.loads((swept["output"] / "sweep.json").read_text())
    assert (record["rows"], record["prompts"], record["combinations"]) == (16, 2, 8)


def test_contact_sheets_grid_dimensions_and_labels(swept):
    output = swept["output"]
    index = json.loads((output / "contact_sheets" / "index.json").read_text())["sheets"]
    assert len(index) == 4  # 2 prompts x 2 seeds; steps x guidance laid out in each
    assert {(s["prompt_index"], s["fixed"]["seed"]) for s in index} == {
        (p, seed) for p in (0, 1) for seed in SEEDS
    }
    by_id = {r["id"]: r for r in read_metadata(output)}
    for entry in index:
        layout = json.loads((output / entry["file"]).with_suffix(".json").read_text())
        sheet = Image.open(output / entry["file"]).convert("RGB")
        assert list(sheet.size) == layout["size"]
        assert sheet.width >= 2 * 64 and sheet.height >= 2 * 64
        assert [label["text"] for label in layout["col_labels"]] == ["1.0", "7.5"]
        assert [label["text"] for label in layout["row_labels"]] == ["2", "3"]
        assert layout["title"][0] == entry["prompt"]
        assert f"seed={entry['fixed']['seed']}" in layout["title"][1]
        assert layout["title"][2] == "rows: steps    cols: guidance_scale"
        for label in layout["col_labels"] + layout["row_labels"]:
            assert np.asarray(sheet.crop(tuple(label["box"])).convert("L")).min() < 128
        assert len(layout["cells"]) == 4
        for cell in layout["cells"]:
            row = by_id[cell["id"]]
            assert int(row["steps"]) == STEPS[cell["row"]]
            assert row["guidance_scale"] == GUIDANCE[cell["col"]]
            assert row["seed"] == entry["fixed"]["seed"]
            original = np.asarray(Image.open(output / row["image_path"]).convert("RGB"))
            assert (np.asarray(sheet.crop(tuple(cell["box"]))) == original).all()


def chromium(args: list[str], url: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Headless Chromium on a file:// URL; skipped only outside CI when it is not installed."""
    if not os.path.exists(CHROMIUM):
        if "CI" not in os.environ:
            pytest.skip(f"{CHROMIUM} is not installed (Debian package 'chromium'); CI installs it")
        pytest.fail(f"{CHROMIUM} is missing in CI: install the Debian package 'chromium'")
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=3000",
        *args,
        url,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def page_url(output: Path, query: str = "") -> str:
    return (output / "index.html").resolve().as_uri() + query


def visible_cells(dom: str) -> list[str]:
    return [c for c in re.findall(r"<figure [^>]*>", dom) if " hidden" not in c]


def test_gallery_renders_the_grid_in_chromium(swept, tmp_path):
    output = swept["output"]
    shot = tmp_path / "gallery.png"
    chromium([f"--screenshot={shot}", "--window-size=1280,1000"], page_url(output), tmp_path)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (1000, 1280)
    background = np.array([0xF4, 0xF4, 0xF5])
    assert (np.abs(pixels.astype(int) - background).sum(axis=2) > 30).mean() > 0.2  # not blank
    colors = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert colors > 2000, colors  # the thumbnails are drawn, not empty boxes

    dom = chromium(["--dump-dom"], page_url(output), tmp_path).stdout
    assert dom.count('class="thumb"') == 16
    assert len(visible_cells(dom)) == 16
    assert "16 of 16 shown" in dom
    for name in ("prompt_index", "guidance_scale", "steps", "seed"):
        assert f'<select data-filter="{name}">' in dom
    assert '<select data-filter="width">' not in dom  # one value: nothing to filter
    for thumb in re.findall(r'class="thumb" src="([^"]+)"', dom):
        assert (output / urllib.parse.unquote(thumb)).is_file()


def test_gallery_filters_and_metadata_links(swept, tmp_path):
    output = swept["output"]
    dom = chromium(["--dump-dom"], page_url(output, "?steps=2&guidance_scale=7.5"), tmp_path).stdout
    cells = visible_cells(dom)
    assert len(cells) == 4 and "4 of 16 shown" in dom
    assert all('data-steps="2"' in c and 'data-guidance_scale="7.5"' in c for c in cells)

    row = next(
        r for r in read_metadata(output) if r["id"] == "house/guidance_scale=1.0/steps=3/seed=1"
    )
    anchor = "#id=" + urllib.parse.quote(row["id"], safe="")
    assert f'href="{anchor}"' in dom
    dom = chromium(["--dump-dom"], page_url(output, anchor), tmp_path).stdout
    detail = dom.split('id="detail"', 1)[1]
    assert not detail.startswith(" hidden")
    assert row["sha256"] in detail and "painting" in detail  # every column, carried ones too


def test_non_empty_output_is_refused_before_anything_is_written(swept, tmp_path):
    from sdray.config import load_config
    from sdray.errors import SdrayError
    from sdray.sweep import run_sweep

    output = tmp_path / "taken"
    output.mkdir()
    (output / "notes.txt").write_text("not sdray's")
    with pytest.raises(SdrayError, match="is not empty"):
        run_sweep(str(swept["root"] / "spec.yaml"), str(output), load_config())
    assert sorted(p.name for p in output.iterdir()) == ["notes.txt"]


def test_resume_with_another_spec_is_refused(swept, tmp_path):
    from sdray.config import load_config
    from sdray.errors import SdrayError
    from sdray.sweep import run_sweep

    output = tmp_path / "out"
    shutil.copytree(swept["output"], output)
    changed = swept["root"] / "changed.yaml"
    changed.write_text(SPEC.replace("seed: [0, 1]", "seed: [0, 1, 2]"))
    config = load_config(None, FAST[1::2] + PARTITIONED[1::2])
    with pytest.raises(SdrayError, match="expanded from another spec"):
        run_sweep(str(changed), str(output), config, resume=True, progress=False)
    assert (output / "sweep.parquet").read_bytes() == (
        swept["output"] / "sweep.parquet"
    ).read_bytes()


def test_resume_with_another_sheet_layout_redraws_only_the_new_sheets(swept, tmp_path):
    from sdray.config import load_config
    from sdray.sweep import run_sweep

    output = tmp_path / "out"
    shutil.copytree(swept["output"], output)
    old = {p.name for p in (output / "contact_sheets").glob("*.png")}
    changed = swept["root"] / "relaid.yaml"
    changed.write_text(
        SPEC.replace(
            "sheet: {rows: steps, cols: guidance_scale}", "sheet: {rows: seed, cols: steps}"
        )
    )
    config = load_config(None, FAST[1::2] + PARTITIONED[1::2])
    summary = run_sweep(str(changed), str(output), config, resume=True, progress=False)
    assert summary.sheets == 4  # 2 prompts x 2 guidance scales
    new = {p.name for p in (output / "contact_sheets").glob("*.png")}
    assert new.isdisjoint(old) and all("guidance_scale-" in name for name in new)
    index = json.loads((output / "contact_sheets" / "index.json").read_text())
    assert {Path(s["file"]).name for s in index["sheets"]} == new
    record = json.loads((output / "sweep.json").read_text())
    assert record["sheet"]["rows"] == "seed"

"""Sweeps into webdataset and parquet outputs: sheets and thumbnails drawn from image shards."""

from __future__ import annotations

import io
import json
import re
import tarfile
import urllib.parse
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sdray.requests import derive_seed
from tests.integration.test_sweep import FAST, run_cli

pytestmark = pytest.mark.integration

GRID_SPEC = """
name: grid-webdataset
prompts: ["a red fox in the snow", "a lighthouse at dusk"]
axes:
  guidance_scale: [1.0, 7.5]
  steps: [2, 3]
  width: 64
  height: 64
sheet: {rows: steps, cols: guidance_scale}
gallery: {max_images: 5}
"""
ZIP_SPEC = """
name: zip-parquet
prompts: ["a red fox in the snow", "a lighthouse at dusk"]
mode: zip
axes:
  guidance_scale: [1.0, 4.0, 7.5]
  steps: [2, 3, 4]
  seed: 5
  width: 64
  height: 64
"""


def sweep(tmp_path_factory, env, spec: str, fmt: str) -> Path:
    root = tmp_path_factory.mktemp(fmt)
    (root / "spec.yaml").write_text(spec)
    output = root / "out"
    args = ["--set", f"output.format={fmt}", "--set", "output.rows_per_shard=2", *FAST]
    result = run_cli(["sweep", str(root / "spec.yaml"), "--output", str(output), *args], env)
    assert result.returncode == 0, result.stderr
    return output


def metadata(output: Path) -> list[dict]:
    return pads.dataset(output / "metadata", format="parquet").to_table().to_pylist()


def stored_image(output: Path, image_path: str) -> np.ndarray:
    """A row's image read from its shard, independently of sdray's reader."""
    container, member = image_path.split("#")
    if container.endswith(".tar"):
        with tarfile.open(output / container) as tar:
            data = tar.extractfile(member).read()
    else:
        table = pq.read_table(output / container).to_pylist()
        data = next(r["image"] for r in table if r["key"] == member)
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def check_sheet_cells(output: Path, rows: dict[str, dict]) -> int:
    cells = 0
    for entry in json.loads((output / "contact_sheets" / "index.json").read_text())["sheets"]:
        layout = json.loads((output / entry["file"]).with_suffix(".json").read_text())
        sheet = Image.open(output / entry["file"]).convert("RGB")
        for cell in layout["cells"]:
            original = stored_image(output, rows[cell["id"]]["image_path"])
            assert (np.asarray(sheet.crop(tuple(cell["box"]))) == original).all()
            cells += 1
    return cells


@pytest.fixture(scope="module")
def webdataset_output(tmp_path_factory, sdray_env) -> Path:
    return sweep(tmp_path_factory, sdray_env, GRID_SPEC, "webdataset")


@pytest.fixture(scope="module")
def parquet_output(tmp_path_factory, sdray_env) -> Path:
    return sweep(tmp_path_factory, sdray_env, ZIP_SPEC, "parquet")


def test_webdataset_sheets_show_the_stored_images(webdataset_output):
    rows = {r["id"]: r for r in metadata(webdataset_output)}
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows.values())
    assert all(r["image_path"].split("#")[0].endswith(".tar") for r in rows.values())
    assert len({r["image_path"].split("#")[0] for r in rows.values()}) >= 4  # several shards
    assert check_sheet_cells(webdataset_output, rows) == 8


def test_without_a_seed_axis_each_prompt_keeps_one_seed(webdataset_output):
    rows = metadata(webdataset_output)
    for key, prompt in (("p0", "a red fox in the snow"), ("p1", "a lighthouse at dusk")):
        assert {r["seed"] for r in rows if r["prompt"] == prompt} == {derive_seed(0, key)}


def test_gallery_shows_at_most_max_images_with_their_thumbnails(webdataset_output):
    page = (webdataset_output / "index.html").read_text()
    thumbs = re.findall(r'class="thumb" src="([^"]+)"', page)
    assert len(thumbs) == 5 and "showing 5 of 8 rows" in page
    for thumb in thumbs:
        image = Image.open(webdataset_output / urllib.parse.unquote(thumb))
        assert image.size == (64, 64) and image.format == "JPEG"
    on_disk = list((webdataset_output / "gallery").rglob("*.jpg"))
    assert len(on_disk) == 5  # none for rows the page does not show
    embedded = page.split('id="sdray-rows">')[1].split("</script>")[0]
    assert len({r["prompt_index"] for r in json.loads(embedded)}) == 2  # spread over prompts


def test_parquet_zip_sweep_draws_one_strip_per_prompt(parquet_output):
    rows = {r["id"]: r for r in metadata(parquet_output)}
    assert len(rows) == 6 and {r["seed"] for r in rows.values()} == {5}
    assert all(r["image_path"].split("#")[0].endswith(".parquet") for r in rows.values())
    assert check_sheet_cells(parquet_output, rows) == 6
    index = json.loads((parquet_output / "contact_sheets" / "index.json").read_text())
    assert index["count"] == 2
    for entry in index["sheets"]:
        layout = json.loads((parquet_output / entry["file"]).with_suffix(".json").read_text())
        assert layout["layout"] == "strip"
        assert [(c["row"], c["col"]) for c in layout["cells"]] == [(0, 0), (0, 1), (0, 2)]
        assert layout["col_labels"][2]["text"] == "guidance_scale 7.5\nsteps 4"
    page = (parquet_output / "index.html").read_text()
    assert page.count('class="thumb"') == 6
    assert len(list((parquet_output / "gallery").rglob("*.jpg"))) == 6

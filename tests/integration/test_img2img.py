"""Image-to-image and inpainting through `sdray generate`: init images and masks from paths
relative to the table (and bytes in it), every kind of bad input as an error row naming the field,
text-to-image rows beside them, filmstrips of the image emerging in every output format."""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sdray.images import read_infotext

from .cli import read_metadata, run_cli

pytestmark = pytest.mark.integration

PICTURES = __import__("pathlib").Path(__file__).resolve().parents[2] / "configs/examples/pictures"
FAST = ["--set", "generation.steps=4", "--set", "batch.batch_size=4"]


def png(size=(64, 64), colour=(200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def table_dir(tmp_path_factory):
    """A prompt table whose rows point at pictures beside it, or carry their bytes."""
    root = tmp_path_factory.mktemp("img2img")
    pictures = root / "pictures"
    shutil.copytree(PICTURES, pictures)
    (pictures / "notes.txt").write_text("not an image")
    (pictures / "truncated.png").write_bytes((pictures / "red-circle.png").read_bytes()[:80])
    Image.new("RGB", (200, 200), (9, 9, 9)).save(pictures / "big.png")
    rows = [
        # id, init_image (path or bytes), mask_image, strength, width, height
        ("txt", None, None, None, 64, 64),
        ("img", "pictures/red-circle.png", None, 0.6, 64, 64),
        ("img-bytes", png(), None, 0.5, 64, 64),
        ("img-own-size", "pictures/green-triangle.png", None, 0.75, None, None),
        ("inpaint", "pictures/red-circle.png", "pictures/mask-right-half.png", 1.0, 64, 64),
        ("missing", "pictures/nope.png", None, 0.5, 64, 64),
        ("not-an-image", "pictures/notes.txt", None, 0.5, 64, 64),
        ("truncated", "pictures/truncated.png", None, 0.5, 64, 64),
        ("too-many-pixels", "pictures/big.png", None, 0.5, 64, 64),
        ("mask-size", "pictures/green-triangle.png", "pictures/mask-centre.png", 0.9, 64, 64),
        ("strength-zero", "pictures/red-circle.png", None, 0.0, 64, 64),
        ("strength-high", "pictures/red-circle.png", None, 1.5, 64, 64),
        ("too-few-steps", "pictures/red-circle.png", None, 0.1, 64, 64),
        ("mask-alone", None, "pictures/mask-centre.png", None, 64, 64),
    ]
    paths = [r[1] if isinstance(r[1], str) else None for r in rows]
    table = pa.table(
        {
            "id": [r[0] for r in rows],
            "prompt": [f"a blue square, {r[0]}" for r in rows],
            "seed": list(range(len(rows))),
            "init_image": paths,
            "mask_image": [r[2] for r in rows],
            "strength": [r[3] for r in rows],
            "width": [r[4] for r in rows],
            "height": [r[5] for r in rows],
        }
    )
    pq.write_table(table, root / "rows.parquet")
    with_bytes = table.filter(pa.array([r[0] == "img-bytes" for r in rows]))
    init = pa.array([png()], pa.binary())
    with_bytes = with_bytes.set_column(3, "init_image", init)
    pq.write_table(with_bytes, root / "bytes.parquet")  # a second file, whose column is bytes
    table = table.filter(pa.array([r[0] != "img-bytes" for r in rows]))
    pq.write_table(table, root / "rows.parquet")
    return root


@pytest.fixture(scope="module")
def generated(table_dir, sdray_env):
    output = table_dir / "out"
    result = run_cli(
        [
            "generate",
            "--input",
            str(table_dir / "rows.parquet"),
            "--output",
            str(output),
            *FAST,
            "--set",
            "generation.max_input_pixels=20000",
            "--set",
            "output.preview_every=2",
        ],
        sdray_env,
    )
    assert result.returncode == 0, result.stderr
    return {r["id"]: r for r in read_metadata(output)}, output


def test_every_row_once_with_its_mode(generated):
    rows, _ = generated
    assert len(rows) == 13  # the rows.parquet rows, each exactly once
    assert rows["txt"]["mode"] == "txt2img" and rows["txt"]["strength"] is None
    assert rows["img"]["mode"] == "img2img" and rows["img"]["strength"] == 0.6
    assert rows["inpaint"]["mode"] == "inpaint"
    for name in ("txt", "img", "img-own-size", "inpaint"):
        assert rows[name]["status"] == "ok", rows[name]["error"]


def test_inputs_are_recorded_by_digest_and_size(generated):
    rows, output = generated
    source = (PICTURES / "red-circle.png").read_bytes()
    assert rows["img"]["init_sha256"] == hashlib.sha256(source).hexdigest()
    mask = (PICTURES / "mask-right-half.png").read_bytes()
    assert rows["inpaint"]["mask_sha256"] == hashlib.sha256(mask).hexdigest()
    # Without a size, the picture's: 100x76 rounded down to multiples of 8.
    own = rows["img-own-size"]
    assert (own["width"], own["height"]) == (96, 72)
    image = (output / own["image_path"]).read_bytes()
    assert Image.open(io.BytesIO(image)).size == (96, 72)
    assert "Denoising strength: 0.75" in read_infotext(image)


@pytest.mark.parametrize(
    "row, message",
    [
        ("missing", "init_image='pictures/nope.png': no such file"),
        ("not-an-image", "init_image='pictures/notes.txt': is not a readable image"),
        ("truncated", "init_image='pictures/truncated.png': is not a readable image"),
        ("too-many-pixels", "init_image='pictures/big.png': 200x200 is over the limit of 20000"),
        ("mask-size", "mask_image='pictures/mask-centre.png': its size 128x128 differs"),
        ("strength-zero", "strength=0.0: must be a number in (0, 1]"),
        ("strength-high", "strength=1.5: must be a number in (0, 1]"),
        ("too-few-steps", "strength=0.1: with steps=4 leaves int(steps x strength) = 0"),
        ("mask-alone", "mask_image='pictures/mask-centre.png': needs an init_image"),
    ],
)
def test_bad_inputs_are_error_rows_naming_the_field(generated, row, message):
    rows, _ = generated
    assert rows[row]["status"] == "error" and rows[row]["image_path"] is None
    assert message in rows[row]["error"]


def test_filmstrips_show_each_previewed_step_and_the_final_image(generated):
    rows, output = generated
    for name, run in (("txt", 4), ("img", 2), ("inpaint", 4)):  # img: int(4 x 0.6) steps run
        row = rows[name]
        strip = Image.open(output / row["preview_path"])
        frames = run // 2 + 1  # every 2nd step, then the final image
        assert strip.width == frames * 64 + (frames - 1) * 2, name
        final = Image.open(output / row["image_path"]).convert("RGB")
        last = strip.crop((strip.width - 64, 0, strip.width, 64)).convert("RGB")
        assert list(last.getdata()) == list(final.getdata())
    assert rows["missing"]["preview_path"] is None


def test_image_bytes_in_the_table(table_dir, sdray_env, tmp_path):
    output = tmp_path / "out"
    result = run_cli(
        ["generate", "--input", str(table_dir / "bytes.parquet"), "--output", str(output), *FAST],
        sdray_env,
    )
    assert result.returncode == 0, result.stderr
    (row,) = read_metadata(output)
    assert row["status"] == "ok" and row["mode"] == "img2img" and row["init_image"] is None
    assert row["init_sha256"] == hashlib.sha256(png()).hexdigest()


@pytest.mark.parametrize("kind", ["webdataset", "parquet"])
def test_filmstrips_in_every_output_format(table_dir, sdray_env, tmp_path, kind):
    source = pq.read_table(table_dir / "rows.parquet").slice(0, 2)  # txt and img
    pq.write_table(source, table_dir / f"two-{kind}.parquet")
    output = tmp_path / "out"
    result = run_cli(
        [
            "generate",
            "--input",
            str(table_dir / f"two-{kind}.parquet"),
            "--output",
            str(output),
            *FAST,
            "--set",
            f"output.format={kind}",
            "--set",
            "output.preview_every=2",
        ],
        sdray_env,
    )
    assert result.returncode == 0, result.stderr
    for row in read_metadata(output):
        container, _, member = row["preview_path"].partition("#")
        if kind == "webdataset":
            with tarfile.open(output / container) as tar:
                data = tar.extractfile(member).read()
        else:
            key = member.removesuffix("#strip")
            table = pq.read_table(output / container).to_pylist()
            data = next(r["strip"] for r in table if r["key"] == key)
        strip = Image.open(io.BytesIO(data))
        assert strip.height == 64 + 14 and strip.width > 64


def test_sweep_over_strength_shows_filmstrips_in_the_gallery(tmp_path, sdray_env):
    """strength is an axis; one init image for every row; a row's strip opens with it."""
    import json
    import urllib.parse

    from .test_sweep import chromium, page_url

    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: strength\nprompts: [a blue square]\n"
        f"init_image: {PICTURES / 'red-circle.png'}\n"
        "axes:\n  strength: [0.5, 1.0]\n  guidance_scale: [1.0, 5.0]\n"
        "  width: 64\n  height: 64\n  steps: 4\n"
    )
    output = tmp_path / "out"
    result = run_cli(
        ["sweep", str(spec), "--output", str(output), "--set", "output.preview_every=2"],
        sdray_env,
    )
    assert result.returncode == 0, result.stderr
    rows = read_metadata(output)
    assert sorted((r["strength"], r["guidance_scale"]) for r in rows) == [
        (0.5, 1.0),
        (0.5, 5.0),
        (1.0, 1.0),
        (1.0, 5.0),
    ]
    assert {r["mode"] for r in rows} == {"img2img"} and all(r["preview_path"] for r in rows)
    sheets = json.loads((output / "contact_sheets" / "index.json").read_text())
    assert sheets
    row = rows[0]
    anchor = "#id=" + urllib.parse.quote(row["id"], safe="")
    dom = chromium(["--dump-dom"], page_url(output, anchor), tmp_path).stdout
    detail = dom.split('id="detail"', 1)[1]
    (strip,) = __import__("re").findall(r'<img src="([^"]+)" class="strip"', detail)
    assert (output / strip).is_file() and Image.open(output / strip).width > 64

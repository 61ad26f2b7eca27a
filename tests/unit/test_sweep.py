"""Sweep specs: validation, grid/zip/random expansion, ranges, streaming; sheets and page drawing."""

from __future__ import annotations

import io
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sdray.config import GenerationConfig
from sdray.requests import derive_seed
from sdray.sweep import (
    SweepSpecError,
    check_against_config,
    grid_positions,
    load_spec,
    make_axis,
    permute,
    plan_expansion,
    prompt_keys,
    spec_from_dict,
    write_expansion,
)

REPO = Path(__file__).resolve().parents[2]


def spec(**fields):
    return spec_from_dict({"name": "t", "prompts": ["a fox", "a lighthouse"], **fields})


def expand(sweep, chunk_rows: int = 7, base_seed: int = 0) -> list[dict]:
    expansion = plan_expansion(sweep, base_seed=base_seed)
    table = pa.concat_tables(expansion.chunks(chunk_rows))
    assert table.num_rows == expansion.rows
    assert table.schema == expansion.schema()
    return table.to_pylist()


def test_grid_is_every_combination_per_prompt():
    rows = expand(
        spec(
            negative_prompt="blurry",
            axes={"guidance_scale": [1, 7.5], "steps": [2, 4, 8], "scheduler": ["ddim", "euler"]},
        )
    )
    assert len(rows) == 2 * 2 * 3 * 2
    combos = {(r["prompt"], r["guidance_scale"], r["steps"], r["scheduler"]) for r in rows}
    assert combos == set(
        itertools.product(["a fox", "a lighthouse"], [1.0, 7.5], [2, 4, 8], ["ddim", "euler"])
    )
    assert {r["negative_prompt"] for r in rows} == {"blurry"}
    assert [r["prompt_index"] for r in rows] == [0] * 12 + [1] * 12
    assert rows[0]["id"] == "p0/guidance_scale=1.0/steps=2/scheduler=ddim"
    assert rows[1]["id"] == "p0/guidance_scale=1.0/steps=2/scheduler=euler"  # last axis fastest
    assert len({r["id"] for r in rows}) == len(rows)
    assert isinstance(rows[0]["guidance_scale"], float) and isinstance(rows[0]["steps"], int)


def test_single_values_fix_a_parameter_and_stay_out_of_ids():
    rows = expand(spec(axes={"steps": [2, 3], "width": 64, "height": [64]}))
    assert {(r["width"], r["height"]) for r in rows} == {(64, 64)}
    assert rows[0]["id"] == "p0/steps=2"


def test_no_axes_gives_one_row_per_prompt():
    rows = expand(spec())
    assert [(r["id"], r["prompt"]) for r in rows] == [("p0", "a fox"), ("p1", "a lighthouse")]


@pytest.mark.parametrize(
    ("axis", "raw", "values"),
    [
        ("steps", {"start": 10, "stop": 50, "step": 10}, [10, 20, 30, 40]),
        ("seed", {"start": 0, "stop": 4}, [0, 1, 2, 3]),
        ("steps", {"start": 8, "stop": 2, "step": -3}, [8, 5]),
        ("guidance_scale", {"start": 1, "stop": 2, "step": 0.25}, [1.0, 1.25, 1.5, 1.75]),
        (
            "guidance_scale",
            {"start": 0, "stop": 1, "step": 0.1},
            [round(i / 10, 1) for i in range(10)],
        ),
        ("width", {"start": 64, "stop": 129, "step": 32}, [64, 96, 128]),
        ("seed", {"start": 5, "stop": 6}, [5]),
    ],
)
def test_ranges_exclude_stop_like_python(axis, raw, values):
    rows = expand(spec_from_dict({"name": "t", "prompts": ["x"], "axes": {axis: raw}}))
    assert [r[axis] for r in rows] == values


def test_huge_integer_range_stays_lazy():
    sweep = spec_from_dict(
        {"name": "t", "prompts": ["x"], "axes": {"seed": {"start": 0, "stop": 10**15}}}
    )
    assert sweep.combinations() == 10**15
    first = next(plan_expansion(sweep).chunks(4))
    assert first.column("seed").to_pylist() == [0, 1, 2, 3]


def test_zip_pairs_values_and_broadcasts_single_ones():
    rows = expand(
        spec(mode="zip", axes={"guidance_scale": [1, 5, 9], "steps": [2, 3, 4], "width": 64})
    )
    assert len(rows) == 2 * 3
    assert [(r["guidance_scale"], r["steps"], r["width"]) for r in rows[:3]] == [
        (1.0, 2, 64),
        (5.0, 3, 64),
        (9.0, 4, 64),
    ]
    assert rows[3]["prompt"] == "a lighthouse"


RANDOM_AXES = {
    "guidance_scale": {"start": 1, "stop": 11, "step": 1},
    "steps": [2, 3, 4, 5],
    "scheduler": ["ddim", "euler", "dpmpp_2m"],
    "seed": {"start": 0, "stop": 1000},
}


def test_random_draws_distinct_grid_combinations_per_prompt():
    rows = expand(spec(mode="random", samples=500, seed=7, axes=RANDOM_AXES))
    assert len(rows) == 2 * 500
    for prompt in ("a fox", "a lighthouse"):
        mine = [r for r in rows if r["prompt"] == prompt]
        combos = {(r["guidance_scale"], r["steps"], r["scheduler"], r["seed"]) for r in mine}
        assert len(combos) == 500  # no combination drawn twice
        assert {r["guidance_scale"] for r in mine} <= {float(g) for g in range(1, 11)}
        assert {r["steps"] for r in mine} == {2, 3, 4, 5}
        assert all(0 <= r["seed"] < 1000 for r in mine)
    # Each prompt draws its own combinations.
    assert [r["seed"] for r in rows[:500]] != [r["seed"] for r in rows[500:]]
    # Roughly uniform: every scheduler gets about a third of 1000 draws.
    counts = {s: sum(r["scheduler"] == s for r in rows) for s in ("ddim", "euler", "dpmpp_2m")}
    assert all(250 < c < 420 for c in counts.values()), counts


def test_random_is_deterministic_whatever_the_chunking():
    def run(seed, chunk_rows):
        sweep = spec(mode="random", samples=300, seed=seed, axes=RANDOM_AXES)
        return [r["id"] for r in expand(sweep, chunk_rows)]

    first = run(7, 1000)
    assert run(7, 13) == first
    assert run(7, 1) == first
    assert run(8, 1000) != first


def test_random_can_draw_the_whole_grid():
    rows = expand(spec(mode="random", samples=6, axes={"steps": [2, 3], "seed": [0, 1, 2]}))
    per_prompt = {(r["steps"], r["seed"]) for r in rows if r["prompt_index"] == 0}
    assert per_prompt == set(itertools.product([2, 3], [0, 1, 2]))


@pytest.mark.parametrize("size", [1, 2, 3, 37, 1000, 4097])
def test_permute_is_a_bijection(size):
    index = np.arange(size, dtype=np.int64)
    keys = prompt_keys(42, np.zeros(size, dtype=np.int64))
    assert sorted(permute(index, keys, size).tolist()) == list(range(size))


def test_prompts_file_columns_ride_through(tmp_path):
    table = pa.table(
        {
            "id": ["fox", "house"],
            "prompt": ["a fox", "a lighthouse"],
            "style": ["photo", "painting"],
            "score": [0.5, 0.9],
        }
    )
    pq.write_table(table, tmp_path / "prompts.parquet")
    (tmp_path / "spec.yaml").write_text(
        "name: t\nprompts_file: prompts.parquet\naxes:\n  steps: [2, 3]\n"
    )
    sweep = load_spec(str(tmp_path / "spec.yaml"))
    rows = expand(sweep)
    assert [r["id"] for r in rows] == [
        "fox/steps=2",
        "fox/steps=3",
        "house/steps=2",
        "house/steps=3",
    ]
    assert [r["prompt_id"] for r in rows] == ["fox", "fox", "house", "house"]
    assert [r["style"] for r in rows] == ["photo", "photo", "painting", "painting"]
    assert rows[3]["score"] == 0.9


def test_prompts_file_csv_without_ids(tmp_path):
    (tmp_path / "p.csv").write_text("prompt,style\na fox,photo\na house,\n")
    sweep = spec_from_dict(
        {"name": "t", "prompts_file": str(tmp_path / "p.csv"), "axes": {"seed": [1, 2]}}
    )
    rows = expand(sweep)
    assert [r["id"] for r in rows] == ["p0/seed=1", "p0/seed=2", "p1/seed=1", "p1/seed=2"]
    assert [r["style"] for r in rows] == ["photo", "photo", None, None]


def test_prompts_file_parts_that_disagree_on_types_are_read_as_text(tmp_path):
    parts = tmp_path / "prompts"
    parts.mkdir()
    pq.write_table(pa.table({"prompt": ["a fox"], "tag": [7], "id": [1]}), parts / "a.parquet")
    (parts / "b.csv").write_text("prompt,tag,id\na lighthouse,coastal,b2\n")
    sweep = spec_from_dict({"name": "t", "prompts_file": str(parts), "axes": {"steps": [2]}})
    rows = expand(sweep)
    assert [(r["prompt_id"], r["tag"]) for r in rows] == [("1", "7"), ("b2", "coastal")]
    assert [r["id"] for r in rows] == ["1", "b2"]


def test_prompts_file_clashing_with_an_axis_is_refused(tmp_path):
    (tmp_path / "p.csv").write_text("prompt,steps\na fox,3\n")
    sweep = spec_from_dict(
        {"name": "t", "prompts_file": str(tmp_path / "p.csv"), "axes": {"steps": [2]}}
    )
    with pytest.raises(SweepSpecError, match="prompts_file: columns steps clash"):
        plan_expansion(sweep)


def test_expansion_streams_in_row_groups(tmp_path):
    sweep = spec(axes={"guidance_scale": [1, 2, 3], "seed": {"start": 0, "stop": 50}})
    rows = write_expansion(plan_expansion(sweep), str(tmp_path / "sweep.parquet"), chunk_rows=64)
    assert rows == 300
    meta = pq.ParquetFile(tmp_path / "sweep.parquet").metadata
    assert meta.num_rows == 300
    assert meta.num_row_groups == 5  # one row group per chunk of at most 64 rows
    assert pq.read_table(tmp_path / "sweep.parquet").column_names == [
        "id",
        "prompt",
        "guidance_scale",
        "seed",
        "prompt_index",
    ]


BAD_SPECS = [
    ({"axes": {"cfg": [1]}}, "axes.cfg: unknown axis"),
    ({"axes": {"steps": [2.5]}}, "axes.steps[0]: must be an integer"),
    ({"axes": {"steps": [2, 2]}}, "axes.steps[1]: duplicate value 2"),
    ({"axes": {"steps": []}}, "axes.steps: has no values"),
    ({"axes": {"width": [64, 100]}}, "axes.width[1]: must be a positive multiple of 8"),
    ({"axes": {"scheduler": ["warp"]}}, "axes.scheduler[0]: unknown scheduler 'warp'"),
    ({"axes": {"guidance_scale": [-1]}}, "axes.guidance_scale[0]: must be a finite number >= 0"),
    ({"axes": {"seed": [-3]}}, "axes.seed[0]: must be an integer in [0, 2^63)"),
    ({"axes": {"steps": {"start": 1}}}, "axes.steps.stop: Field required"),
    ({"axes": {"steps": {"start": 1, "stop": 4, "stpe": 1}}}, "axes.steps.stpe: unknown range key"),
    (
        {"axes": {"steps": {"start": 5, "stop": 1}}},
        "axes.steps: range start=5, stop=1, step=1 is empty",
    ),
    ({"axes": {"steps": {"start": 1, "stop": 4, "step": 0}}}, "axes.steps.step: must not be 0"),
    ({"axes": {"steps": {"start": "a", "stop": 4}}}, "axes.steps.start: must be a number"),
    (
        {"axes": {"seed": {"start": 0, "stop": 2, "step": 0.5}}},
        "axes.seed.step: must be an integer",
    ),
    ({"axes": {"scheduler": {"start": 0, "stop": 2}}}, "axes.scheduler: a range needs a numeric"),
    ({"axs": {}}, "unknown key 'axs'"),
    ({"sheet": {"row": "steps"}}, "unknown key 'sheet.row'"),
    ({"mode": "grdi"}, "mode = 'grdi'"),
    ({"mode": "random"}, "samples: required with mode: random"),
    ({"samples": 3}, "samples: only used with mode: random"),
    ({"seed": 3}, "seed: only used with mode: random"),
    ({"mode": "random", "samples": 7, "axes": {"steps": [2, 3]}}, "samples: 7 is more than the 2"),
    ({"mode": "zip", "axes": {"steps": [2, 3], "seed": [1, 2, 3]}}, "steps has 2, seed has 3"),
    (
        {"negative_prompt": "x", "axes": {"negative_prompt": ["a", "b"]}},
        "negative_prompt: given both",
    ),
    ({"sheet": {"rows": "steps"}, "axes": {"seed": [1]}}, "sheet.rows: 'steps' is not an axis"),
    ({"sheet": {"rows": "seed", "cols": "seed"}, "axes": {"seed": [1]}}, "sheet: rows and cols"),
    (
        {"mode": "zip", "sheet": {"cols": "seed"}, "axes": {"seed": [1, 2]}},
        "sheet.cols: not used with mode: zip",
    ),
    ({"axes": {"seed": {"start": 0, "stop": 10**22}}}, "axes.seed (last value): must be"),
    ({"axes": {"guidance_scale": {"start": 0, "stop": float("inf")}}}, "stop: must be a finite"),
    (
        {"axes": {"guidance_scale": {"start": 0, "stop": 1e300, "step": 1e-300}}},
        "has more than 1000000 values",
    ),
    (
        {"axes": {"guidance_scale": {"start": 0, "stop": 1e-11, "step": 1e-12}}},
        "axes.guidance_scale.step: 1e-12 is too small",
    ),
    ({"prompts": []}, "prompts: List should have at least 1 item"),
    ({"prompts": ["ok", " "]}, "prompts[1]: is empty"),
    ({"prompts_file": "x.csv"}, "give exactly one of 'prompts' and 'prompts_file'"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_SPECS)
def test_bad_specs_name_the_key(fields, message):
    data = {"name": "t", "prompts": ["a fox"], **fields}
    with pytest.raises(SweepSpecError) as caught:
        spec_from_dict(data)
    assert message in str(caught.value)
    assert str(caught.value).startswith("invalid sweep spec")


def test_spec_file_errors(tmp_path):
    with pytest.raises(SweepSpecError, match="sweep spec not found"):
        load_spec(str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(SweepSpecError, match="is not valid YAML"):
        load_spec(str(tmp_path / "bad.yaml"))
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(SweepSpecError, match="mapping at the top level"):
        load_spec(str(tmp_path / "list.yaml"))
    (tmp_path / "typo.yaml").write_text("name: t\nprompts: [x]\naxes: {step: [2]}\n")
    with pytest.raises(SweepSpecError, match=r"typo.yaml: axes.step: unknown axis"):
        load_spec(str(tmp_path / "typo.yaml"))


def test_axes_are_checked_against_the_config_limits():
    generation = GenerationConfig(max_steps=50, max_width=512)
    check_against_config(spec(axes={"steps": {"start": 10, "stop": 51, "step": 10}}), generation)
    with pytest.raises(SweepSpecError, match=r"axes.steps: steps=60: must be between 1 and 50"):
        check_against_config(
            spec(axes={"steps": {"start": 10, "stop": 70, "step": 10}}), generation
        )
    with pytest.raises(SweepSpecError, match=r"axes.width: width=1024: must be at most 512"):
        check_against_config(spec(axes={"width": [256, 1024]}), generation)


def test_sheet_axes_default_to_the_first_axes_with_several_values():
    sweep = spec(axes={"width": 64, "guidance_scale": [1, 5], "steps": [2, 3], "seed": [0, 1]})
    assert sweep.sheet_axes() == ("steps", "guidance_scale")
    chosen = spec(axes={"guidance_scale": [1, 5], "seed": [0, 1]}, sheet={"rows": "guidance_scale"})
    assert chosen.sheet_axes() == ("guidance_scale", "seed")


@pytest.mark.parametrize(
    ("name", "rows"),
    [
        ("guidance-vs-steps.yaml", 36),
        ("scheduler-comparison.yaml", 30),
        ("negative-prompts.yaml", 12),
    ],
)
def test_example_specs_are_valid_and_small(name, rows):
    sweep = load_spec(str(REPO / "configs" / "sweeps" / name))
    expansion = plan_expansion(sweep)
    assert expansion.rows == rows
    check_against_config(sweep, GenerationConfig())
    table = pa.concat_tables(expansion.chunks())
    assert set(table.column("width").to_pylist()) == {64}


def test_draw_sheet_places_images_and_labels():
    from PIL import Image

    from sdray.sweep.contact_sheets import draw_sheet

    tiles = {
        (r, c): Image.new("RGB", (64, 48), (40 * r + 20, 60 * c + 10, 200))
        for r in range(3)
        for c in range(2)
    }
    tiles[(2, 1)] = "error"
    sheet, layout = draw_sheet(tiles, ["2", "3", "4"], ["1.0", "7.5"], ["a fox", "rows: steps"])
    assert sheet.size == tuple(layout["size"])
    assert sheet.width >= 2 * 64 and sheet.height >= 3 * 48
    assert len(layout["cells"]) == 5
    for cell in layout["cells"]:
        x0, y0, x1, y1 = cell["box"]
        crop = np.asarray(sheet.crop((x0, y0, x1, y1)))
        assert (crop == np.asarray(tiles[(cell["row"], cell["col"])])).all()
    assert [label["text"] for label in layout["col_labels"]] == ["1.0", "7.5"]
    assert [label["text"] for label in layout["row_labels"]] == ["2", "3", "4"]
    for label in layout["col_labels"] + layout["row_labels"]:
        region = np.asarray(sheet.crop(tuple(label["box"])).convert("L"))
        assert region.min() < 128  # text was drawn there


def test_gallery_page_escapes_and_embeds_metadata():
    from sdray.sweep.gallery import render_gallery

    record = {
        "name": "t<b>",
        "mode": "grid",
        "axes": [{"name": "steps", "type": "int", "size": 2, "values": [2, 3]}],
        "sheet": {"rows": "steps", "cols": None, "max_tile": 256},
    }
    rows = [
        {
            "id": f"p0/steps={s}",
            "prompt": "</script><b>x",
            "prompt_index": 0,
            "steps": s,
            "status": "ok",
            "image_path": f"images/{s}.png",
        }
        for s in (3, 2)
    ]
    page = render_gallery(record, rows, total=2, sheets=[])
    assert "</script><b>" not in page
    assert page.count('<img class="thumb"') == 2
    assert '<select data-filter="steps">' in page
    embedded = page.split('id="sdray-rows">')[1].split("</script>")[0]
    assert [r["steps"] for r in json.loads(embedded)] == [2, 3]  # in axis order


# --- seeds, prompt ids, axes ------------------------------------------------------------------


def test_without_a_seed_axis_all_cells_of_a_prompt_share_its_seed():
    sweep = spec(axes={"guidance_scale": [1, 7.5], "steps": [2, 3]})
    rows = expand(sweep, base_seed=5)
    for key, prompt in (("p0", "a fox"), ("p1", "a lighthouse")):
        seeds = {r["seed"] for r in rows if r["prompt"] == prompt}
        assert seeds == {derive_seed(5, key)}  # one seed for the whole sheet
    assert rows[0]["seed"] != rows[-1]["seed"]  # but not one for every prompt
    assert {r["seed"] for r in expand(sweep, base_seed=6)}.isdisjoint({r["seed"] for r in rows})
    # The base seed decides the rows, so a resume with another one is refused.
    assert sweep.row_fingerprint(5) != sweep.row_fingerprint(6)
    # No axes at all: exactly the seeds `sdray generate` derives for the same ids.
    plain = expand(spec(), base_seed=5)
    assert [r["seed"] for r in plain] == [derive_seed(5, r["id"]) for r in plain]


def test_a_seed_axis_gives_the_seeds():
    sweep = spec(axes={"steps": [2, 3], "seed": [7, 8]})
    assert [r["seed"] for r in expand(sweep, base_seed=5)][:4] == [7, 8, 7, 8]
    assert sweep.row_fingerprint(5) == sweep.row_fingerprint(6)


def test_prompts_file_ids_key_the_seeds_and_its_seed_column_wins(tmp_path):
    (tmp_path / "p.csv").write_text("id,prompt,seed\nfox,a fox,\nhouse,a house,42\n")
    sweep = spec_from_dict(
        {"name": "t", "prompts_file": str(tmp_path / "p.csv"), "axes": {"steps": [2, 3]}}
    )
    rows = expand(sweep, base_seed=3)
    assert [r["seed"] for r in rows] == [derive_seed(3, "fox")] * 2 + [42, 42]
    assert "seed" in plan_expansion(sweep).schema().names
    # CSV is text: seeds parse as `sdray generate` parses them, or are refused by value.
    (tmp_path / "p.csv").write_text("prompt,seed\na,42.0\nb, 7\nc,1e3\n")
    assert [r["seed"] for r in expand(sweep)] == [42, 42, 7, 7, 1000, 1000]
    (tmp_path / "p.csv").write_text("prompt,seed\na,1.5\n")
    with pytest.raises(SweepSpecError, match=r"prompts_file: seed='1.5': must be an integer"):
        expand(sweep)


def test_prompts_file_null_ids_fall_back_to_positions(tmp_path):
    table = pa.table({"id": ["fox", None, ""], "prompt": ["a fox", "a house", "a boat"]})
    pq.write_table(table, tmp_path / "p.parquet")
    sweep = spec_from_dict(
        {"name": "t", "prompts_file": str(tmp_path / "p.parquet"), "axes": {"steps": [2, 3]}}
    )
    rows = expand(sweep)
    assert [r["id"] for r in rows] == [
        "fox/steps=2",
        "fox/steps=3",
        "p1/steps=2",
        "p1/steps=3",
        "p2/steps=2",
        "p2/steps=3",
    ]
    assert rows[2]["seed"] == derive_seed(0, "p1")


def test_prompts_file_duplicate_ids_are_refused_before_anything_is_written(tmp_path):
    from sdray.config import load_config
    from sdray.sweep import run_sweep

    prompts = tmp_path / "prompts.csv"
    prompts.write_text("id,prompt\nfox,a fox\nhouse,a house\nfox,another fox\np3,a boat\n,a cat\n")
    (tmp_path / "spec.yaml").write_text("name: t\nprompts_file: prompts.csv\naxes: {steps: [2]}\n")
    with pytest.raises(SweepSpecError) as caught:
        plan_expansion(load_spec(str(tmp_path / "spec.yaml")))
    message = str(caught.value)
    assert "duplicate ids: 'fox'" in message and str(prompts) in message
    # A missing id takes its position (p4 here); a clash with a given id is named too.
    prompts.write_text("id,prompt\np1,a fox\n,a house\n")
    with pytest.raises(SweepSpecError, match="duplicate ids: 'p1'"):
        run_sweep(str(tmp_path / "spec.yaml"), str(tmp_path / "out"), load_config())
    assert not (tmp_path / "out").exists()


def test_axis_arrays_are_built_once():
    axis = make_axis("guidance_scale", {"start": 0, "stop": 100, "step": 0.001})
    assert axis.value_array is axis.value_array and axis.label_array is axis.label_array
    index = np.array([0, 99_999, 5], dtype=np.int64)
    assert axis.take(index).to_pylist() == [0.0, 99.999, 0.005]
    assert axis.labels(index).to_pylist()[1] == "guidance_scale=99.999"
    lazy = make_axis("seed", {"start": 10, "stop": 10**12})
    assert lazy.value_array is None
    assert lazy.labels(np.array([2])).to_pylist() == ["seed=12"]


@pytest.mark.parametrize("sizes", [[], [5], [2, 3, 4], [1, 7, 1, 3]])
def test_grid_positions_put_the_last_axis_fastest(sizes):
    flat = np.arange(int(np.prod(sizes)), dtype=np.int64)
    expected = list(itertools.product(*(range(n) for n in sizes)))
    got = list(zip(*grid_positions(flat, sizes), strict=True)) if sizes else [()]
    assert [tuple(int(v) for v in t) for t in got] == expected


def test_resume_of_an_output_without_a_sweep_record_is_refused(tmp_path):
    from sdray.config import load_config
    from sdray.errors import SdrayError
    from sdray.sweep import run_sweep

    (tmp_path / "spec.yaml").write_text("name: t\nprompts: [a fox]\naxes: {steps: [2, 3]}\n")
    output = tmp_path / "generated"
    (output / "metadata").mkdir(parents=True)
    (output / "manifest.json").write_text("{}")
    with pytest.raises(SdrayError, match="has manifest.json but no sweep.json"):
        run_sweep(str(tmp_path / "spec.yaml"), str(output), load_config(), resume=True)
    assert sorted(p.name for p in output.iterdir()) == ["manifest.json", "metadata"]


# --- web files --------------------------------------------------------------------------------


class Bucket:
    """An fsspec-like object store that records its uploads (retries are s3fs's/botocore's)."""

    protocol = ("s3", "s3a")

    def __init__(self) -> None:
        self.puts: list[tuple[str, dict]] = []

    def pipe_file(self, path, data, **kwargs):
        self.puts.append((path, kwargs))


def test_web_files_on_object_stores_carry_their_type():
    from sdray.sweep.paths import write_web_file

    bucket = Bucket()
    for path in ("b/index.html", "b/gallery/thumbs/ab/x.jpg", "b/contact_sheets/p0.png"):
        write_web_file(bucket, path, b"data")
    assert bucket.puts == [
        ("b/index.html", {"ContentType": "text/html; charset=utf-8"}),
        ("b/gallery/thumbs/ab/x.jpg", {"ContentType": "image/jpeg"}),
        ("b/contact_sheets/p0.png", {"ContentType": "image/png"}),
    ]


# --- contact sheets ---------------------------------------------------------------------------


def test_sheet_names_are_distinct_for_long_and_non_ascii_values():
    from sdray.sweep.contact_sheets import sheet_name

    long = "blurry, low quality, jpeg artifacts, watermark, "
    values = [long + "text", long + "signature", "草原の狐", "雪の中の狐", "", "a/b", "a_b"]
    names = [sheet_name(0, {"negative_prompt": v, "seed": 1}) for v in values]
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"[A-Za-z0-9._+~-]+\.png", n) for n in names), names
    schedulers = [sheet_name(3, {"scheduler": s}) for s in ("dpmpp_2m", "ddim")]
    assert schedulers == ["p00003_scheduler-dpmpp_2m.png", "p00003_scheduler-ddim.png"]
    floats = [sheet_name(0, {"guidance_scale": g}) for g in (1.0, 1.5, 10.0)]
    assert floats == [
        "p00000_guidance_scale-1.0.png",
        "p00000_guidance_scale-1.5.png",
        "p00000_guidance_scale-10.0.png",
    ]
    assert sheet_name(0, {"seed": 1}) != sheet_name(1, {"seed": 1})


def color(index: int) -> tuple[int, int, int]:
    return (37 * index % 256, 91 * index % 256, 53 * index % 256 + 1)


def png(index: int, size: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color(index)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_fake_output(root: Path, rows: list[dict], fmt: str, per_shard: int, size: int = 24):
    """An output as the batch job writes it: image shards of `fmt`, metadata partitioned by
    steps (Hive); each ok row's image is one color, from the row's position."""
    import fsspec

    from sdray.batch.sink import WRITERS, ShardImages, sample_key

    fs = fsspec.filesystem("file")
    for shard, start in enumerate(range(0, len(rows), per_shard)):
        chunk = list(enumerate(rows[start : start + per_shard], start))
        for steps in sorted({r["steps"] for _, r in chunk}):
            part = [(i, r) for i, r in chunk if r["steps"] == steps]
            batch = ShardImages(
                [sample_key(r["id"]) for _, r in part],
                [png(i, size) if r["status"] == "ok" else None for i, r in part],
                [r for _, r in part],
            )
            directory, name = f"images/steps={steps}/", f"part-{shard:04d}"
            paths, _ = WRITERS[fmt]("png").write(fs, str(root), directory, name, batch)
            metadata = pa.Table.from_pylist(
                [{k: v for k, v in r.items() if k != "steps"} for _, r in part]
            ).append_column("image_path", pa.array(paths, pa.string()))
            folder = root / "metadata" / f"steps={steps}"
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(metadata, folder / f"{name}.parquet")


def sweep_rows(axes: dict[str, list], prompts=("a fox", "a lighthouse"), mode="grid") -> list[dict]:
    names = list(axes)
    combos = (
        list(zip(*axes.values(), strict=True))
        if mode == "zip"
        else list(itertools.product(*axes.values()))
    )
    rows = []
    for p, prompt in enumerate(prompts):
        for values in combos:
            labels = "/".join(f"{n}={v!r}" for n, v in zip(names, values, strict=True))
            row = {"id": f"p{p}/{labels}", "prompt": prompt, "prompt_index": p}
            row.update(zip(names, values, strict=True))
            rows.append({**row, "status": "ok", "error": None})
    return rows


def axes_record(axes: dict[str, list]) -> list[dict]:
    kinds = {float: "float", int: "int", str: "str"}
    return [
        {"name": n, "type": kinds[type(v[0])], "size": len(v), "values": v} for n, v in axes.items()
    ]


def run_sheet_stages(root: Path, record: dict, rate: float = 1.0, thumb_size: int = 16):
    """Both stages in this process, grouped as Ray would: (sheets' records, gallery rows)."""
    import pyarrow.compute as pc

    from sdray.sweep.contact_sheets import GROUP_COLUMN, SheetPlan, draw_group, tile_shards

    plan = SheetPlan.from_record(record)
    files = sorted(str(p) for p in (root / "metadata").rglob("*.parquet"))
    kwargs = {"plan": plan, "output_uri": str(root), "storage_options": None}
    tiles = pa.concat_tables(
        tile_shards(pa.table({"path": [f]}), **kwargs, thumb_size=thumb_size, rate=rate)
        for f in files
    )
    outputs = [
        draw_group(tiles.filter(pc.equal(tiles.column(GROUP_COLUMN), key)), **kwargs)
        for key in sorted(set(tiles.column(GROUP_COLUMN).to_pylist()))
    ]
    rows = pa.concat_tables(outputs).to_pylist()
    sheets = [json.loads(r["payload"]) for r in rows if r["kind"] == "sheet"]
    sidecars = [json.loads((root / s["file"]).with_suffix(".json").read_text()) for s in sheets]
    return sidecars, [json.loads(r["payload"]) for r in rows if r["kind"] == "gallery"]


GRID_AXES = {"guidance_scale": [1.0, 7.5], "steps": [2, 3], "seed": [0, 1]}


@pytest.mark.parametrize("fmt", ["webdataset", "parquet", "files"])
def test_sheets_read_each_image_container_once(tmp_path, monkeypatch, fmt):
    from fsspec.implementations.local import LocalFileSystem

    from sdray.sweep.contact_sheets import sample_rank
    from sdray.sweep.paths import thumbnail_path

    rows = sweep_rows(GRID_AXES)
    rows[5] = {**rows[5], "status": "error", "error": "steps=3: too many"}
    # As the batch job orders them (by batch key): every sheet spreads over several shards.
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["steps"], rows[i]["guidance_scale"]))
    rows = [rows[i] for i in order]
    write_fake_output(tmp_path, rows, fmt, per_shard=3, size=24)
    containers = {p for p in (tmp_path / "images").rglob("*") if p.is_file()}
    opened: list[str] = []
    original = LocalFileSystem._open

    def counting_open(self, path, *args, **kwargs):
        if "/images/" in str(path):
            opened.append(str(path))
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "_open", counting_open)
    record = {
        "mode": "grid",
        "rows": len(rows),
        "axes": axes_record(GRID_AXES),
        "sheet": {"rows": "steps", "cols": "guidance_scale", "max_tile": 16},
    }
    rate = 0.4  # as sample_rate gives for a larger sweep
    sheets, gallery = run_sheet_stages(tmp_path, record, rate=rate)

    assert sorted(opened) == sorted(str(p) for p in containers)  # each one, exactly once
    assert len(sheets) == 4  # 2 prompts x 2 seeds
    assert {(s["prompt_index"], s["fixed"]["seed"]) for s in sheets} == {
        (p, seed) for p in (0, 1) for seed in (0, 1)
    }
    by_id = {r["id"]: (i, r) for i, r in enumerate(rows)}
    drawn = 0
    for layout in sheets:
        sheet = np.asarray(Image.open(tmp_path / layout["file"]).convert("RGB"))
        assert [c["text"] for c in layout["col_labels"]] == ["1.0", "7.5"]
        assert [c["text"] for c in layout["row_labels"]] == ["2", "3"]
        for cell in layout["cells"]:
            index, row = by_id[cell["id"]]
            assert row["steps"] == [2, 3][cell["row"]]
            assert row["guidance_scale"] == [1.0, 7.5][cell["col"]]
            x0, y0, x1, y1 = cell["box"]
            assert (x1 - x0, y1 - y0) == (16, 16)  # shrunk to max_tile
            assert (sheet[y0:y1, x0:x1] == color(index)).all()
            drawn += 1
    assert drawn == 15  # every ok row, once
    # Thumbnails for the gallery's sample only, which carries the rows' full metadata.
    sampled = {r["id"] for r in rows if sample_rank(r["id"]) < rate}
    assert {r["id"] for r in gallery} == sampled and 0 < len(sampled) < len(rows)
    ok_sampled = {i for i in sampled if by_id[i][1]["status"] == "ok"}
    thumbs = {str(p.relative_to(tmp_path)) for p in (tmp_path / "gallery").rglob("*.jpg")}
    assert thumbs == {thumbnail_path(i) for i in ok_sampled}
    assert all(r["image_path"] and "steps" in r for r in gallery if r["status"] == "ok")


def test_images_past_the_sheet_side_are_never_loaded(tmp_path, monkeypatch):
    from sdray.sweep import contact_sheets

    axes = {"seed": list(range(40)), "steps": [2]}
    rows = sweep_rows(axes, prompts=("a fox",))
    write_fake_output(tmp_path, rows, "files", per_shard=50)
    loaded: list[str] = []
    original = contact_sheets.read_images

    def counting(fs, root, container, members):
        loaded.append(container)
        return original(fs, root, container, members)

    monkeypatch.setattr(contact_sheets, "read_images", counting)
    record = {
        "mode": "grid",
        "rows": len(rows),
        "axes": axes_record(axes),
        "sheet": {"rows": "steps", "cols": "seed", "max_tile": 32},
    }
    (sheet,), _ = run_sheet_stages(tmp_path, record, rate=0.0)
    assert len(loaded) == contact_sheets.MAX_SIDE  # seeds 32..39 are past the side
    assert sheet["values_left_out"] == 8 and len(sheet["cells"]) == contact_sheets.MAX_SIDE


def test_a_long_listed_axis_still_places_its_first_values():
    from sdray.sweep.contact_sheets import MAX_SIDE, SheetPlan
    from sdray.sweep.run import sweep_record

    def plan_of(sweep):
        return SheetPlan.from_record(
            json.loads(json.dumps(sweep_record(sweep, plan_expansion(sweep))))
        )

    seeds = list(range(1200, 0, -1))  # more values than sweep.json lists
    plan = plan_of(spec(axes={"seed": seeds, "steps": [2, 3]}, sheet={"rows": "seed"}))
    shown = [plan.may_show({"seed": s, "steps": 2}) for s in (1200, 1169, 1168, 1)]
    assert shown == [True, True, False, False]  # positions 0, 31, 32 (past the side), 1199
    plan = plan_of(spec(mode="zip", axes={"seed": seeds, "steps": list(range(1, 1201))}))
    assert plan.zip_index({"seed": 1195, "steps": 6}) == 5
    assert plan.zip_index({"seed": 5, "steps": 1196}) >= MAX_SIDE  # not piled into cell 0


def test_zip_sheets_are_one_labelled_strip(tmp_path):
    axes = {"guidance_scale": [1.0, 5.0, 9.0], "steps": [2, 3, 4]}
    rows = sweep_rows(axes, mode="zip")
    write_fake_output(tmp_path, rows, "webdataset", per_shard=4)
    record = {
        "mode": "zip",
        "rows": len(rows),
        "axes": axes_record(axes),
        "sheet": {"rows": None, "cols": None, "max_tile": 32},
    }
    sheets, _ = run_sheet_stages(tmp_path, record)
    assert len(sheets) == 2  # one per prompt
    for layout in sheets:
        assert layout["layout"] == "strip" and layout["row_labels"] == []
        assert [c["text"] for c in layout["col_labels"]] == [
            "guidance_scale 1.0\nsteps 2",
            "guidance_scale 5.0\nsteps 3",
            "guidance_scale 9.0\nsteps 4",
        ]
        assert [(c["row"], c["col"]) for c in layout["cells"]] == [(0, 0), (0, 1), (0, 2)]
        assert layout["size"][1] < 24 * 2 + 100  # one row of images, not a 3 x 3 diagonal


def test_random_sheets_group_by_prompt_and_caption_cells(tmp_path):
    axes = {"steps": [4, 2], "guidance_scale": [1.0, 7.5]}
    record = {
        "mode": "random",
        "rows": 3,
        "axes": [
            *axes_record(axes),
            {"name": "seed", "type": "int", "size": 10**6, "range": {"start": 0, "step": 1}},
        ],
        "sheet": {"rows": "steps", "cols": "guidance_scale", "max_tile": 32},
    }
    draws = [(2, 1.0, 5), (4, 7.5, 9), (2, 1.0, 7)]
    rows = [
        {
            "id": f"p0/{i}",
            "prompt": "a fox",
            "prompt_index": 0,
            "steps": steps,
            "guidance_scale": guidance,
            "seed": seed,
            "status": "ok",
            "error": None,
        }
        for i, (steps, guidance, seed) in enumerate(draws)
    ]
    write_fake_output(tmp_path, rows, "files", per_shard=2)  # steps arrive as Hive text
    (layout,), _ = run_sheet_stages(tmp_path, record)
    assert layout["file"] == "contact_sheets/p00000.png"
    assert layout["rows"]["values"] == [4, 2]  # the spec's order, not sorted
    assert layout["cols"]["values"] == [1.0, 7.5]
    # Two draws share the cell (steps 2, cfg 1.0): the first by id fills it, the other counted.
    cells = {(c["row"], c["col"]): c for c in layout["cells"]}
    assert sorted(cells) == [(0, 1), (1, 0)] and cells[(1, 0)]["id"] == "p0/0"
    assert layout["hidden_draws"] == 1
    assert cells[(1, 0)]["caption"] == "seed 5" and cells[(0, 1)]["caption"] == "seed 9"
    sheet = np.asarray(Image.open(tmp_path / layout["file"]).convert("L"))
    x0, _, x1, y1 = cells[(1, 0)]["box"]
    assert sheet[y1 + 1 : y1 + 14, x0 - 4 : x1 + 4].min() < 160  # the caption is drawn


def test_gallery_sample_is_spread_and_holds_the_cap():
    from sdray.sweep.contact_sheets import sample_rank, sample_rate

    assert sample_rate(16, 16) == 1.0
    ids = [
        f"p{p}/steps={s}/seed={seed}" for p in range(20) for s in range(50) for seed in range(20)
    ]
    cap = 1000
    rate = sample_rate(len(ids), cap)
    ranked = sorted((sample_rank(i), i) for i in ids)
    picked = [i for r, i in ranked if r < rate]
    assert cap <= len(picked) < 1.2 * cap  # enough to keep the cap lowest, few over
    shown = [i for _, i in ranked[:cap]]
    per_prompt = {p: sum(i.startswith(f"p{p}/") for i in shown) for p in range(20)}
    assert min(per_prompt.values()) > 25 and max(per_prompt.values()) < 80, per_prompt
    assert len({i.split("/")[1] for i in shown}) == 50  # every steps value


def test_gallery_page_lists_at_most_the_sheets_it_is_given():
    from sdray.sweep.gallery import render_gallery

    record = {
        "name": "t",
        "mode": "grid",
        "axes": [{"name": "steps", "type": "int", "size": 2, "values": [2, 3]}],
        "sheet": {"rows": "steps", "cols": None, "max_tile": 256},
    }
    sheets = [
        {"file": f"contact_sheets/p{i:05d}.png", "prompt": "x", "prompt_index": i, "fixed": {}}
        for i in range(3)
    ]
    page = render_gallery(record, [], total=10_000, sheets=sheets, sheets_total=700)
    assert page.count('<li><a href="contact_sheets/p') == 3
    assert "697 more contact sheets not listed" in page
    assert "700 contact sheets" in page


def test_tiles_check_the_size_before_decoding():
    from sdray.sweep.contact_sheets import tile_and_thumbnail

    small = png(3, 24)
    header_only = small[:60]  # a valid header, no pixels: decoding it would fail
    assert tile_and_thumbnail(header_only, 32, None) == (header_only, None)
    buffer = io.BytesIO()
    Image.new("RGB", (600, 400), color(5)).save(buffer, format="JPEG")
    tile, thumb = tile_and_thumbnail(buffer.getvalue(), 256, 64)
    assert Image.open(io.BytesIO(tile)).size == (256, 171)
    assert Image.open(io.BytesIO(thumb)).size == (64, 43)
    assert tile_and_thumbnail(buffer.getvalue(), None, None) == (None, None)

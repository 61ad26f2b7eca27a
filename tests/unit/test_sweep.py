"""Sweep specs: validation, grid/zip/random expansion, ranges, streaming; sheets and page drawing."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sdray.config import GenerationConfig
from sdray.sweep import (
    SweepSpecError,
    check_against_config,
    load_spec,
    permute,
    plan_expansion,
    prompt_keys,
    spec_from_dict,
    write_expansion,
)

REPO = Path(__file__).resolve().parents[2]


def spec(**fields):
    return spec_from_dict({"name": "t", "prompts": ["a fox", "a lighthouse"], **fields})


def expand(sweep, chunk_rows: int = 7) -> list[dict]:
    expansion = plan_expansion(sweep)
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
    [("guidance-vs-steps.yaml", 36), ("scheduler-comparison.yaml", 30)],
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

    from sdray.contact_sheets import draw_sheet

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
    from sdray.gallery import render_gallery

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


def test_sheet_groups_read_hive_text_and_random_mode_groups_by_prompt(tmp_path):
    from PIL import Image

    from sdray.contact_sheets import SheetPlan, add_group_column, draw_group
    from sdray.gallery import thumbnail_path

    record = {
        "mode": "random",
        "axes": [
            {"name": "steps", "type": "int", "size": 2, "values": [4, 2]},
            {"name": "guidance_scale", "type": "float", "size": 2, "values": [1.0, 7.5]},
            {"name": "seed", "type": "int", "size": 10**6, "range": {"start": 0, "step": 1}},
        ],
        "sheet": {"rows": "steps", "cols": "guidance_scale", "max_tile": 32},
    }
    plan = SheetPlan.from_record(record)
    rows = []
    for i, (steps, guidance, seed) in enumerate([("2", 1.0, 5), ("4", 7.5, 9), ("2", 1.0, 7)]):
        path = f"images/{i}.png"
        (tmp_path / "images").mkdir(exist_ok=True)
        Image.new("RGB", (64, 64), (i * 80, 0, 0)).save(tmp_path / path)
        rows.append(
            {
                "id": f"p0/{i}",
                "prompt": "a fox",
                "prompt_index": 0,
                "steps": steps,
                "guidance_scale": guidance,
                "seed": seed,
                "status": "ok",
                "image_path": path,
            }
        )
    table = add_group_column(pa.Table.from_pylist(rows), plan)  # steps arrive as Hive text
    assert table.schema.field("steps").type == pa.int64()
    assert len(set(table.column("__sdray_sheet").to_pylist())) == 1  # random: one per prompt
    summary = draw_group(table, plan, str(tmp_path), None, thumb_size=16).to_pylist()[0]
    layout = json.loads((tmp_path / "contact_sheets" / "p00000.json").read_text())
    assert summary["file"] == "contact_sheets/p00000.png" and summary["thumbnails"] == 3
    assert layout["rows"]["values"] == [4, 2]  # the spec's order, not sorted
    assert layout["cols"]["values"] == [1.0, 7.5]
    # Two draws share the cell (steps 2, cfg 1.0): the first by id fills it; tiles fit max_tile.
    cells = {(c["row"], c["col"]): c for c in layout["cells"]}
    assert sorted(cells) == [(0, 1), (1, 0)] and cells[(1, 0)]["id"] == "p0/0"
    x0, y0, x1, y1 = cells[(1, 0)]["box"]
    assert (x1 - x0, y1 - y0) == (32, 32)
    assert Image.open(tmp_path / thumbnail_path("p0/2")).size == (16, 16)

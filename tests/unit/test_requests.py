"""Row contract: validation messages, defaults, ids and seed derivation."""

import pyarrow as pa
import pytest

from sdray.config import GenerationConfig
from sdray.errors import InputError
from sdray.requests import (
    ROW_COLUMN,
    SOURCE_COLUMN,
    check_columns,
    derive_id,
    derive_seed,
    prepare_table,
    table_ids,
    validate_row,
)

CONFIG = GenerationConfig(width=128, height=128, max_width=256, max_height=256, max_steps=50)


def errors_of(row):
    return validate_row(row, CONFIG)[1]


def test_defaults_fill_missing_values():
    fields, errors = validate_row({"prompt": "a fox"}, CONFIG)
    assert errors == []
    assert fields["steps"] == CONFIG.steps
    assert fields["width"] == CONFIG.width and fields["height"] == CONFIG.height
    assert fields["guidance_scale"] == CONFIG.guidance_scale
    assert fields["scheduler"] == CONFIG.scheduler
    assert fields["negative_prompt"] == CONFIG.negative_prompt
    assert fields["seed"] is None  # derived from the id by prepare_table


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"prompt": None}, "prompt=None: is null"),
        ({"prompt": 3}, "prompt=3: must be a string"),
        ({"prompt": "  "}, "prompt='  ': is empty"),
        ({"prompt": "x", "width": 100}, "width=100: must be a positive multiple of 8"),
        ({"prompt": "x", "height": 0}, "height=0: must be a positive multiple of 8"),
        ({"prompt": "x", "width": -64}, "width=-64: must be a positive multiple of 8"),
        ({"prompt": "x", "width": 512}, "width=512: must be at most 256"),
        ({"prompt": "x", "width": "abc"}, "width='abc': must be a positive multiple of 8"),
        ({"prompt": "x", "steps": 0}, "steps=0: must be between 1 and 50"),
        ({"prompt": "x", "steps": 51}, "steps=51: must be between 1 and 50"),
        ({"prompt": "x", "steps": 2.5}, "steps=2.5: must be an integer"),
        ({"prompt": "x", "scheduler": "warp"}, "scheduler='warp': unknown scheduler"),
        ({"prompt": "x", "seed": -1}, "seed=-1: must be an integer in [0, 2^63)"),
        ({"prompt": "x", "seed": 2**63}, f"seed={2**63}: must be an integer in [0, 2^63)"),
        ({"prompt": "x", "seed": 1.5}, "seed=1.5: must be an integer in [0, 2^63)"),
        ({"prompt": "x", "seed": "abc"}, "seed='abc': must be an integer in [0, 2^63)"),
        ({"prompt": "x", "guidance_scale": -1}, "guidance_scale=-1: must be a finite number"),
        ({"prompt": "x", "guidance_scale": float("nan")}, "guidance_scale=nan"),
        ({"prompt": "x", "negative_prompt": 5}, "negative_prompt=5: must be a string"),
    ],
)
def test_bad_values_are_named_with_their_value(row, expected):
    errors = errors_of(row)
    assert len(errors) == 1, errors
    assert errors[0].startswith(expected)


def test_integral_values_in_other_types_are_accepted():
    fields, errors = validate_row(
        {"prompt": "x", "seed": 7.0, "steps": "12", "width": 64.0, "guidance_scale": "3"}, CONFIG
    )
    assert errors == []
    assert (fields["seed"], fields["steps"], fields["width"], fields["guidance_scale"]) == (
        7,
        12,
        64,
        3.0,
    )


def test_seed_derivation_is_stable_and_in_range():
    a = derive_seed(0, "row-1")
    assert a == derive_seed(0, "row-1")
    assert a != derive_seed(1, "row-1")
    assert a != derive_seed(0, "row-2")
    seeds = [derive_seed(0, str(i)) for i in range(2000)]
    assert all(0 <= s < 2**63 for s in seeds)
    assert len(set(seeds)) == len(seeds)


def _table(**columns):
    return pa.table(columns)


def test_prepare_table_keeps_every_row_and_carries_columns():
    table = _table(
        prompt=["a", None, "c"],
        width=[64, 64, 100],
        style=["x", "y", "z"],
        score=[1.5, 2.5, None],
    )
    table = table.append_column(SOURCE_COLUMN, pa.array(["t.csv"] * 3))
    table = table.append_column(ROW_COLUMN, pa.array([0, 1, 2], pa.int64()))
    out = prepare_table(table, CONFIG)
    assert out.num_rows == 3
    assert out.column("status").to_pylist() == ["ok", "error", "error"]
    assert out.column("id").to_pylist() == [derive_id("t.csv", i) for i in range(3)]
    assert out.column("style").to_pylist() == ["x", "y", "z"]
    assert out.column("score").to_pylist() == [1.5, 2.5, None]
    assert out.column("seed").to_pylist()[0] == derive_seed(CONFIG.seed, "t.csv:0")
    assert "width=100" in out.column("error").to_pylist()[2]


def test_prepare_table_explicit_ids_and_seeds():
    out = prepare_table(_table(id=[10, 11], prompt=["a", "b"], seed=[5, None]), CONFIG)
    assert out.column("id").to_pylist() == ["10", "11"]
    assert out.column("seed").to_pylist() == [5, derive_seed(CONFIG.seed, "11")]


def test_null_id_is_derived_and_an_empty_one_is_an_error_row():
    table = _table(id=["a", None, ""], prompt=["x", "y", "z"])
    table = table.append_column(ROW_COLUMN, pa.array([0, 1, 2], pa.int64()))
    table = table.append_column(SOURCE_COLUMN, pa.array(["t.jsonl"] * 3))
    out = prepare_table(table, CONFIG)
    assert out.column("id").to_pylist() == ["a", "t.jsonl:1", "t.jsonl:2"]
    assert out.column("status").to_pylist() == ["ok", "ok", "error"]
    assert out.column("error").to_pylist()[2] == "id='': is empty"


@pytest.mark.parametrize(
    "ids",
    [None, ["a", None, "", "7"], [1.0, 2.5, None, 4.0], [10, None, 12, 13]],
    ids=["no id column", "text", "float", "int"],
)
def test_table_ids_resolve_ids_as_prepare_table_does(ids):
    # A resume checks committed units by their ids alone (`table_ids`); they must be the very
    # ids that validation gives the rows, or a resume would see a changed input.
    columns = {"prompt": ["w", "x", "", None]}  # invalid rows keep their ids too
    if ids is not None:
        columns["id"] = ids
    table = _table(**columns)
    table = table.append_column(ROW_COLUMN, pa.array([5, 6, 7, 8], pa.int64()))
    table = table.append_column(SOURCE_COLUMN, pa.array(["t.jsonl"] * 4))
    expected = prepare_table(table, CONFIG).column("id").to_pylist()
    assert table_ids(table) == expected
    assert len(set(expected)) == 4


def test_missing_prompt_column_is_refused():
    with pytest.raises(InputError, match="no 'prompt' column"):
        check_columns(["text"])
    out = prepare_table(_table(text=["a"]), CONFIG)  # a block of JSON lines without prompts
    assert out.column("status").to_pylist() == ["error"]


def test_reserved_columns_are_refused():
    with pytest.raises(InputError, match="status"):
        prepare_table(_table(prompt=["a"], status=["x"]), CONFIG)


def test_text_that_is_not_unicode_is_a_row_error():
    """JSON can carry lone surrogates; such a row is an error naming the field, not a failed read."""
    import io

    from sdray.batch.read import _jsonl_table

    table = _jsonl_table(
        io.StringIO(
            '{"id": "a", "prompt": "fine"}\n'
            '{"id": "b", "prompt": "a\\ud800b"}\n'
            '{"id": "c", "prompt": "x", "negative_prompt": "\\udfff"}\n'
        ),
        "p.jsonl",
    )
    rows = {r["id"]: r for r in prepare_table(table, CONFIG).to_pylist()}
    assert rows["a"]["status"] == "ok"
    assert rows["b"]["status"] == "error"
    assert rows["b"]["error"] == "prompt='a\\ud800b': is not valid Unicode text"
    assert rows["c"]["error"] == "negative_prompt='\\udfff': is not valid Unicode text"
    assert errors_of({"prompt": "\ud800"}) == ["prompt='\\ud800': is not valid Unicode text"]

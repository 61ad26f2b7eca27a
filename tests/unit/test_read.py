"""Reading prompt tables: text stays text, and files that disagree on types make one table."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sdray.batch.read import (
    _csv_table,
    _jsonl_table,
    check_prompt_files,
    column_plan,
    conform_chunk,
    list_prompt_files,
    peek_schema,
    read_prompt_file,
)
from sdray.config import GenerationConfig
from sdray.errors import InputError
from sdray.requests import READ_ERROR_COLUMN, prepare_table

CONFIG = GenerationConfig(width=64, height=64)


def _csv(text: str) -> pa.Table:
    return _csv_table(io.BytesIO(text.encode()), "p.csv")


def _jsonl(*rows: dict) -> pa.Table:
    return _jsonl_table(io.StringIO("".join(json.dumps(r) + "\n" for r in rows)), "p.jsonl")


def _read_all(root) -> pa.Table:
    """What the read tasks of `read_prompts` yield, as one table (no cluster)."""
    files = list_prompt_files(str(root))
    text_columns, expected = check_prompt_files(files)
    chunks = [
        conform_chunk(chunk, text_columns, expected, file["source"])
        for file in files
        for chunk in read_prompt_file(file)
    ]
    return pa.concat_tables(chunks, promote_options="permissive")


def test_csv_text_columns_are_read_as_written():
    table = _csv(
        "id,prompt,negative_prompt,scheduler,width,guidance_scale,tag\n"
        "007,123,NA,euler,64,7.5,NA\n"
        "7,456,null,None,64,,null\n"
        "None,,,,,,\n"
    )
    assert set(table.schema.types) == {pa.string()}  # CSV has no types: text as written
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == ["007", "7", "None"]
    assert [r["prompt"] for r in rows] == ["123", "456", None]
    assert [r["negative_prompt"] for r in rows] == ["NA", "null", None]
    assert [r["scheduler"] for r in rows] == ["euler", "None", None]
    assert [r["tag"] for r in rows] == ["NA", "null", None]  # only the empty field is null
    prepared = {r["id"]: r for r in prepare_table(table, CONFIG).to_pylist()}
    assert set(prepared) == {"007", "7", "None"}
    assert prepared["007"]["status"] == "ok" and prepared["007"]["prompt"] == "123"
    assert (prepared["007"]["width"], prepared["007"]["guidance_scale"]) == (64, 7.5)
    assert prepared["007"]["negative_prompt"] == "NA"
    assert "scheduler='None'" in prepared["7"]["error"]
    assert prepared["None"]["error"] == "prompt=None: is null"


def test_csv_numbers_are_parsed_exactly_and_carried_columns_ride_through_as_written():
    table = _csv(
        "id,prompt,seed,steps,zip,score\n"
        "a,x,9007199254740993,20.0,02139,1.50\n"
        "b,x,1.5,2,00501,2\n"
        "c,x,9223372036854775807,3,,1e3\n"
    )
    rows = {r["id"]: r for r in prepare_table(table, CONFIG).to_pylist()}
    assert rows["a"]["seed"] == 9007199254740993 and rows["a"]["steps"] == 20  # no float trip
    assert rows["b"]["status"] == "error" and rows["b"]["error"].startswith("seed='1.5'")
    assert rows["c"]["seed"] == 2**63 - 1 and rows["c"]["status"] == "ok"
    assert [rows[k]["zip"] for k in "abc"] == ["02139", "00501", None]
    assert [rows[k]["score"] for k in "abc"] == ["1.50", "2", "1e3"]


def test_csv_peek_infers_what_the_read_infers(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("id,prompt,width,score\n007,1,64,0.5\n008,2,,1\n")
    file = {"uri": str(path), "source": "p.csv", "format": "csv"}
    assert peek_schema(file) == next(read_prompt_file(file)).select([0, 1, 2, 3]).schema


def test_jsonl_ids_are_text_whatever_the_other_rows_hold():
    table = _jsonl(
        {"id": 7, "prompt": "a"},
        {"id": "007", "prompt": "b"},
        {"id": 8.0, "prompt": "c"},
        {"id": 9.5, "prompt": "d"},
        {"id": True, "prompt": "e"},
    )
    assert table.schema.field("id").type == pa.string()
    assert table.column("id").to_pylist() == ["7", "007", "8", "9.5", "true"]
    only_numbers = _jsonl({"id": 7, "prompt": "a"})
    assert only_numbers.column("id").to_pylist() == ["7"]


def test_number_and_text_ids_in_two_files_are_one_id(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"id": 7, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n')
    (tmp_path / "b.jsonl").write_text('{"id": "7", "prompt": "c"}\n{"id": "007", "prompt": "d"}\n')
    ids = prepare_table(_read_all(tmp_path), CONFIG).column("id").to_pylist()
    assert sorted(ids) == ["007", "1", "7", "7"]


def test_column_plan():
    text, expected = column_plan(
        [
            pa.schema([("prompt", pa.string()), ("tag", pa.int64()), ("score", pa.int64())]),
            pa.schema([("prompt", pa.string()), ("tag", pa.string()), ("score", pa.float64())]),
            pa.schema([("prompt", pa.string()), ("note", pa.null()), ("only", pa.int64())]),
            pa.schema([("prompt", pa.string()), ("note", pa.string())]),
        ]
    )
    assert text == ["tag"]
    # Types Arrow promotes agree; a column only one file types needs no check.
    assert expected == pa.schema([("prompt", pa.string()), ("score", pa.float64())])


def _mixed_directory(root) -> None:
    pq.write_table(
        pa.table(
            {
                "id": ["a1", "a2"],
                "prompt": ["fox", "owl"],
                "tag": pa.array([1, 2], pa.int64()),
                "width": pa.array([64, 100], pa.int64()),
                "score": pa.array([1, 2], pa.int64()),
            }
        ),
        root / "a.parquet",
    )
    (root / "b.csv").write_text(
        "id,prompt,tag,width,score\n007,123,red,64,0.5\n7,cat,NA,wide,1.5\n"
    )
    (root / "c.jsonl").write_text(
        json.dumps({"id": 8, "prompt": "dog", "tag": [1, 2], "width": 64, "score": 3}) + "\n"
    )


def test_files_that_disagree_on_types_make_one_table(tmp_path):
    _mixed_directory(tmp_path)
    table = _read_all(tmp_path)
    assert table.schema.field("tag").type == pa.string()
    assert table.schema.field("score").type == pa.string()  # CSV's is text
    rows = {r["id"]: r for r in prepare_table(table, CONFIG).to_pylist()}
    assert {k: r["tag"] for k, r in rows.items()} == {
        "a1": "1",
        "a2": "2",
        "007": "red",
        "7": "NA",
        "8": "[1, 2]",
    }
    assert {k for k, r in rows.items() if r["status"] == "ok"} == {"a1", "007", "8"}
    assert rows["7"]["error"] == "width='wide': must be a positive multiple of 8"
    assert rows["a2"]["error"] == "width='100': must be a positive multiple of 8"
    assert rows["007"]["prompt"] == "123" and rows["007"]["width"] == 64


def test_every_file_is_checked_not_only_the_first(tmp_path):
    for n in range(70):
        pq.write_table(pa.table({"prompt": ["p"], "tag": [n]}), tmp_path / f"p{n:03d}.parquet")
    (tmp_path / "p999.csv").write_text("prompt,tag\nq,text\n")
    text, _ = check_prompt_files(list_prompt_files(str(tmp_path)))
    assert text == ["tag"]
    (tmp_path / "p999.csv").write_text("prompt,status\nq,done\n")
    with pytest.raises(InputError, match="status"):
        check_prompt_files(list_prompt_files(str(tmp_path)))


def test_unreadable_file_is_named(tmp_path):
    (tmp_path / "a.csv").write_text("prompt\nq\n")
    (tmp_path / "b.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="b.parquet cannot be read as parquet"):
        check_prompt_files(list_prompt_files(str(tmp_path)))


def test_conform_chunk_makes_text_of_any_type():
    chunk = pa.table(
        {
            "id": pa.array([7, 8], pa.int64()),
            "flag": [True, None],
            "nested": [{"a": 1}, {"a": None}],
            "items": [[1, 2], []],
            "score": [1.5, 2.0],
        }
    )
    out = conform_chunk(chunk, ["id", "flag", "nested", "items", "score"])
    assert all(t == pa.string() for t in out.schema.types)
    assert out.to_pylist() == [
        {"id": "7", "flag": "true", "nested": '{"a": 1}', "items": "[1, 2]", "score": "1.5"},
        {"id": "8", "flag": None, "nested": '{"a": null}', "items": "[]", "score": "2.0"},
    ]


def test_conform_chunk_when_a_type_changes_past_the_peeked_rows():
    expected = pa.schema([("width", pa.int64()), ("note", pa.string()), ("tag", pa.int64())])
    chunk = pa.table(
        {
            "prompt": ["a", "b", "c"],
            "width": ["64", "wide", None],
            "note": pa.array([1, 2, None], pa.int64()),
            READ_ERROR_COLUMN: [None, None, "prompt='x': is not valid Unicode text"],
        }
    )
    out = conform_chunk(chunk, (), expected, "b.csv")
    assert out.column("width").to_pylist() == [64, None, None]
    assert out.column("note").to_pylist() == ["1", "2", None]
    assert out.column(READ_ERROR_COLUMN).to_pylist() == [
        None,
        "width='wide': must be an integer",
        "prompt='x': is not valid Unicode text",
    ]
    rows = prepare_table(out, CONFIG).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "error", "error"]
    with pytest.raises(InputError, match="b.csv: column 'tag' holds string values"):
        conform_chunk(pa.table({"prompt": ["a"], "tag": ["x"]}), (), expected, "b.csv")


def test_jsonl_keeps_text_as_text_and_integers_exact():
    """pyarrow's JSON reader would make dates timestamps and big integers inexact doubles."""
    table = _jsonl(
        {"id": 12345678901234567890123, "prompt": "a", "day": "2024-01-01", "seed": 10**20},
        {"id": 1, "prompt": "b", "day": "2024-01-02", "meta": {"at": "2024-01-01 10:00:00"}},
    )
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == ["12345678901234567890123", "1"]
    assert [r["day"] for r in rows] == ["2024-01-01", "2024-01-02"]
    assert rows[1]["meta"] == {"at": "2024-01-01 10:00:00"}
    prepared = prepare_table(table, CONFIG).to_pylist()
    assert "100000000000000000000" in prepared[0]["error"]  # every digit, not 1e+20
    plain = _jsonl({"id": 7, "prompt": "a", "day": "2024-01-01", "n": 2.5})
    assert plain.to_pylist() == [{"id": "7", "prompt": "a", "day": "2024-01-01", "n": 2.5}]


def test_a_chunk_whose_types_change_past_the_peek_is_conformed(tmp_path, monkeypatch):
    from sdray.batch import read

    monkeypatch.setattr(read, "PEEK_JSON_LINES", 3)
    lines = [{"prompt": f"p{i}", "width": 64, "tag": i} for i in range(5)]
    lines += [{"prompt": "late", "width": "wide", "tag": 5}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    file = list_prompt_files(str(path))[0]
    text, expected = check_prompt_files([file])
    chunks = [
        conform_chunk(c, text, expected, "p.jsonl")
        for c in read.read_prompt_file(file, chunk_rows=3)
    ]
    assert [c.schema.field("width").type for c in chunks] == [pa.int64(), pa.int64()]
    rows = prepare_table(pa.concat_tables(chunks, promote_options="permissive"), CONFIG)
    rows = rows.to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * 5 + ["error"]
    assert rows[5]["error"] == "width='wide': must be an integer"

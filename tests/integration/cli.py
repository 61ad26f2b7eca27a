"""The `sdray` command as a subprocess, and reading back the metadata it wrote."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads

SDRAY = str(Path(sys.executable).with_name("sdray"))


def run_cli(args: list[str], env: dict[str, str], timeout: float = 300):
    """Run `sdray ARGS` to completion (bounded) and capture its output."""
    return subprocess.run([SDRAY, *args], env=env, capture_output=True, text=True, timeout=timeout)


def read_metadata(output: Path | str, filesystem=None) -> list[dict]:
    """Every metadata row of an output, Hive partition columns included."""
    dataset = pads.dataset(
        f"{output}/metadata", filesystem=filesystem, format="parquet", partitioning="hive"
    )
    return dataset.to_table().to_pylist()


def check_output_once(output: Path, ids: list[str]) -> list[dict]:
    """An output on local disk holds every id once, generated, each image where its row says
    with the bytes its sha256 says, no image without its committed row, and nothing staged."""
    import hashlib

    rows = read_metadata(output)
    found = [row["id"] for row in rows]
    assert len(found) == len(set(found)), f"rows twice: {len(found) - len(set(found))}"
    assert sorted(found) == sorted(ids), f"rows lost: {sorted(set(ids) - set(found))[:5]}"
    for row in rows:
        assert row["status"] == "ok", row
        data = (output / row["image_path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
    stored = {
        path.relative_to(output).as_posix()
        for path in (output / "images").rglob("*")
        if path.is_file()
    }
    orphans = stored - {row["image_path"] for row in rows}
    assert not orphans, f"image files without a committed row: {sorted(orphans)[:5]}"
    assert not list(output.glob(".sdray-staging/**/*.parquet")), "staged pieces left behind"
    return rows

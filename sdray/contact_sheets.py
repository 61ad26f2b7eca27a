"""Contact sheets: for each prompt (and combination of the other axes) a labelled grid image."""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

SHEETS_DIR = "contact_sheets"
SHEETS_INDEX = "index.json"
GROUP_COLUMN = "__sdray_sheet"
MAX_SIDE = 32  # values per sheet side; more are left out (and counted in the sheet's record)
PAD = 6
GAP = 4
MIN_WIDTH = 360
FONT_SIZE = 13
BACKGROUND = (255, 255, 255)
EMPTY = (228, 228, 228)
INK = (20, 20, 20)
ERROR_INK = (190, 30, 30)


def format_value(value: Any) -> str:
    """A value as labels show it: ints plain, floats by repr (7.5, 1.0), text as is."""
    if isinstance(value, float):
        return repr(value)
    return str(value)


@dataclass(frozen=True)
class SheetPlan:
    """What every sheet of a sweep shares: its axes, which two are laid out, how groups form."""

    axes: list[dict[str, Any]]  # sweep.json's axes: name, type, size, values or range
    rows: str | None
    cols: str | None
    max_tile: int
    by_prompt_only: bool  # zip and random: one sheet per prompt (their axes vary together)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> SheetPlan:
        """The plan from a sweep.json record."""
        sheet = record["sheet"]
        return cls(
            axes=record["axes"],
            rows=sheet["rows"],
            cols=sheet["cols"],
            max_tile=sheet["max_tile"],
            by_prompt_only=record["mode"] in ("zip", "random"),
        )

    @property
    def group_axes(self) -> list[str]:
        """Axes that split sheets apart: all but the two laid out (none in zip, random mode)."""
        if self.by_prompt_only:
            return []
        return [a["name"] for a in self.axes if a["name"] not in (self.rows, self.cols)]

    def axis(self, name: str) -> dict[str, Any]:
        """sweep.json's record of one axis."""
        return next(a for a in self.axes if a["name"] == name)

    def order(self, name: str, values: list[Any]) -> list[Any]:
        """Distinct values in the spec's order (listed axes) or numeric order (ranges)."""
        listed = self.axis(name).get("values")
        distinct = list(dict.fromkeys(values))
        if listed is not None and len(listed) == self.axis(name)["size"]:
            rank = {v: i for i, v in enumerate(listed)}
            return sorted(distinct, key=lambda v: rank.get(v, len(rank)))
        return sorted(distinct)


_TYPES = {"float": pa.float64(), "int": pa.int64(), "str": pa.string()}


def normalize(table: pa.Table, plan: SheetPlan) -> pa.Table:
    """Axis columns in their sweep types (Hive partition columns come back as text)."""
    import pyarrow.compute as pc

    for axis in plan.axes:
        name, wanted = axis["name"], _TYPES[axis["type"]]
        if name in table.column_names and table.schema.field(name).type != wanted:
            column = table.column(name)
            if pa.types.is_dictionary(column.type):
                column = column.cast(column.type.value_type)
            if pa.types.is_string(column.type) and wanted != pa.string():
                column = pc.if_else(pc.equal(column, "__HIVE_DEFAULT_PARTITION__"), None, column)
            table = table.set_column(table.column_names.index(name), name, column.cast(wanted))
    if "prompt_index" in table.column_names:
        index = table.column_names.index("prompt_index")
        table = table.set_column(index, "prompt_index", table.column("prompt_index").cast("int64"))
    return table


def add_group_column(table: pa.Table, plan: SheetPlan) -> pa.Table:
    """Add the sheet each row belongs to: its prompt and its values of the grouping axes."""
    table = normalize(table, plan)
    names = ["prompt_index", *plan.group_axes]
    keys = [json.dumps([row[n] for n in names]) for row in table.select(names).to_pylist()]
    return table.append_column(GROUP_COLUMN, pa.array(keys, pa.string()))


def sheet_name(prompt_index: int, fixed: dict[str, Any]) -> str:
    """A file name from the prompt's position and the fixed axis values; never from raw text."""
    parts = [f"p{prompt_index:05d}"]
    for name, value in fixed.items():
        slug = re.sub(r"[^A-Za-z0-9.+-]+", "_", format_value(value))[:24].strip("_.")
        parts.append(f"{name}-{slug}")
    stem = "_".join(parts)
    if len(stem) > 120:
        stem = stem[:100] + "_" + hashlib.sha256(stem.encode()).hexdigest()[:12]
    return stem + ".png"


def load_image(fs, root: str, image_path: str, cache: dict[str, Any] | None = None):
    """A PIL image from a metadata `image_path`: a file, `shard.tar#member` or `shard.parquet#key`."""
    from PIL import Image

    from sdray.storage import join

    cache = {} if cache is None else cache
    container, _, member = image_path.partition("#")
    if not member:
        with fs.open(join(root, container), "rb") as handle:
            data = handle.read()
    elif container.endswith(".tar"):
        import tarfile

        if container not in cache:
            cache.clear()
            with fs.open(join(root, container), "rb") as handle:
                cache[container] = tarfile.open(fileobj=io.BytesIO(handle.read()))
        data = cache[container].extractfile(member).read()
    else:
        import pyarrow.parquet as pq

        if container not in cache:
            cache.clear()
            with fs.open(join(root, container), "rb") as handle:
                table = pq.read_table(handle, columns=["key", "image"])
            cache[container] = dict(
                zip(table.column("key").to_pylist(), table.column("image").to_pylist(), strict=True)
            )
        data = cache[container][member]
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def _font():
    from PIL import ImageFont

    return ImageFont.load_default(size=FONT_SIZE)


def _fit(draw, text: str, font, width: int) -> str:
    """Text cut with an ellipsis to fit `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def draw_sheet(
    cells: dict[tuple[int, int], Any],
    row_labels: list[str],
    col_labels: list[str],
    title_lines: list[str],
):
    """Lay images out in a labelled grid; returns (PIL image, layout with every box drawn).

    `cells` maps (row, col) to a PIL image, or to a short text (such as "error") for a cell
    with no image. Cells left out are drawn empty.
    """
    from PIL import Image, ImageDraw

    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(font.getbbox("Ag")[3]) + 4
    images = [c for c in cells.values() if not isinstance(c, str)]
    tile_w = max((im.width for im in images), default=64)
    tile_h = max((im.height for im in images), default=64)
    nrows, ncols = max(1, len(row_labels)), max(1, len(col_labels))
    col_w = max([tile_w] + [int(probe.textlength(t, font=font)) + 2 for t in col_labels])
    label_w = max([0] + [int(probe.textlength(t, font=font)) for t in row_labels])
    left = label_w + 2 * PAD if row_labels else PAD
    title_h = len(title_lines) * line_h + PAD
    header_h = line_h + PAD if col_labels else 0
    top = title_h + header_h
    width = max(MIN_WIDTH, left + ncols * col_w + (ncols - 1) * GAP + PAD)
    height = top + nrows * tile_h + (nrows - 1) * GAP + PAD

    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    layout: dict[str, Any] = {"size": [width, height], "cells": [], "row_labels": []}
    layout["col_labels"] = []
    for index, line in enumerate(title_lines):
        draw.text(
            (PAD, PAD // 2 + index * line_h), _fit(draw, line, font, width - 2 * PAD), INK, font
        )
    for c, text in enumerate(col_labels):
        x0 = left + c * (col_w + GAP)
        w = draw.textlength(text, font=font)
        x = x0 + (col_w - w) / 2
        draw.text((x, title_h), text, INK, font)
        layout["col_labels"].append({"text": text, "box": [int(x), title_h, int(x + w) + 1, top]})
    for r, text in enumerate(row_labels):
        y0 = top + r * (tile_h + GAP)
        y = y0 + (tile_h - line_h) / 2
        draw.text((PAD, y), text, INK, font)
        box = [PAD, int(y), PAD + int(draw.textlength(text, font=font)) + 1, int(y) + line_h]
        layout["row_labels"].append({"text": text, "box": box})
    for r in range(nrows):
        for c in range(ncols):
            x0 = left + c * (col_w + GAP)
            y0 = top + r * (tile_h + GAP)
            cell = cells.get((r, c))
            if cell is None or isinstance(cell, str):
                draw.rectangle([x0, y0, x0 + col_w - 1, y0 + tile_h - 1], fill=EMPTY)
                if cell:
                    draw.text((x0 + 3, y0 + 3), _fit(draw, cell, font, col_w - 6), ERROR_INK, font)
                continue
            x = x0 + (col_w - cell.width) // 2
            y = y0 + (tile_h - cell.height) // 2
            sheet.paste(cell, (x, y))
            layout["cells"].append(
                {"row": r, "col": c, "box": [x, y, x + cell.width, y + cell.height]}
            )
    return sheet, layout


def _thumbnail(image, size: int):
    copy = image.copy()
    copy.thumbnail((size, size))
    return copy


def draw_group(table: pa.Table, plan: SheetPlan, output_uri: str, storage_options, thumb_size):
    """One sheet from one group's metadata rows; also writes each ok row's gallery thumbnail."""
    from sdray.gallery import thumbnail_path, write_web_file
    from sdray.storage import filesystem, join, write_bytes_atomic

    fs, root = filesystem(output_uri, storage_options)
    rows = sorted(table.drop_columns([GROUP_COLUMN]).to_pylist(), key=lambda r: r["id"])
    first = rows[0]
    row_values = plan.order(plan.rows, [r[plan.rows] for r in rows]) if plan.rows else [None]
    col_values = plan.order(plan.cols, [r[plan.cols] for r in rows]) if plan.cols else [None]
    left_out = max(0, len(row_values) - MAX_SIDE) + max(0, len(col_values) - MAX_SIDE)
    row_values, col_values = row_values[:MAX_SIDE], col_values[:MAX_SIDE]
    row_at = {v: i for i, v in enumerate(row_values)}
    col_at = {v: i for i, v in enumerate(col_values)}

    cells: dict[tuple[int, int], Any] = {}
    ids: dict[tuple[int, int], str] = {}
    cache: dict[str, Any] = {}
    thumbs = 0
    for row in rows:
        image = None
        if row["status"] == "ok" and row.get("image_path"):
            image = load_image(fs, root, row["image_path"], cache)
            thumb = _thumbnail(image, thumb_size)
            buffer = io.BytesIO()
            thumb.save(buffer, format="JPEG", quality=85)
            write_web_file(fs, join(root, thumbnail_path(row["id"])), buffer.getvalue())
            thumbs += 1
        r = row_at.get(row[plan.rows] if plan.rows else None)
        c = col_at.get(row[plan.cols] if plan.cols else None)
        if r is None or c is None or (r, c) in cells:
            continue  # past MAX_SIDE, or a second image for the cell (random mode)
        cells[(r, c)] = _thumbnail(image, plan.max_tile) if image is not None else "error"
        ids[(r, c)] = row["id"]

    several = {a["name"] for a in plan.axes if a["size"] > 1}
    fixed = {n: first[n] for n in plan.group_axes if n in several}
    title = [first["prompt"] or ""]
    if fixed:
        title.append("  ".join(f"{n}={format_value(v)}" for n, v in fixed.items()))
    title.append(f"rows: {plan.rows or '-'}    cols: {plan.cols or '-'}")
    sheet, layout = draw_sheet(
        cells,
        [format_value(v) for v in row_values] if plan.rows else [],
        [format_value(v) for v in col_values] if plan.cols else [],
        title,
    )
    for cell in layout["cells"]:
        cell["id"] = ids[(cell["row"], cell["col"])]
    name = sheet_name(int(first["prompt_index"]), fixed)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG", compress_level=6)
    write_web_file(fs, join(root, SHEETS_DIR, name), buffer.getvalue())
    record = {
        "file": f"{SHEETS_DIR}/{name}",
        "prompt": first["prompt"],
        "prompt_index": int(first["prompt_index"]),
        "fixed": fixed,
        "rows": {"axis": plan.rows, "values": row_values},
        "cols": {"axis": plan.cols, "values": col_values},
        "values_left_out": left_out,
        "title": title,
        "images": len(rows),
        "thumbnails": thumbs,
        **layout,
    }
    sidecar = json.dumps(record, indent=1, default=str).encode()
    write_bytes_atomic(fs, join(root, SHEETS_DIR, name.removesuffix(".png") + ".json"), sidecar)
    summary = {k: record[k] for k in ("file", "prompt", "prompt_index", "images", "thumbnails")}
    summary["fixed"] = json.dumps(fixed, default=str)
    return pa.Table.from_pylist([summary])


def _partitions_for(rows: int) -> int:
    """Shuffle partitions: one per ~50k rows; Ray's default (200) is slow for small sweeps."""
    return max(1, min(200, rows // 50_000 + 1))


def write_contact_sheets(
    output_uri: str,
    record: dict[str, Any],
    *,
    storage_options: dict[str, Any] | None = None,
    thumb_size: int = 256,
) -> list[dict[str, Any]]:
    """Draw every sheet and every gallery thumbnail in one Ray Data pass over the metadata.

    Returns one entry per sheet (file, prompt, fixed axis values, image count), also written to
    `contact_sheets/index.json`.
    """
    import ray

    from sdray.batch.job import ensure_ray
    from sdray.batch.sink import METADATA_DIR
    from sdray.storage import filesystem, join, write_bytes_atomic

    ensure_ray()
    plan = SheetPlan.from_record(record)
    fs, root = filesystem(output_uri, storage_options)
    metadata = ray.data.read_parquet(
        join(output_uri, METADATA_DIR), filesystem=fs, file_extensions=["parquet"]
    )
    sheets = (
        metadata.map_batches(
            add_group_column, fn_kwargs={"plan": plan}, batch_format="pyarrow", num_cpus=0.25
        )
        .groupby(GROUP_COLUMN, num_partitions=_partitions_for(record["rows"]))
        .map_groups(
            draw_group,
            fn_kwargs={
                "plan": plan,
                "output_uri": output_uri,
                "storage_options": storage_options,
                "thumb_size": thumb_size,
            },
            batch_format="pyarrow",
            num_cpus=0.5,
        )
        .take_all()
    )
    sheets = sorted(
        ({**s, "fixed": json.loads(s["fixed"])} for s in sheets),
        key=lambda s: (s["prompt_index"], s["file"]),
    )
    index = json.dumps({"sheets": sheets}, indent=1, default=str).encode()
    write_bytes_atomic(fs, join(root, SHEETS_DIR, SHEETS_INDEX), index)
    return sheets

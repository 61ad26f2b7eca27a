"""Contact sheets and gallery thumbnails, drawn in two Ray Data stages over a finished sweep.

1. `tile_shards`, one call per metadata shard: reads the shard's metadata and each image
   container its rows point to (a tar or Parquet shard, or single image files) exactly once. It
   shrinks the images a sheet cell can show into tiles, and writes the thumbnail of each row the
   gallery shows. Rows whose cell lies past a sheet's MAX_SIDE values are not loaded, and an
   image's size is read from its header before it is decoded.
2. `draw_group`, one call per sheet (rows grouped by prompt and the undrawn axes): lays the
   tiles out with labelled rows and columns, and passes the gallery's rows on to the driver.

Layouts by mode:
- grid: the `sheet` axes as rows × cols; one sheet per prompt and combination of the other axes.
- zip: one strip per prompt, in zip order; each column is labelled with all its axis values.
- random: one sheet per prompt; rows × cols are the values drawn (up to MAX_SIDE each), each cell
  captioned with its other axis values. A cell drawn more than once shows its first draw by id;
  the sheet's record counts the others (`hidden_draws`).
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
import math
import os
import re
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import pyarrow as pa

from sdray.sweep.paths import (
    GALLERY_DIR,
    SHEETS_DIR,
    SHEETS_INDEX,
    display_value,
    format_value,
    id_digest,
    strip_path,
    thumbnail_path,
    write_web_file,
)

GROUP_COLUMN = "__sdray_sheet"
TILE_COLUMN = "__sdray_tile"
RANK_COLUMN = "__sdray_rank"
GALLERY_COLUMN = "__sdray_gallery"
MAX_SIDE = 32  # values per sheet side (cells per strip); more are left out, and counted
PAD = 6
GAP = 4
MIN_WIDTH = 360
FONT_SIZE = 13
BACKGROUND = (255, 255, 255)
EMPTY = (228, 228, 228)
INK = (20, 20, 20)
ERROR_INK = (190, 30, 30)
CAPTION_INK = (80, 80, 90)
SLUG_CHARS = 24
MAX_TASKS = 2048  # stage 1 tasks at most; each takes its share of the metadata shards
MAX_TEXT_WIDTH = 200  # pixels a column may widen to for its labels


@dataclass(frozen=True)
class SheetPlan:
    """What every sheet of a sweep shares: its axes, which two are laid out, how groups form."""

    axes: list[dict[str, Any]]  # sweep.json's axes: name, type, size, values or range
    rows: str | None
    cols: str | None
    max_tile: int
    mode: str = "grid"

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> SheetPlan:
        """The plan from a sweep.json record."""
        sheet = record["sheet"]
        strip = record["mode"] == "zip"
        return cls(
            axes=record["axes"],
            rows=None if strip else sheet["rows"],
            cols=None if strip else sheet["cols"],
            max_tile=sheet["max_tile"],
            mode=record["mode"],
        )

    @property
    def strip(self) -> bool:
        """Zip mode: one row of cells in zip order, not a rows × cols grid."""
        return self.mode == "zip"

    @property
    def several(self) -> list[str]:
        """Axes with more than one value, in spec order."""
        return [a["name"] for a in self.axes if a["size"] > 1]

    @property
    def group_axes(self) -> list[str]:
        """Axes that split sheets apart: all but the two laid out (none in zip, random mode)."""
        if self.mode != "grid":
            return []
        return [a["name"] for a in self.axes if a["name"] not in (self.rows, self.cols)]

    @property
    def caption_axes(self) -> list[str]:
        """Random mode: the axes a cell's caption names (those that vary but are not laid out)."""
        if self.mode != "random":
            return []
        return [n for n in self.several if n not in (self.rows, self.cols)]

    def axis(self, name: str) -> dict[str, Any]:
        """sweep.json's record of one axis."""
        return next(a for a in self.axes if a["name"] == name)

    @cached_property
    def _ranks(self) -> dict[str, dict[Any, int]]:
        ranks = {}
        for axis in self.axes:
            listed = axis.get("values")
            if listed is not None:  # a long listed axis records only its first values
                ranks[axis["name"]] = {v: i for i, v in enumerate(listed)}
        return ranks

    def position(self, name: str, value: Any) -> int | None:
        """A value's position on its axis, in spec order; None if it is not (known) on it."""
        ranks = self._ranks.get(name)
        if ranks is not None:
            return ranks.get(value)  # None past the recorded values: beyond any sheet's side
        axis = self.axis(name)
        span = axis.get("range")
        if span is None or not isinstance(value, int):
            return None
        steps, rest = divmod(value - span["start"], span["step"])
        return steps if rest == 0 and 0 <= steps < axis["size"] else None

    def order(self, name: str, values: list[Any]) -> list[Any]:
        """Distinct values in their axis order (values of unknown position last, sorted)."""

        def key(value: Any) -> tuple:
            at = self.position(name, value)
            return (at is None, at if at is not None else 0, value)

        return sorted(dict.fromkeys(v for v in values if v is not None), key=key)

    def zip_index(self, row: dict[str, Any]) -> int:
        """Zip mode: a row's place in its prompt's strip (all varying axes share it)."""
        if not self.several:
            return 0
        for name in self.several:
            at = self.position(name, row.get(name))
            if at is not None:
                return at
        return MAX_SIDE  # past the recorded values of a long axis: off the strip

    def may_show(self, row: dict[str, Any]) -> bool:
        """Whether a row's image can land in a sheet cell, decided before loading it."""
        if self.strip:
            return self.zip_index(row) < MAX_SIDE
        if self.mode == "random":
            return True  # rows and columns are the values drawn, known only per sheet
        for name in (self.rows, self.cols):
            if name is not None:
                at = self.position(name, row.get(name))
                if at is None or at >= MAX_SIDE:
                    return False
        return True

    def group_key(self, row: dict[str, Any]) -> str:
        """The sheet a row belongs to: its prompt and its values of the grouping axes."""
        return json.dumps([row.get("prompt_index"), *(row.get(n) for n in self.group_axes)])


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


def _slug(name: str, value: Any) -> str:
    """A value as a file-name part: as is when it is short, plain ASCII and not free text;
    otherwise a cut, ASCII-only form followed by `~` and a hash of the exact value."""
    text = format_value(value)
    exact = rf"[A-Za-z0-9+-][A-Za-z0-9._+-]{{0,{SLUG_CHARS - 1}}}"
    if name != "negative_prompt" and re.fullmatch(exact, text):
        return text
    cut = re.sub(r"[^A-Za-z0-9.+-]+", "_", text)[:SLUG_CHARS].strip("_.")
    return f"{cut}~{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def sheet_name(prompt_index: int, fixed: dict[str, Any]) -> str:
    """A sheet's file name: the prompt's position and the fixed axis values, never raw text.

    Distinct (prompt, values) give distinct names: a number or scheduler name is written as is
    (exact), free text or anything long or non-ASCII as a cut form plus `~` and a hash of its
    exact text (`~` appears nowhere else, so the parts cannot run into each other).
    """
    parts = [f"p{prompt_index:05d}"]
    parts += [f"{name}-{_slug(name, value)}" for name, value in fixed.items()]
    stem = "_".join(parts)
    if len(stem) > 150:
        stem = f"{stem[:100]}~{hashlib.sha256(stem.encode()).hexdigest()[:16]}"
    return stem + ".png"


# --- stage 1: one pass per shard --------------------------------------------------------------


def read_images(
    fs, root: str, container: str, members: set[str], column: str = "image"
) -> dict[str, bytes]:
    """The encoded images `members` of one container, reading it once: a tar shard streamed
    member by member, a Parquet shard's `key`/`image` (or `strip`) columns, or a single image
    file (member "")."""
    from sdray.storage import join

    path = join(root, container)

    def read() -> dict[str, bytes]:
        if not container.endswith((".tar", ".parquet")) or "" in members:
            with fs.open(path, "rb") as handle:
                return {"": handle.read()}
        if container.endswith(".tar"):
            import tarfile

            found = {}
            with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|") as tar:
                for info in tar:
                    if info.name in members:
                        found[info.name] = tar.extractfile(info).read()
            return found
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as handle:
            table = pq.read_table(handle, columns=["key", column])
        keys, images = table.column("key").to_pylist(), table.column(column)
        return {k: images[i].as_py() for i, k in enumerate(keys) if k in members}

    return read()


def _read_metadata_shard(fs, metadata_root: str, path: str) -> pa.Table:
    """One metadata file, with the values of its Hive partition directories as columns."""
    import pyarrow.dataset as pads
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    dataset = pads.dataset(
        [path],
        filesystem=PyFileSystem(FSSpecHandler(fs)),
        format="parquet",
        partitioning="hive",
        partition_base_dir=metadata_root,
    )
    return dataset.to_table()


def _shrunk(image, size: int):
    """A copy that fits in size × size."""
    copy = image.copy()
    copy.thumbnail((size, size))
    return copy


def _encode(image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "JPEG":
        image.save(buffer, format="JPEG", quality=85)
    else:
        image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def tile_and_thumbnail(
    data: bytes, tile_size: int | None, thumb_size: int | None
) -> tuple[bytes | None, bytes | None]:
    """A sheet tile (when `tile_size`) and a gallery thumbnail (when `thumb_size`) of one
    encoded image. The size is read from the header first: an image that already fits its tile
    is passed on as stored, and pixels are decoded only when something must be shrunk (a JPEG
    at the smallest scale that still covers both sizes)."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))  # the header only
    tile = data if tile_size and max(image.size) <= tile_size else None
    sizes = [s for s in (None if tile else tile_size, thumb_size) if s]
    if not sizes:
        return tile, None
    if image.format == "JPEG":
        image.draft("RGB", (max(sizes), max(sizes)))
    pixels = image.convert("RGB")
    if tile_size and tile is None:
        tile = _encode(_shrunk(pixels, tile_size), "PNG")
    thumb = _encode(_shrunk(pixels, thumb_size), "JPEG") if thumb_size else None
    return tile, thumb


def sample_rank(row_id: str) -> float:
    """A row's place in the gallery's sample, uniform in [0, 1): the page shows the rows of
    lowest rank, a pseudo-random sample spread evenly over prompts, axis values and shards."""
    return int(id_digest(row_id)[:16], 16) / 2**64


def sample_rate(rows: int, cap: int) -> float:
    """The rank below which rows are sampled: all rows of a small sweep, else a little more than
    `cap` of them in expectation, so that the `cap` lowest ranks are all among them."""
    if rows <= cap:
        return 1.0
    return min(1.0, (cap + 4 * math.sqrt(cap) + 10) / rows)


def _tile_schema(plan: SheetPlan, axis_types: dict[str, pa.DataType]) -> pa.Schema:
    fields = [
        pa.field(GROUP_COLUMN, pa.string()),
        pa.field("id", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("prompt_index", pa.int64()),
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
    ]
    fields += [pa.field(a["name"], axis_types[a["name"]]) for a in plan.axes]
    fields += [
        pa.field(TILE_COLUMN, pa.binary()),
        pa.field(RANK_COLUMN, pa.float64()),
        pa.field(GALLERY_COLUMN, pa.string()),
    ]
    return pa.schema(fields)


def tile_shards(
    batch: pa.Table,
    *,
    plan: SheetPlan,
    output_uri: str,
    storage_options: dict[str, Any] | None,
    thumb_size: int,
    rate: float,
) -> pa.Table:
    """Stage 1: for each metadata shard in `batch` (column `path`), one row per metadata row
    with its sheet, its tile (when its cell can be shown) and, for the gallery's sampled rows,
    the full metadata as JSON; the sampled rows' thumbnails are written here."""
    from sdray.batch.sink import METADATA_DIR
    from sdray.storage import filesystem, join

    fs, root = filesystem(output_uri, storage_options)
    axis_types = {a["name"]: _TYPES[a["type"]] for a in plan.axes}
    schema = _tile_schema(plan, axis_types)
    tables = []
    for path in batch.column("path").to_pylist():
        table = normalize(_read_metadata_shard(fs, join(root, METADATA_DIR), path), plan)
        rows = table.to_pylist()
        wanted: dict[str, set[str]] = defaultdict(set)
        show, rank = [], []
        for row in rows:
            rank.append(sample_rank(row["id"]))
            show.append(plan.may_show(row))
            if row["status"] == "ok" and row.get("image_path") and (show[-1] or rank[-1] < rate):
                container, _, member = row["image_path"].partition("#")
                wanted[container].add(member)
        images: dict[str, bytes] = {}  # image_path -> encoded bytes
        for container, members in wanted.items():  # each container read once
            for member, data in read_images(fs, root, container, members).items():
                images[f"{container}#{member}" if member else container] = data
        _copy_strips(fs, root, [r for r, k in zip(rows, rank, strict=True) if k < rate])
        out: dict[str, list[Any]] = {f.name: [] for f in schema}
        for row, can_show, row_rank in zip(rows, show, rank, strict=True):
            sampled = row_rank < rate
            tile = None
            data = images.get(row.get("image_path") or "")
            if data is not None:
                tile, thumb = tile_and_thumbnail(
                    data, plan.max_tile if can_show else None, thumb_size if sampled else None
                )
                if thumb is not None:
                    write_web_file(fs, join(root, thumbnail_path(row["id"])), thumb)
            out[GROUP_COLUMN].append(plan.group_key(row))
            for name in ("id", "prompt", "prompt_index", "status", "error", *axis_types):
                out[name].append(row.get(name))
            out[TILE_COLUMN].append(tile)
            out[RANK_COLUMN].append(row_rank)
            out[GALLERY_COLUMN].append(json.dumps(row, default=str) if sampled else None)
        tables.append(pa.table(out, schema=schema))
    return pa.concat_tables(tables) if tables else schema.empty_table()


def _copy_strips(fs, root: str, rows: list[dict[str, Any]]) -> None:
    """Beside the gallery's thumbnails, a copy of the filmstrip of each shown row that has one
    (`output.preview_every`), read from whatever container the output format put it in."""
    from sdray.storage import join

    wanted: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    for row in rows:
        path = row.get("preview_path")
        if row["status"] != "ok" or not path:
            continue
        container, _, member = path.partition("#")
        column = "image"
        if member.endswith("#strip"):  # parquet: the row's `strip` column
            member, column = member.removesuffix("#strip"), "strip"
        wanted[(container, column)][member] = row["id"]
    for (container, column), members in wanted.items():
        for member, data in read_images(fs, root, container, set(members), column).items():
            write_web_file(fs, join(root, strip_path(members[member])), data)


# --- stage 2: one call per sheet --------------------------------------------------------------


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
    captions: dict[tuple[int, int], str] | None = None,
):
    """Lay images out in a labelled grid; returns (PIL image, layout with every box drawn).

    `cells` maps (row, col) to a PIL image, or to a short text (such as "error") for a cell
    with no image. Cells left out are drawn empty. Column labels and `captions` (text under a
    cell's image) may hold several lines ("\n"); a column widens for its text up to
    MAX_TEXT_WIDTH pixels, and longer lines are cut with an ellipsis.
    """
    from PIL import Image, ImageDraw

    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(font.getbbox("Ag")[3]) + 4
    images = [c for c in cells.values() if not isinstance(c, str)]
    tile_w = max((im.width for im in images), default=64)
    tile_h = max((im.height for im in images), default=64)
    nrows, ncols = max(1, len(row_labels)), max(1, len(col_labels))
    col_lines = [t.split("\n") for t in col_labels]
    caption_lines = {at: text.split("\n") for at, text in (captions or {}).items()}
    texts = [line for lines in [*col_lines, *caption_lines.values()] for line in lines]
    widest = max([0] + [int(probe.textlength(t, font=font)) + 2 for t in texts])
    col_w = max(tile_w, min(MAX_TEXT_WIDTH, widest))
    row_labels = [_fit(probe, t, font, MAX_TEXT_WIDTH) for t in row_labels]
    label_w = max([0] + [int(probe.textlength(t, font=font)) for t in row_labels])
    left = label_w + 2 * PAD if row_labels else PAD
    title_h = len(title_lines) * line_h + PAD
    header_h = max((len(lines) for lines in col_lines), default=0) * line_h
    header_h += PAD if col_labels else 0
    caption_h = max((len(lines) for lines in caption_lines.values()), default=0) * line_h
    cell_h = tile_h + caption_h
    top = title_h + header_h
    width = max(MIN_WIDTH, left + ncols * col_w + (ncols - 1) * GAP + PAD)
    height = top + nrows * cell_h + (nrows - 1) * GAP + PAD

    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    layout: dict[str, Any] = {"size": [width, height], "cells": [], "row_labels": []}
    layout["col_labels"] = []
    for index, line in enumerate(title_lines):
        draw.text(
            (PAD, PAD // 2 + index * line_h), _fit(draw, line, font, width - 2 * PAD), INK, font
        )
    for c, lines in enumerate(col_lines):
        x0 = left + c * (col_w + GAP)
        box = [x0 + col_w, title_h, x0, title_h + len(lines) * line_h]
        for i, line in enumerate(lines):
            line = _fit(draw, line, font, col_w)
            w = draw.textlength(line, font=font)
            x = x0 + (col_w - w) / 2
            draw.text((x, title_h + i * line_h), line, INK, font)
            box[0], box[2] = min(box[0], int(x)), max(box[2], int(x + w) + 1)
        layout["col_labels"].append({"text": col_labels[c], "box": box})
    for r, text in enumerate(row_labels):
        y0 = top + r * (cell_h + GAP)
        y = y0 + (tile_h - line_h) / 2
        draw.text((PAD, y), text, INK, font)
        box = [PAD, int(y), PAD + int(draw.textlength(text, font=font)) + 1, int(y) + line_h]
        layout["row_labels"].append({"text": text, "box": box})
    for r in range(nrows):
        for c in range(ncols):
            x0 = left + c * (col_w + GAP)
            y0 = top + r * (cell_h + GAP)
            cell = cells.get((r, c))
            if cell is None or isinstance(cell, str):
                draw.rectangle([x0, y0, x0 + col_w - 1, y0 + tile_h - 1], fill=EMPTY)
                if cell:
                    draw.text((x0 + 3, y0 + 3), _fit(draw, cell, font, col_w - 6), ERROR_INK, font)
                continue
            x = x0 + (col_w - cell.width) // 2
            y = y0 + (tile_h - cell.height) // 2
            sheet.paste(cell, (x, y))
            placed = {"row": r, "col": c, "box": [x, y, x + cell.width, y + cell.height]}
            for i, line in enumerate(caption_lines.get((r, c), [])):
                draw.text(
                    (x0, y0 + tile_h + i * line_h), _fit(draw, line, font, col_w), CAPTION_INK, font
                )
            if (r, c) in caption_lines:
                placed["caption"] = captions[(r, c)]
            layout["cells"].append(placed)
    return sheet, layout


def _values_text(row: dict[str, Any], names: list[str], sep: str) -> str:
    return sep.join(f"{n} {display_value(row.get(n))}" for n in names)


def draw_group(
    table: pa.Table, *, plan: SheetPlan, output_uri: str, storage_options: dict[str, Any] | None
) -> pa.Table:
    """Stage 2: one sheet from one group's rows (PNG plus a JSON sidecar with every box).

    Returns rows `kind`, `rank`, `payload`: the sheet's summary, then the group's rows that
    the gallery samples (their full metadata)."""
    from PIL import Image

    from sdray.storage import filesystem, join

    fs, root = filesystem(output_uri, storage_options)
    tiles = table.column(TILE_COLUMN).to_pylist()
    rows = table.drop_columns([TILE_COLUMN, GROUP_COLUMN]).to_pylist()
    order = sorted(range(len(rows)), key=lambda i: rows[i]["id"])
    first = rows[order[0]]
    if plan.strip:
        row_values: list[Any] = [None]
        col_values = sorted({plan.zip_index(r) for r in rows})
    else:
        row_values = plan.order(plan.rows, [r[plan.rows] for r in rows]) if plan.rows else [None]
        col_values = plan.order(plan.cols, [r[plan.cols] for r in rows]) if plan.cols else [None]
    left_out = max(0, len(row_values) - MAX_SIDE) + max(0, len(col_values) - MAX_SIDE)
    row_values, col_values = row_values[:MAX_SIDE], col_values[:MAX_SIDE]
    row_at = {v: i for i, v in enumerate(row_values)}
    col_at = {v: i for i, v in enumerate(col_values)}

    cells: dict[tuple[int, int], Any] = {}
    ids: dict[tuple[int, int], str] = {}
    captions: dict[tuple[int, int], str] = {}
    col_labels: dict[int, str] = {}
    hidden = 0
    for i in order:
        row = rows[i]
        if plan.strip:
            r, c = 0, col_at.get(plan.zip_index(row))
        else:
            r = row_at.get(row[plan.rows] if plan.rows else None)
            c = col_at.get(row[plan.cols] if plan.cols else None)
        if r is None or c is None:
            continue  # past MAX_SIDE values
        if (r, c) in cells:
            hidden += 1  # random mode: a second draw of the cell
            continue
        if tiles[i] is not None:
            cells[(r, c)] = Image.open(io.BytesIO(tiles[i])).convert("RGB")
        else:
            cells[(r, c)] = "error" if row["status"] != "ok" else "no image"
        ids[(r, c)] = row["id"]
        if plan.strip:
            col_labels[c] = _values_text(row, plan.several, "\n")
        if plan.caption_axes:
            captions[(r, c)] = _values_text(row, plan.caption_axes, "\n")

    fixed = {n: first[n] for n in plan.group_axes if n in plan.several}
    title = [first["prompt"] or ""]
    if fixed:
        title.append("  ".join(f"{n}={display_value(v)}" for n, v in fixed.items()))
    if plan.strip:
        title.append(f"zip: {', '.join(plan.several) or '-'}")
        labels = ([], [col_labels.get(c, "") for c in range(len(col_values))])
    else:
        title.append(f"rows: {plan.rows or '-'}    cols: {plan.cols or '-'}")
        labels = (
            [display_value(v) for v in row_values] if plan.rows else [],
            [display_value(v) for v in col_values] if plan.cols else [],
        )
    if plan.mode == "random":
        title.append(f"{len(rows)} draws; a cell drawn twice shows its first by id")
    sheet, layout = draw_sheet(cells, *labels, title, captions=captions or None)
    for cell in layout["cells"]:
        cell["id"] = ids[(cell["row"], cell["col"])]
    name = sheet_name(int(first["prompt_index"]), fixed)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG", compress_level=6)
    write_web_file(fs, join(root, SHEETS_DIR, name), buffer.getvalue())
    record = {
        "file": f"{SHEETS_DIR}/{name}",
        "layout": "strip" if plan.strip else "grid",
        "prompt": first["prompt"],
        "prompt_index": int(first["prompt_index"]),
        "fixed": fixed,
        "rows": {"axis": plan.rows, "values": [] if plan.strip else row_values},
        "cols": {
            "axis": "zip" if plan.strip else plan.cols,
            "values": labels[1] if plan.strip else col_values,
        },
        "values_left_out": left_out,
        "hidden_draws": hidden,
        "title": title,
        "images": sum(r["status"] == "ok" for r in rows),
        **layout,
    }
    sidecar = json.dumps(record, indent=1, default=str).encode()
    write_web_file(fs, join(root, SHEETS_DIR, name.removesuffix(".png") + ".json"), sidecar)
    summary = {k: record[k] for k in ("file", "prompt", "prompt_index", "fixed", "images")}
    out = {"kind": ["sheet"], "rank": [None], "payload": [json.dumps(summary, default=str)]}
    for row in rows:
        if row[GALLERY_COLUMN] is not None:
            out["kind"].append("gallery")
            out["rank"].append(row[RANK_COLUMN])
            out["payload"].append(row[GALLERY_COLUMN])
    schema = pa.schema([("kind", pa.string()), ("rank", pa.float64()), ("payload", pa.string())])
    return pa.table(out, schema=schema)


# --- the driver -------------------------------------------------------------------------------


@dataclass
class SweepViews:
    """What the sheets pass hands the gallery page."""

    sheet_count: int = 0
    listed_sheets: list[dict[str, Any]] = field(default_factory=list)  # the first, for the page
    gallery_rows: list[dict[str, Any]] = field(default_factory=list)  # the sample, full rows
    rows: int = 0  # rows in the sweep


def _partitions_for(rows: int) -> int:
    """Shuffle partitions: one per ~50k rows; Ray's default (200) is slow for small sweeps."""
    return max(1, min(200, rows // 50_000 + 1))


def _metadata_files(fs, root: str) -> list[str]:
    from sdray.batch.sink import METADATA_DIR
    from sdray.storage import join

    folder = join(root, METADATA_DIR)
    if not fs.exists(folder):
        return []
    names = [p for p in fs.find(folder) if p.endswith(".parquet")]
    return sorted(p for p in names if not p.rsplit("/", 1)[-1].startswith("."))


def _clear(fs, root: str) -> None:
    """Remove earlier sheets and thumbnails: a resumed run may lay its sheets out otherwise."""
    from sdray.storage import join

    for name in (SHEETS_DIR, GALLERY_DIR):
        path = join(root, name)
        if fs.exists(path):
            fs.rm(path, recursive=True)


class _SheetIndex:
    """contact_sheets/index.json written as the summaries stream in (never all in memory),
    keeping the first `keep` sheets by (prompt, file) for the page."""

    def __init__(self, fs, path: str, keep: int) -> None:
        from sdray.storage import is_local

        self.fs, self.path, self.keep = fs, path, keep
        self.count = 0
        self._first: list[tuple] = []  # a heap, largest key on top: the `keep` smallest
        # On disk, a temporary file beside the index, renamed into place; else a local one.
        folder = os.path.dirname(path) if is_local(fs) else None
        if folder:
            os.makedirs(folder, exist_ok=True)
        self._file = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in save()
            "w", dir=folder, prefix=".index.", suffix=".tmp", delete=False
        )
        self._file.write('{"sheets": [\n')

    def add(self, summary_json: str) -> None:
        """Write one sheet's summary; keep it for the page if it is among the first."""
        summary = json.loads(summary_json)
        self._file.write((",\n" if self.count else "") + summary_json)
        self.count += 1
        key = (summary["prompt_index"], summary["file"])
        if len(self._first) < self.keep:
            heapq.heappush(self._first, (_Reversed(key), summary))
        elif self.keep and key < self._first[0][0].key:
            heapq.heapreplace(self._first, (_Reversed(key), summary))

    def listed(self) -> list[dict[str, Any]]:
        """The first `keep` sheets, in order."""
        return [s for _, s in sorted(self._first, key=lambda e: e[0].key)]

    def discard(self) -> None:
        """Drop the unfinished index (the pass failed)."""
        self._file.close()
        if os.path.exists(self._file.name):
            os.unlink(self._file.name)

    def save(self) -> None:
        """Close the index and move it into place."""
        from sdray.storage import is_local

        self._file.write(f'\n], "count": {self.count}}}\n')
        self._file.close()
        try:
            if is_local(self.fs):
                os.replace(self._file.name, self.path)
            else:
                self.fs.put_file(self._file.name, self.path)
        finally:
            if os.path.exists(self._file.name):
                os.unlink(self._file.name)


@dataclass(frozen=True)
class _Reversed:
    key: tuple

    def __lt__(self, other: _Reversed) -> bool:
        return self.key > other.key


def _run_stages(
    files: list[str],
    plan: SheetPlan,
    output_uri: str,
    storage_options: dict[str, Any] | None,
    *,
    rows: int,
    thumb_size: int,
    rate: float,
):
    """Both stages over the metadata shards, lazily: rows of (kind, rank, payload)."""
    import ray

    from sdray.batch.job import ensure_ray

    ensure_ray()
    stage_args = {"plan": plan, "output_uri": output_uri, "storage_options": storage_options}
    return (
        ray.data.from_items(
            [{"path": p} for p in files], override_num_blocks=min(len(files), MAX_TASKS)
        )
        .map_batches(
            tile_shards,
            fn_kwargs={**stage_args, "thumb_size": thumb_size, "rate": rate},
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=0.5,
        )
        .groupby(GROUP_COLUMN, num_partitions=_partitions_for(rows))
        .map_groups(draw_group, fn_kwargs=stage_args, batch_format="pyarrow", num_cpus=0.5)
    )


def write_contact_sheets(
    output_uri: str,
    record: dict[str, Any],
    *,
    storage_options: dict[str, Any] | None = None,
    thumb_size: int = 256,
) -> SweepViews:
    """Draw every contact sheet, and the thumbnails of the rows the gallery shows, in one Ray
    Data pass over the output (each image container read once).

    Earlier sheets and thumbnails are removed first. Every sheet is listed in
    `contact_sheets/index.json`; the result keeps the first `gallery.max_sheets` of them and the
    gallery's sample of rows (at most `gallery.max_images`).
    """
    from sdray.storage import filesystem, join

    plan = SheetPlan.from_record(record)
    gallery = record.get("gallery") or {}
    cap, rows = int(gallery.get("max_images", 10_000)), int(record["rows"])
    rate = sample_rate(rows, cap)
    fs, root = filesystem(output_uri, storage_options)
    _clear(fs, root)
    files = _metadata_files(fs, root)
    index = _SheetIndex(fs, join(root, SHEETS_INDEX), int(gallery.get("max_sheets", 500)))
    sampled: list[tuple[float, str]] = []
    try:
        if files:
            stages = _run_stages(
                files,
                plan,
                output_uri,
                storage_options,
                rows=rows,
                thumb_size=thumb_size,
                rate=rate,
            )
            for batch in stages.iter_batches(batch_format="pyarrow"):
                columns = (batch.column(n).to_pylist() for n in ("kind", "rank", "payload"))
                for kind, rank, payload in zip(*columns, strict=True):
                    if kind == "sheet":
                        index.add(payload)
                    else:
                        sampled.append((rank, payload))
    except BaseException:
        index.discard()
        raise
    index.save()
    sampled.sort()
    shown = [json.loads(payload) for _, payload in sampled[:cap]]
    extra = [json.loads(payload) for _, payload in sampled[cap:]]
    extra_thumbs = [join(root, thumbnail_path(r["id"])) for r in extra if r["status"] == "ok"]
    extra_thumbs += [
        join(root, strip_path(r["id"]))
        for r in extra
        if r["status"] == "ok" and r.get("preview_path")
    ]
    if extra_thumbs:  # the few sampled past the cap (see sample_rate)
        fs.rm(extra_thumbs)
    return SweepViews(index.count, index.listed(), shown, rows)

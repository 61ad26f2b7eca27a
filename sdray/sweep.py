"""Prompt sweeps: a declarative spec (prompts × parameter axes) streamed into a prompt table."""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from sdray.config import GenerationConfig, SdrayConfig
from sdray.contact_sheets import format_value
from sdray.errors import ConfigError, SdrayError
from sdray.schedulers import SCHEDULERS

if TYPE_CHECKING:
    from sdray.batch import JobSummary

SWEEP_TABLE = "sweep.parquet"
SWEEP_RECORD = "sweep.json"
SHEETS_DIR = "contact_sheets"
GALLERY_DIR = "gallery"
GALLERY_PAGE = "index.html"
# Top-level entries of OUTPUT that a sweep writes itself, besides what the batch job writes.
SWEEP_OWNED = (SWEEP_TABLE, SWEEP_RECORD, SHEETS_DIR, GALLERY_DIR, GALLERY_PAGE)
CHUNK_ROWS = 65_536
MAX_COMBINATIONS = 2**62
MAX_LISTED_VALUES = 1_000_000  # float ranges are listed; integer ranges stay lazy

AXIS_TYPES: dict[str, type] = {
    "guidance_scale": float,
    "steps": int,
    "scheduler": str,
    "seed": int,
    "width": int,
    "height": int,
    "negative_prompt": str,
}
AXIS_ARROW_TYPES = {float: pa.float64(), int: pa.int64(), str: pa.string()}
AxisName = Literal[
    "guidance_scale", "steps", "scheduler", "seed", "width", "height", "negative_prompt"
]
# Columns a sweep adds to every row; a prompts_file may not bring its own.
PROMPT_INDEX_COLUMN = "prompt_index"
PROMPT_ID_COLUMN = "prompt_id"


class SweepSpecError(ConfigError):
    """The sweep spec is invalid; the message names the key."""


def _number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number, got {value!r}")
    return value


Number = Annotated[int | float, BeforeValidator(_number)]


# --- axes -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Axis:
    """One parameter's values: either listed, or a lazy integer range."""

    name: str
    size: int
    values: tuple = ()  # listed values; empty for a lazy range
    start: int = 0
    step: int = 1

    @property
    def arrow_type(self) -> pa.DataType:
        """The column type of this axis in the prompt table."""
        return AXIS_ARROW_TYPES[AXIS_TYPES[self.name]]

    def value(self, index: int) -> Any:
        """The value at `index`."""
        return self.values[index] if self.values else self.start + index * self.step

    def take(self, index: np.ndarray) -> pa.Array:
        """The values at `index` (int64 positions) as an Arrow array."""
        if self.values:
            return pa.array(self.values, self.arrow_type).take(pa.array(index))
        return pa.array(self.start + index * self.step, pa.int64())

    def labels(self, index: np.ndarray) -> pa.Array:
        """`name=value` strings for ids; negative prompts by position, they can be long."""
        import pyarrow.compute as pc

        if self.name == "negative_prompt":
            texts = [f"{self.name}={i}" for i in range(self.size)]
        elif self.values:
            texts = [f"{self.name}={format_value(v)}" for v in self.values]
        else:
            digits = pc.cast(self.take(index), pa.string())
            return pc.binary_join_element_wise(pa.scalar(f"{self.name}="), digits, "")
        return pa.array(texts, pa.string()).take(pa.array(index))

    def describe(self, limit: int = 1000) -> dict[str, Any]:
        """What the gallery and sheets need: type, size and the values (listed when few)."""
        out: dict[str, Any] = {"name": self.name, "type": AXIS_TYPES[self.name].__name__}
        out["size"] = self.size
        if self.values or self.size <= limit:
            out["values"] = [self.value(i) for i in range(min(self.size, limit))]
        else:
            out["range"] = {"start": self.start, "step": self.step}
        return out


def _check_value(name: str, value: Any, where: str) -> Any:
    kind = AXIS_TYPES[name]
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: must be a string, got {value!r}")
        if name == "scheduler" and value not in SCHEDULERS:
            raise ValueError(
                f"{where}: unknown scheduler {value!r}; choose one of {', '.join(SCHEDULERS)}"
            )
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: must be a number, got {value!r}")
    if kind is float:
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{where}: must be a finite number >= 0, got {value!r}")
        return float(value)
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{where}: must be an integer, got {value!r}")
        value = int(value)
    if name in ("width", "height") and (value <= 0 or value % 8):
        raise ValueError(f"{where}: must be a positive multiple of 8, got {value!r}")
    if name == "steps" and value < 1:
        raise ValueError(f"{where}: must be at least 1, got {value!r}")
    if name == "seed" and not 0 <= value < 2**63:
        raise ValueError(f"{where}: must be an integer in [0, 2^63), got {value!r}")
    return value


def _range_axis(name: str, raw: dict[str, Any]) -> Axis:
    where = f"axes.{name}"
    try:
        spec = RangeSpec.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "unknown range key; a range has start, stop and step"
        raise ValueError(f"{where}.{key}: {message}") from None
    if AXIS_TYPES[name] is str:
        raise ValueError(f"{where}: a range needs a numeric parameter; list the values instead")
    if spec.step == 0:
        raise ValueError(f"{where}.step: must not be 0")
    if AXIS_TYPES[name] is int:
        for key in ("start", "stop", "step"):
            number = getattr(spec, key)
            if isinstance(number, float) and not number.is_integer():
                raise ValueError(f"{where}.{key}: must be an integer for {name}, got {number!r}")
        start, stop, step = int(spec.start), int(spec.stop), int(spec.step)
        size = len(range(start, stop, step))
        if size == 0:
            raise ValueError(f"{where}: range start={start}, stop={stop}, step={step} is empty")
        _check_value(name, start, f"{where}.start")
        _check_value(name, start + (size - 1) * step, f"{where} (last value)")
        if size == 1:
            return Axis(name, 1, values=(start,))
        return Axis(name, size, start=start, step=step)
    start, stop, step = float(spec.start), float(spec.stop), float(spec.step)
    size = max(0, math.floor((stop - start) / step - 1e-9) + 1)
    if size == 0:
        raise ValueError(f"{where}: range start={start}, stop={stop}, step={step} is empty")
    if size > MAX_LISTED_VALUES:
        raise ValueError(f"{where}: {size} values; a float range may have at most 1000000")
    values = tuple(round(start + i * step, 10) for i in range(size))
    for value in (values[0], values[-1]):
        _check_value(name, value, where)
    return Axis(name, size, values=values)


def make_axis(name: str, raw: Any) -> Axis:
    """Resolve one axis of the spec (list, range mapping or single value), checking its values."""
    where = f"axes.{name}"
    if isinstance(raw, dict):
        return _range_axis(name, raw)
    values = raw if isinstance(raw, list) else [raw]
    if not values:
        raise ValueError(f"{where}: has no values")
    checked = tuple(_check_value(name, v, f"{where}[{i}]") for i, v in enumerate(values))
    seen: set = set()
    for index, value in enumerate(checked):
        if value in seen:
            raise ValueError(f"{where}[{index}]: duplicate value {value!r}")
        seen.add(value)
    return Axis(name, len(checked), values=checked)


class _SpecSection(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RangeSpec(_SpecSection):
    """Evenly spaced values from `start` up to, not including, `stop` (like Python's range)."""

    start: Number = Field(description="First value.")
    stop: Number = Field(description="End of the range, excluded.")
    step: Number = Field(1, description="Distance between values; may be negative.")


class SheetSpec(_SpecSection):
    """Which two axes a contact sheet lays out as rows and columns."""

    rows: AxisName | None = Field(
        None, description="Axis down the rows; default: the second axis with several values."
    )
    cols: AxisName | None = Field(
        None, description="Axis across the columns; default: the first axis with several values."
    )
    max_tile: int = Field(256, ge=16, description="Images are shrunk to fit this many pixels.")


class GallerySpec(_SpecSection):
    """The static gallery page."""

    max_images: int = Field(
        10_000, ge=1, description="At most this many rows are shown (the first ones read)."
    )


class SweepSpec(_SpecSection):
    """A sweep: prompts crossed with axes of generation parameters."""

    name: str = Field(min_length=1, description="Name shown in the gallery and sheets.")
    prompts: list[str] | None = Field(None, min_length=1, description="Prompts, in order.")
    prompts_file: str | None = Field(
        None,
        description="Prompt table URI (Parquet/CSV/JSONL); relative paths are from the spec file. "
        "Extra columns ride through; an `id` column becomes `prompt_id`.",
    )
    negative_prompt: str | None = Field(None, description="Negative prompt for every row.")
    mode: Literal["grid", "zip", "random"] = Field(
        "grid",
        description="grid: every combination; zip: the i-th values of all axes together; "
        "random: `samples` distinct grid combinations per prompt.",
    )
    samples: int | None = Field(None, ge=1, description="random: combinations drawn per prompt.")
    seed: int | None = Field(
        None, ge=0, lt=2**63, description="random: seed of the draw (default 0)."
    )
    axes: dict[AxisName, Any] = Field(
        default_factory=dict,
        description="Parameter -> list of values, {start, stop, step} range, or one value.",
    )
    sheet: SheetSpec = Field(default_factory=SheetSpec, description="Contact sheet layout.")
    gallery: GallerySpec = Field(default_factory=GallerySpec, description="Gallery page options.")

    _axes: list[Axis] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> SweepSpec:
        if (self.prompts is None) == (self.prompts_file is None):
            raise ValueError("give exactly one of 'prompts' and 'prompts_file'")
        for index, prompt in enumerate(self.prompts or []):
            if not prompt.strip():
                raise ValueError(f"prompts[{index}]: is empty")
        if self.mode == "random":
            if self.samples is None:
                raise ValueError("samples: required with mode: random")
        else:
            for key in ("samples", "seed"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key}: only used with mode: random (mode is {self.mode})")
        if self.negative_prompt is not None and "negative_prompt" in self.axes:
            raise ValueError("negative_prompt: given both as a fixed value and as an axis")
        self._axes = [make_axis(name, raw) for name, raw in self.axes.items()]
        sizes = {axis.name: axis.size for axis in self._axes}
        if self.mode == "zip":
            lengths = {n: s for n, s in sizes.items() if s > 1}
            if len(set(lengths.values())) > 1:
                listed = ", ".join(f"{n} has {s}" for n, s in lengths.items())
                raise ValueError(
                    f"axes: mode zip needs the same number of values on every axis "
                    f"(or a single value): {listed}"
                )
        if math.prod(sizes.values()) > MAX_COMBINATIONS:
            raise ValueError(f"axes: more than 2^62 combinations ({math.prod(sizes.values())})")
        if self.mode == "random" and self.samples > math.prod(sizes.values()):
            raise ValueError(
                f"samples: {self.samples} is more than the {math.prod(sizes.values())} distinct "
                "combinations of the axes"
            )
        for key in ("rows", "cols"):
            chosen = getattr(self.sheet, key)
            if chosen is not None and chosen not in sizes:
                raise ValueError(
                    f"sheet.{key}: {chosen!r} is not an axis of this sweep "
                    f"(axes: {', '.join(sizes) or 'none'})"
                )
        if self.sheet.rows is not None and self.sheet.rows == self.sheet.cols:
            raise ValueError(f"sheet: rows and cols are both {self.sheet.rows!r}")
        return self

    @property
    def axis_list(self) -> list[Axis]:
        """The axes in spec order, resolved into value sequences."""
        return self._axes

    def combinations(self) -> int:
        """Rows per prompt."""
        sizes = [axis.size for axis in self._axes]
        if self.mode == "zip":
            return max(sizes, default=1)
        if self.mode == "random":
            return int(self.samples or 0)
        return math.prod(sizes)

    def sheet_axes(self) -> tuple[str | None, str | None]:
        """(rows, cols) of the contact sheets: as given, else the first axes with several values."""
        several = [a.name for a in self._axes if a.size > 1] or [a.name for a in self._axes]
        rows, cols = self.sheet.rows, self.sheet.cols
        if cols is None:
            cols = next((n for n in several if n != rows), None)
        if rows is None:
            rows = next((n for n in several if n != cols), None)
        return rows, cols

    def row_fingerprint(self) -> str:
        """Hash of everything that decides the rows (not the sheet or gallery layout)."""
        parts = self.model_dump(mode="json", exclude={"name", "sheet", "gallery"})
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


# --- loading and validation -------------------------------------------------------------------


def _format_spec_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        loc = [str(p) for p in item["loc"]]
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown key {'.'.join(loc)!r}")
        elif loc and loc[-1] == "[key]" and loc[0] == "axes":
            lines.append(f"axes.{loc[1]}: unknown axis; choose from {', '.join(AXIS_TYPES)}")
        elif item["type"] == "literal_error":
            lines.append(f"{'.'.join(loc)} = {item.get('input')!r}: {message}")
        elif loc:
            lines.append(f"{'.'.join(loc)}: {message}")
        else:
            lines.append(message)
    return "; ".join(lines)


def spec_from_dict(data: dict[str, Any], source: str | None = None) -> SweepSpec:
    """Validate a spec mapping; errors name the key."""
    where = f"invalid sweep spec {source}" if source else "invalid sweep spec"
    if not isinstance(data, dict):
        raise SweepSpecError(f"{where}: must hold a mapping at the top level")
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as error:
        raise SweepSpecError(f"{where}: {_format_spec_error(error)}") from None


def _has_scheme(uri: str) -> bool:
    return "://" in uri


def load_spec(path: str, storage_options: dict[str, Any] | None = None) -> SweepSpec:
    """Read and validate a sweep spec YAML; a relative prompts_file is taken from its folder."""
    import yaml

    from sdray.storage import open_uri

    try:
        with open_uri(str(path), "rb", storage_options) as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise SweepSpecError(f"sweep spec not found: {path}") from None
    except yaml.YAMLError as error:
        raise SweepSpecError(f"sweep spec {path} is not valid YAML: {error}") from None
    spec = spec_from_dict(data, str(path))
    prompts_file = spec.prompts_file
    if prompts_file and not _has_scheme(prompts_file) and not Path(prompts_file).is_absolute():
        base = str(path).rsplit("/", 1)[0] if "/" in str(path) else "."
        if not _has_scheme(str(path)):
            base = str(Path(base).resolve())
        spec.prompts_file = f"{base}/{prompts_file}"
    return spec


def check_against_config(spec: SweepSpec, generation: GenerationConfig) -> None:
    """Refuse axis values the config's limits would turn into error rows (max steps, size)."""
    from sdray.requests import validate_row

    problems = []
    for axis in spec.axis_list:
        positions = range(axis.size) if axis.values else (0, axis.size - 1)
        for index in positions:
            _, errors = validate_row({"prompt": "x", axis.name: axis.value(index)}, generation)
            if errors:
                problems.append(f"axes.{axis.name}: {errors[0]}")
                break
    if problems:
        raise SweepSpecError("sweep axes outside the config's limits: " + "; ".join(problems))


# --- expansion --------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise on uint64 (wrapping arithmetic)."""
    z = values.astype(np.uint64, copy=True)
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def prompt_keys(seed: int, prompt_index: np.ndarray) -> np.ndarray:
    """The per-prompt key of the random draw: each prompt draws its own combinations."""
    base = np.uint64((seed * 0x9E3779B97F4A7C15) & _MASK64)
    return _mix64(_mix64(prompt_index.astype(np.uint64)) ^ base)


def permute(index: np.ndarray, keys: np.ndarray, size: int) -> np.ndarray:
    """A keyed pseudo-random permutation of [0, size), elementwise: a Feistel network with
    cycle walking. Distinct inputs give distinct outputs, so draws never repeat, and each
    output depends only on (key, index): random mode streams in any chunking."""
    half = max(1, ((size - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)

    def rounds(x: np.ndarray, k: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & mask
        for r in range(6):
            salt = np.uint64((r + 1) * 0xD1B54A32D192ED03 & _MASK64)
            left, right = right, left ^ (_mix64(right ^ k ^ salt) & mask)
        return (left << shift) | right

    out = rounds(index.astype(np.uint64), keys)
    outside = out >= np.uint64(size)
    while outside.any():
        out[outside] = rounds(out[outside], keys[outside])
        outside = out >= np.uint64(size)
    return out.astype(np.int64)


def _digits(flat: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """Mixed-radix digits of flat grid positions; the last axis varies fastest."""
    out: list[np.ndarray] = [flat] * len(sizes)
    rest = flat.astype(np.uint64)
    for position in range(len(sizes) - 1, -1, -1):
        size = np.uint64(sizes[position])
        out[position] = (rest % size).astype(np.int64)
        rest = rest // size
    return out


@dataclass
class PromptSource:
    """Where the prompts come from, read in blocks so a huge prompts_file never sits in memory."""

    spec: SweepSpec
    storage_options: dict[str, Any] | None = None
    schema: pa.Schema | None = None  # carried columns of a prompts_file (unified over chunks)
    count: int = 0
    _files: list[dict[str, str]] = field(default_factory=list)

    def scan(self) -> None:
        """Count the prompts and settle the carried columns' types (one streaming pass)."""
        if self.spec.prompts is not None:
            self.count = len(self.spec.prompts)
            self.schema = pa.schema([])
            return
        from sdray.batch.read import list_prompt_files
        from sdray.errors import InputError

        try:
            self._files = list_prompt_files(self.spec.prompts_file, self.storage_options)
        except InputError as error:
            raise SweepSpecError(f"prompts_file: {error}") from None
        schemas = []
        for chunk in self._raw_chunks():
            self._check_columns(chunk.column_names)
            schemas.append(chunk.schema)
            self.count += chunk.num_rows
        try:
            schema = pa.unify_schemas(schemas, promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
            raise SweepSpecError(
                f"prompts_file: its parts disagree on column types: {error}"
            ) from None
        self.schema = pa.schema([f for f in schema if f.name != "prompt"])
        if self.count == 0:
            raise SweepSpecError(f"prompts_file: {self.spec.prompts_file!r} holds no rows")

    def _check_columns(self, names: list[str]) -> None:
        from sdray.requests import RESULT_COLUMNS

        if "prompt" not in names:
            raise SweepSpecError(
                f"prompts_file: {self.spec.prompts_file!r} has no 'prompt' column "
                f"(columns: {', '.join(names) or 'none'})"
            )
        taken = {PROMPT_INDEX_COLUMN, *RESULT_COLUMNS}
        taken |= {a.name for a in self.spec.axis_list}
        if self.spec.negative_prompt is not None:
            taken.add("negative_prompt")
        clashes = [n for n in names if n in taken]
        if names.count(PROMPT_ID_COLUMN) > 1:
            clashes.append(f"{PROMPT_ID_COLUMN} (the file's `id` becomes {PROMPT_ID_COLUMN})")
        if clashes:
            raise SweepSpecError(
                f"prompts_file: columns {', '.join(clashes)} clash with what the sweep sets "
                "itself (axes, negative_prompt, prompt_index, prompt_id, result columns); "
                "drop or rename them"
            )

    def _raw_chunks(self) -> Iterator[pa.Table]:
        """The prompt table's chunks; a file `id` column becomes `prompt_id`."""
        from sdray.batch.read import read_prompt_file

        for file in self._files:
            for chunk in read_prompt_file(file, self.storage_options):
                chunk = chunk.select([n for n in chunk.column_names if not n.startswith("__sdray")])
                yield chunk.rename_columns(
                    [PROMPT_ID_COLUMN if n == "id" else n for n in chunk.column_names]
                )

    def blocks(self) -> Iterator[pa.Table]:
        """Prompt blocks: prompt_index, __key (the id prefix), prompt, carried columns."""
        import pyarrow.compute as pc

        if self.spec.prompts is not None:
            prompts = self.spec.prompts
            for start in range(0, len(prompts), CHUNK_ROWS):
                part = prompts[start : start + CHUNK_ROWS]
                index = np.arange(start, start + len(part), dtype=np.int64)
                yield pa.table(
                    {
                        PROMPT_INDEX_COLUMN: index,
                        "__key": pa.array([f"p{i}" for i in index], pa.string()),
                        "prompt": pa.array(part, pa.string()),
                    }
                )
            return
        offset = 0
        carried = self.schema
        for chunk in self._raw_chunks():
            index = np.arange(offset, offset + chunk.num_rows, dtype=np.int64)
            offset += chunk.num_rows
            if PROMPT_ID_COLUMN in chunk.column_names:
                key = pc.cast(chunk.column(PROMPT_ID_COLUMN), pa.string())
            else:
                key = pa.array([f"p{i}" for i in index], pa.string())
            columns = {
                PROMPT_INDEX_COLUMN: pa.array(index),
                "__key": key,
                "prompt": chunk.column("prompt"),
            }
            for item in carried:
                if item.name in chunk.column_names:
                    columns[item.name] = chunk.column(item.name).cast(item.type)
                else:
                    columns[item.name] = pa.nulls(chunk.num_rows, item.type)
            yield pa.table(columns)


@dataclass
class Expansion:
    """The streamed prompt table of a sweep: its schema and its chunks."""

    spec: SweepSpec
    prompts: PromptSource

    @property
    def rows(self) -> int:
        """Rows in the expanded table."""
        return self.prompts.count * self.spec.combinations()

    def schema(self) -> pa.Schema:
        """Columns: id, prompt, negative_prompt?, axes in spec order, prompt_index, carried."""
        fields = [pa.field("id", pa.string()), pa.field("prompt", pa.string())]
        if self.spec.negative_prompt is not None:
            fields.append(pa.field("negative_prompt", pa.string()))
        fields += [pa.field(a.name, a.arrow_type) for a in self.spec.axis_list]
        fields.append(pa.field(PROMPT_INDEX_COLUMN, pa.int64()))
        fields += list(self.prompts.schema or [])
        return pa.schema(fields)

    def _axis_positions(self, within: np.ndarray, prompt_index: np.ndarray) -> list[np.ndarray]:
        axes = self.spec.axis_list
        sizes = [a.size for a in axes]
        if self.spec.mode == "zip":
            return [within if s > 1 else np.zeros_like(within) for s in sizes]
        if self.spec.mode == "random":
            keys = prompt_keys(self.spec.seed or 0, prompt_index)
            within = permute(within, keys, math.prod(sizes))
        return _digits(within, sizes)

    def chunks(self, chunk_rows: int = CHUNK_ROWS) -> Iterator[pa.Table]:
        """The table in chunks of at most `chunk_rows` rows; memory is bounded by one chunk."""
        import pyarrow.compute as pc

        schema = self.schema()
        per_prompt = self.spec.combinations()
        multi = [a for a in self.spec.axis_list if a.size > 1]
        for block in self.prompts.blocks():
            block_rows = block.num_rows * per_prompt
            for start in range(0, block_rows, chunk_rows):
                flat = np.arange(start, min(start + chunk_rows, block_rows), dtype=np.int64)
                local, within = flat // per_prompt, flat % per_prompt
                prompts = block.take(pa.array(local))
                prompt_index = prompts.column(PROMPT_INDEX_COLUMN).to_numpy()
                positions = self._axis_positions(within, prompt_index)
                by_name = dict(zip([a.name for a in self.spec.axis_list], positions, strict=True))
                parts = [prompts.column("__key")] + [a.labels(by_name[a.name]) for a in multi]
                columns: dict[str, Any] = {
                    "id": pc.binary_join_element_wise(*parts, "/") if multi else parts[0],
                    "prompt": prompts.column("prompt"),
                }
                if self.spec.negative_prompt is not None:
                    columns["negative_prompt"] = pa.array(
                        [self.spec.negative_prompt] * len(flat), pa.string()
                    )
                for axis, position in zip(self.spec.axis_list, positions, strict=True):
                    columns[axis.name] = axis.take(position)
                columns[PROMPT_INDEX_COLUMN] = prompts.column(PROMPT_INDEX_COLUMN)
                for item in self.prompts.schema or []:
                    columns[item.name] = prompts.column(item.name)
                yield pa.table(columns, schema=schema)


def plan_expansion(spec: SweepSpec, storage_options: dict[str, Any] | None = None) -> Expansion:
    """Scan the prompts and return the (lazy) expansion of a spec."""
    prompts = PromptSource(spec, storage_options)
    prompts.scan()
    return Expansion(spec, prompts)


def write_expansion(
    expansion: Expansion,
    uri: str,
    storage_options: dict[str, Any] | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> int:
    """Stream the expansion into one Parquet file, one row group per chunk; returns the rows."""
    import pyarrow.parquet as pq

    from sdray.storage import filesystem, is_local

    fs, path = filesystem(uri, storage_options)
    if is_local(fs):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    rows = 0
    with fs.open(path, "wb") as handle:
        with pq.ParquetWriter(handle, expansion.schema(), compression="zstd") as writer:
            for chunk in expansion.chunks(chunk_rows):
                writer.write_table(chunk, row_group_size=chunk_rows)
                rows += chunk.num_rows
    return rows


# --- the whole sweep --------------------------------------------------------------------------


@dataclass
class SweepSummary:
    """A finished sweep: the generation job's summary plus what the sweep added."""

    job: JobSummary
    sheets: int = 0
    gallery: str = ""

    @property
    def rows(self) -> int:
        """Rows in the sweep."""
        return self.job.rows

    @property
    def ok(self) -> int:
        """Images generated."""
        return self.job.ok

    @property
    def error(self) -> int:
        """Rows in error."""
        return self.job.error

    @property
    def manifest(self) -> dict[str, Any]:
        """The job's manifest.json."""
        return self.job.manifest

    def line(self) -> str:
        """One line for the terminal."""
        return (
            f"{self.job.line()}; {self.sheets} contact sheets in {SHEETS_DIR}/, "
            f"gallery: {self.gallery}"
        )


def _say(message: str) -> None:
    print(f"sdray: {message}", file=sys.stderr, flush=True)


def sweep_record(spec: SweepSpec, expansion: Expansion) -> dict[str, Any]:
    """What sweep.json holds: the spec, its axes and sheet layout, and the row counts."""
    rows, cols = spec.sheet_axes()
    return {
        "name": spec.name,
        "mode": spec.mode,
        "fingerprint": spec.row_fingerprint(),
        "spec": spec.model_dump(mode="json"),
        "prompts": expansion.prompts.count,
        "combinations": spec.combinations(),
        "rows": expansion.rows,
        "axes": [axis.describe() for axis in spec.axis_list],
        "sheet": {"rows": rows, "cols": cols, "max_tile": spec.sheet.max_tile},
        "gallery": spec.gallery.model_dump(),
    }


def _read_record(fs, root: str) -> dict[str, Any] | None:
    from sdray.storage import join

    path = join(root, SWEEP_RECORD)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as handle:
        return json.loads(handle.read())


def _prepare_sweep_output(
    output_uri: str, *, overwrite: bool, resume: bool, storage: dict[str, Any]
) -> bool:
    """Refuse a non-empty output before writing anything; return whether the job resumes."""
    from sdray.batch import prepare_output
    from sdray.batch.job import MANIFEST
    from sdray.storage import filesystem, join

    fs, root = filesystem(output_uri, storage)
    if resume and fs.exists(root) and not fs.exists(join(root, MANIFEST)):
        entries = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
        if all(entry in SWEEP_OWNED for entry in entries):
            return False  # only the expansion was written: start the job afresh
    previous = prepare_output(
        output_uri,
        overwrite=overwrite,
        resume=resume,
        extra_owned=SWEEP_OWNED,
        storage_options=storage,
    )
    return previous is not None


def run_sweep(
    spec_path: str,
    output_uri: str,
    config: SdrayConfig,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> SweepSummary:
    """Expand a sweep spec into OUTPUT/sweep.parquet, generate it, then sheets and gallery."""
    from sdray.batch import run_generate
    from sdray.contact_sheets import write_contact_sheets
    from sdray.gallery import write_gallery
    from sdray.storage import filesystem, join, write_bytes_atomic

    say = _say if progress else (lambda message: None)
    storage = config.storage.storage_options
    spec = load_spec(spec_path, storage)
    check_against_config(spec, config.generation)
    expansion = plan_expansion(spec, storage)
    resuming = _prepare_sweep_output(
        output_uri, overwrite=overwrite, resume=resume, storage=storage
    )
    fs, root = filesystem(output_uri, storage)
    record = sweep_record(spec, expansion)
    previous = _read_record(fs, root) if resume else None
    if previous is not None and previous.get("fingerprint") != record["fingerprint"]:
        if not resuming:  # nothing was generated from the old expansion: expand afresh
            previous = None
        else:
            raise SdrayError(
                f"cannot resume {output_uri!r}: its sweep was expanded from another spec "
                "(prompts, axes, mode, samples or seed differ). Resume with the same spec, or "
                "start over with --overwrite."
            )
    table_uri = join(output_uri, SWEEP_TABLE)
    if previous is not None and fs.exists(join(root, SWEEP_TABLE)):
        say(f"sweep {spec.name!r}: reusing {SWEEP_TABLE} ({previous['rows']} rows)")
    else:
        started = time.perf_counter()
        rows = write_expansion(expansion, table_uri, storage)
        # sweep.json is written last: it marks the expansion as complete.
        write_bytes_atomic(fs, join(root, SWEEP_RECORD), json.dumps(record, indent=2).encode())
        say(
            f"sweep {spec.name!r}: {rows} rows ({expansion.prompts.count} prompts x "
            f"{spec.combinations()} {spec.mode} combinations) in {SWEEP_TABLE} "
            f"({time.perf_counter() - started:.1f}s)"
        )
    summary = run_generate(
        table_uri,
        output_uri,
        config,
        resume=resuming,
        progress=progress,
        extra_owned=SWEEP_OWNED,
    )
    say("drawing contact sheets and thumbnails")
    sheets = write_contact_sheets(output_uri, record, storage_options=storage)
    say("writing the gallery page")
    gallery = write_gallery(output_uri, record, sheets, storage_options=storage)
    return SweepSummary(summary, sheets=len(sheets), gallery=gallery)

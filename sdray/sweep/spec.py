"""Sweep specs: the YAML a user writes, validated, with its axes resolved into value sequences."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

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

from sdray.config import GenerationConfig
from sdray.errors import ConfigError
from sdray.schedulers import SCHEDULERS
from sdray.sweep.paths import format_value

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
    "strength": float,
}
AXIS_ARROW_TYPES = {float: pa.float64(), int: pa.int64(), str: pa.string()}
AxisName = Literal[
    "guidance_scale", "steps", "scheduler", "seed", "width", "height", "negative_prompt", "strength"
]


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

    # Built once per axis, not once per chunk: a listed axis can hold a million float values.
    @cached_property
    def value_array(self) -> pa.Array | None:
        """The listed values as an Arrow array (None for a lazy range)."""
        return pa.array(self.values, self.arrow_type) if self.values else None

    @cached_property
    def label_array(self) -> pa.Array | None:
        """`name=value` id parts of the listed values (None for a lazy range); negative prompts
        by position, as they can be long."""
        if self.name == "negative_prompt":
            return pa.array([f"{self.name}={i}" for i in range(self.size)], pa.string())
        if self.values:
            return pa.array([f"{self.name}={format_value(v)}" for v in self.values], pa.string())
        return None

    def take(self, index: np.ndarray) -> pa.Array:
        """The values at `index` (int64 positions) as an Arrow array."""
        if self.value_array is not None:
            return self.value_array.take(pa.array(index))
        return pa.array(self.start + index * self.step, pa.int64())

    def labels(self, index: np.ndarray) -> pa.Array:
        """The `name=value` id parts of the values at `index`."""
        import pyarrow.compute as pc

        if self.label_array is not None:
            return self.label_array.take(pa.array(index))
        digits = pc.cast(self.take(index), pa.string())
        return pc.binary_join_element_wise(pa.scalar(f"{self.name}="), digits, "")

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
        if name == "strength" and not 0 < value <= 1:
            raise ValueError(f"{where}: must be a number in (0, 1], got {value!r}")
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
        size = max(0, -((start - stop) // step))  # len(range(...)), without its size limit
        if size == 0:
            raise ValueError(f"{where}: range start={start}, stop={stop}, step={step} is empty")
        _check_value(name, start, f"{where}.start")
        _check_value(name, start + (size - 1) * step, f"{where} (last value)")
        if size == 1:
            return Axis(name, 1, values=(start,))
        return Axis(name, size, start=start, step=step)
    start, stop, step = float(spec.start), float(spec.stop), float(spec.step)
    for key, number in (("start", start), ("stop", stop), ("step", step)):
        if not math.isfinite(number):
            raise ValueError(f"{where}.{key}: must be a finite number, got {number!r}")
    count = (stop - start) / step
    if not count <= MAX_LISTED_VALUES:  # also catches an overflow to inf
        raise ValueError(
            f"{where}: range start={start}, stop={stop}, step={step} has more than "
            f"{MAX_LISTED_VALUES} values; a float range may have at most that many"
        )
    size = max(0, math.floor(count - 1e-9) + 1)
    if size == 0:
        raise ValueError(f"{where}: range start={start}, stop={stop}, step={step} is empty")
    values = tuple(round(start + i * step, 10) for i in range(size))
    if len(set(values)) < size:
        raise ValueError(
            f"{where}.step: {step!r} is too small; values are kept to 10 decimal places, "
            "where several of this range's values are the same"
        )
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
        None,
        description="Axis down the rows; default: the second axis with several values. "
        "Not used in zip mode, whose sheets are one strip in zip order.",
    )
    cols: AxisName | None = Field(
        None,
        description="Axis across the columns; default: the first axis with several values. "
        "Not used in zip mode.",
    )
    max_tile: int = Field(256, ge=16, description="Images are shrunk to fit this many pixels.")


class GallerySpec(_SpecSection):
    """The static gallery page."""

    max_images: int = Field(
        10_000,
        ge=1,
        description="At most this many rows are shown: all of a smaller sweep, else a sample "
        "spread evenly over prompts, axis values and shards (by a hash of the row id).",
    )
    max_sheets: int = Field(
        500, ge=0, description="At most this many contact sheets are listed on the page."
    )


class SweepSpec(_SpecSection):
    """A sweep: prompts crossed with axes of generation parameters."""

    name: str = Field(min_length=1, description="Name shown in the gallery and sheets.")
    prompts: list[str] | None = Field(None, min_length=1, description="Prompts, in order.")
    prompts_file: str | None = Field(
        None,
        description="Prompt table URI (Parquet/CSV/JSONL); relative paths are from the spec file. "
        "Extra columns ride through; an `id` column becomes `prompt_id` and keys the rows' ids "
        "and seeds (a null id falls back to the prompt's position; duplicates are refused).",
    )
    negative_prompt: str | None = Field(None, description="Negative prompt for every row.")
    init_image: str | None = Field(
        None,
        description="Image-to-image: one starting picture for every row (URI; relative paths "
        "are from the spec file). A prompts_file may give each prompt its own instead.",
    )
    mask_image: str | None = Field(
        None, description="Inpainting: one mask for every row (white repaints); needs init_image."
    )
    mode: Literal["grid", "zip", "random"] = Field(
        "grid",
        description="grid: every combination; zip: the i-th values of all axes together; "
        "random: `samples` distinct grid combinations per prompt.",
    )
    samples: int | None = Field(None, ge=1, description="random: combinations drawn per prompt.")
    seed: int | None = Field(
        None,
        ge=0,
        lt=2**63,
        description="random: seed of the draw (default 0); image seeds come from the seed axis "
        "or generation.seed.",
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
        if self.mask_image is not None and self.init_image is None:
            raise ValueError("mask_image: needs init_image (the picture to inpaint)")
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
        if self.mode == "zip":
            for key in ("rows", "cols"):
                if getattr(self.sheet, key) is not None:
                    raise ValueError(
                        f"sheet.{key}: not used with mode: zip (its sheets are one strip per "
                        "prompt, in zip order)"
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
        """(rows, cols) of the contact sheets: as given, else the first axes with several values;
        (None, None) in zip mode, whose sheets are strips."""
        if self.mode == "zip":
            return None, None
        several = [a.name for a in self._axes if a.size > 1] or [a.name for a in self._axes]
        rows, cols = self.sheet.rows, self.sheet.cols
        if cols is None:
            cols = next((n for n in several if n != rows), None)
        if rows is None:
            rows = next((n for n in several if n != cols), None)
        return rows, cols

    @property
    def derives_seeds(self) -> bool:
        """Whether the expansion writes each prompt's derived seed (no `seed` axis)."""
        return all(axis.name != "seed" for axis in self._axes)

    def row_fingerprint(self, base_seed: int) -> str:
        """Hash of everything that decides the rows (not the sheet or gallery layout)."""
        parts = self.model_dump(mode="json", exclude={"name", "sheet", "gallery"})
        if self.derives_seeds:
            parts["base_seed"] = base_seed
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
    base = str(path).rsplit("/", 1)[0] if "/" in str(path) else "."
    if not _has_scheme(str(path)):
        base = str(Path(base).resolve())
    for key in ("prompts_file", "init_image", "mask_image"):
        setattr(spec, key, resolve_uri(getattr(spec, key), base))
    return spec


def resolve_uri(uri: str | None, base: str) -> str | None:
    """A relative path taken from `base` (a folder URI); absolute paths and URIs unchanged."""
    if not uri or _has_scheme(uri) or Path(uri).is_absolute():
        return uri
    return f"{base.rstrip('/')}/{uri}"


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

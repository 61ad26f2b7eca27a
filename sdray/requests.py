"""The row contract: defaults, validation, seed and id derivation, and the metadata schema."""

from __future__ import annotations

import dataclasses
import decimal
import hashlib
import math
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from sdray.config import GenerationConfig
from sdray.errors import InputError
from sdray.schedulers import SCHEDULERS

SEED_LIMIT = 2**63

# SDXL's per-row micro-conditioning (original size, crop top-left); other families ignore it.
MICRO_CONDITIONING = ("original_width", "original_height", "crop_top", "crop_left")
# Image-to-image and inpainting: a URI (relative to the table's own location when relative) or
# the encoded image's bytes.
IMAGE_INPUTS = ("init_image", "mask_image")
# Hidden columns that carry image inputs given as bytes (the visible column keeps only URIs).
IMAGE_BYTES = {name: f"__sdray_{name}_bytes" for name in IMAGE_INPUTS}
# Columns sdray adds about image inputs.
IMAGE_DIGESTS = {"init_image": "init_sha256", "mask_image": "mask_sha256"}
# Columns that rows may set; anything else in the input is carried through unchanged.
REQUEST_COLUMNS = (
    "id",
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "guidance_scale",
    "width",
    "height",
    "scheduler",
    *MICRO_CONDITIONING,
    *IMAGE_INPUTS,
    "strength",
)
# Columns sdray itself adds; an input table may not bring its own.
RESULT_COLUMNS = (
    *IMAGE_DIGESTS.values(),
    "preview_path",
    "model",
    "model_family",
    "mode",
    "status",
    "error",
    "truncated",
    "image_path",
    "sha256",
)
# Hidden bookkeeping added by the reader: where a row came from (for stable derived ids).
SOURCE_COLUMN = "__sdray_source"
ROW_COLUMN = "__sdray_row"
# Set by a reader for a row it could only read by altering it (text that is not valid Unicode).
READ_ERROR_COLUMN = "__sdray_read_error"
# Sort key that orders rows so batches stay homogeneous (same size, steps, scheduler, guidance).
BATCH_KEY_COLUMN = "__sdray_batch_key"

PREPARED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("seed", pa.int64()),
        ("steps", pa.int64()),
        ("guidance_scale", pa.float64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("scheduler", pa.string()),
        ("original_width", pa.int64()),
        ("original_height", pa.int64()),
        ("crop_top", pa.int64()),
        ("crop_left", pa.int64()),
        ("init_image", pa.string()),
        ("mask_image", pa.string()),
        ("strength", pa.float64()),
        ("mode", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)


@dataclass(frozen=True)
class GenerationRequest:
    """One image to generate, with every parameter resolved."""

    id: str
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    scheduler: str
    # SDXL's micro-conditioning (ignored by other families); None: diffusers' defaults, the
    # target size and a (0, 0) crop.
    original_width: int | None = None
    original_height: int | None = None
    crop_top: int | None = None
    crop_left: int | None = None
    # Image-to-image: the starting picture as HxWx3 uint8 pixels at (height, width), prepared
    # outside the engine; how much of the schedule re-noises it (0 < strength <= 1). With a
    # mask (HxW uint8; white, >= 128, is repainted): inpainting.
    init_image: Any = dataclasses.field(default=None, compare=False, repr=False)
    mask_image: Any = dataclasses.field(default=None, compare=False, repr=False)
    strength: float | None = None
    # Denoising steps (1-based, of the steps run) after which to keep the model's estimate of
    # the final image (a preview); they never change the image itself.
    preview_at: tuple[int, ...] = ()

    @property
    def mode(self) -> str:
        """txt2img | img2img | inpaint."""
        if self.init_image is None:
            return "txt2img"
        return "img2img" if self.mask_image is None else "inpaint"

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one denoising batch: same size, schedule and
        guidance, and the same kind of start (txt2img never shares with img2img)."""
        strength = None if self.init_image is None else self.strength
        return (
            self.width,
            self.height,
            self.steps,
            self.scheduler,
            self.guidance_scale,
            self.mode,
            strength,
        )


def denoising_start(steps: int, strength: float | None) -> int:
    """How many of `steps` an image-to-image row skips: it runs the last int(steps x strength),
    as diffusers' img2img and inpaint pipelines do (strength None: text-to-image, skips none)."""
    if strength is None:
        return 0
    return max(steps - min(int(steps * strength), steps), 0)


def batch_key_string(fields: dict[str, Any]) -> str:
    """`batch_key` as a sortable string; error rows sort last. Image-to-image rows that take
    their size from their picture sort by mode and strength only (the size is known once the
    picture is read; the engine still splits a batch by size)."""
    if fields.get("status") != "ok":
        return "~"
    size = (
        "picture"
        if fields["width"] is None or fields["height"] is None
        else f"{fields['width']:05d}x{fields['height']:05d}"
    )
    strength = "" if fields.get("strength") is None else f"/{fields['strength']:.6f}"
    return (
        f"{size}/{fields['steps']:04d}/{fields['scheduler']}/"
        f"{fields['guidance_scale']:012.4f}/{fields.get('mode') or 'txt2img'}{strength}"
    )


def derive_seed(base_seed: int, row_id: str) -> int:
    """A row's seed when it gives none: stable in (base seed, id), uniform in [0, 2^63)."""
    digest = hashlib.sha256(f"{base_seed}\x00{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def derive_id(source: str, row: int) -> str:
    """A row's id when it gives none (no `id` column, or a null id): its file and position."""
    return f"{source}:{row}"


def resolve_id(raw_id: Any, source: str, row: int) -> str:
    """A row's id: as given (an integral float as an integer), or derived from its file and
    position when it gives none (null or empty)."""
    if raw_id is None or raw_id == "":
        return derive_id(source, row)
    if isinstance(raw_id, float) and raw_id.is_integer():
        return str(int(raw_id))
    return str(raw_id)


def table_ids(table: pa.Table) -> list[str]:
    """Every row's id as `prepare_table` resolves it, without validating anything else."""
    n = table.num_rows
    raw = table.column("id").to_pylist() if "id" in table.column_names else [None] * n
    names = table.column_names
    sources = table.column(SOURCE_COLUMN).to_pylist() if SOURCE_COLUMN in names else None
    positions = table.column(ROW_COLUMN).to_pylist() if ROW_COLUMN in names else None
    return [
        resolve_id(value, sources[i] if sources else "row", positions[i] if positions else i)
        for i, value in enumerate(raw)
    ]


def is_unicode_text(text: str) -> bool:
    """Whether a string encodes as UTF-8 (JSON can carry lone surrogates such as "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def as_int(value: Any) -> int | None:
    """An integer from ints, integral floats and integral number text; None when it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:  # Decimal: exact, so "9007199254740993" and "20.0" never pass through a float
            number = decimal.Decimal(value.strip())
        except decimal.InvalidOperation:
            return None
        if not number.is_finite() or number.adjusted() > 40:  # no row needs a 40-digit int
            return None
        return int(number) if number == number.to_integral_value() else None
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def validate_row(row: dict[str, Any], config: GenerationConfig) -> tuple[dict[str, Any], list[str]]:
    """Resolve one row's request fields with defaults; return (fields, errors).

    Invalid values are left as None in the fields and named, with their value, in the errors.
    """
    errors: list[str] = []
    out: dict[str, Any] = {}

    def bad(field: str, value: Any, why: str) -> None:
        shown = f"<{len(value)} bytes>" if isinstance(value, bytes) else repr(value)
        errors.append(f"{field}={shown}: {why}")
        out[field] = None

    prompt = row.get("prompt")
    if not isinstance(prompt, str):
        bad("prompt", prompt, "must be a string" if prompt is not None else "is null")
    elif not prompt.strip():
        bad("prompt", prompt, "is empty")
    elif not is_unicode_text(prompt):
        bad("prompt", prompt, "is not valid Unicode text")
    else:
        out["prompt"] = prompt

    negative = row.get("negative_prompt")
    if negative is None:
        out["negative_prompt"] = config.negative_prompt
    elif not isinstance(negative, str):
        bad("negative_prompt", negative, "must be a string")
    elif not is_unicode_text(negative):
        bad("negative_prompt", negative, "is not valid Unicode text")
    else:
        out["negative_prompt"] = negative

    for field, limit in (("steps", config.max_steps),):
        value = row.get(field)
        if value is None:
            out[field] = getattr(config, field)
            continue
        number = as_int(value)
        if number is None:
            bad(field, value, "must be an integer")
        elif not 1 <= number <= limit:
            bad(field, value, f"must be between 1 and {limit}")
        else:
            out[field] = number

    from_picture = row.get("init_image") is not None
    for field, limit in (("width", config.max_width), ("height", config.max_height)):
        value = row.get(field)
        if value is None:  # image-to-image: the picture's size (see sdray.images.input_size)
            out[field] = None if from_picture else getattr(config, field)
            continue
        number = as_int(value)
        if number is None or number <= 0 or number % 8:
            bad(field, value, "must be a positive multiple of 8")
        elif number > limit:
            bad(field, value, f"must be at most {limit}")
        else:
            out[field] = number

    guidance = row.get("guidance_scale")
    if guidance is None:
        out["guidance_scale"] = config.guidance_scale
    else:
        number = _as_float(guidance)
        if number is None or number < 0:
            bad("guidance_scale", guidance, "must be a finite number >= 0")
        else:
            out["guidance_scale"] = number

    scheduler = row.get("scheduler")
    if scheduler is None:
        out["scheduler"] = config.scheduler
    elif scheduler not in SCHEDULERS:
        bad("scheduler", scheduler, f"unknown scheduler; choose one of {', '.join(SCHEDULERS)}")
    else:
        out["scheduler"] = scheduler

    for field in MICRO_CONDITIONING:
        value = row.get(field)
        if value is None:
            out[field] = None
            continue
        number = as_int(value)
        least = 0 if field.startswith("crop") else 1
        if number is None or number < least:
            bad(field, value, f"must be an integer >= {least}")
        else:
            out[field] = number

    _validate_images(row, config, out, bad)

    seed = row.get("seed")
    if seed is None:
        out["seed"] = None  # derived from the id by the caller
    else:
        number = as_int(seed)
        if number is None or not 0 <= number < SEED_LIMIT:
            bad("seed", seed, "must be an integer in [0, 2^63)")
        else:
            out["seed"] = number
    return out, errors


def _validate_images(row: dict[str, Any], config: GenerationConfig, out: dict, bad) -> None:
    """init_image / mask_image (a URI or bytes) and strength; the mode they make."""
    for name in IMAGE_INPUTS:
        value = row.get(name)
        if value is None or (isinstance(value, bytes) and value):
            out[name] = value
        elif isinstance(value, str) and value.strip() and is_unicode_text(value):
            out[name] = value
        else:
            bad(name, value, "must be a URI or the image's bytes")
    if row.get("init_image") is None:
        out["mode"], out["strength"] = "txt2img", None
        if row.get("mask_image") is not None:
            bad("mask_image", row["mask_image"], "needs an init_image to inpaint")
        return
    out["mode"] = "img2img" if row.get("mask_image") is None else "inpaint"
    value = row.get("strength")
    strength = config.strength if value is None else _as_float(value)
    if strength is None or not 0 < strength <= 1:
        bad("strength", value, "must be a number in (0, 1]")
    elif out.get("steps") and int(out["steps"] * strength) < 1:
        bad(
            "strength",
            value if value is not None else strength,
            f"with steps={out['steps']} leaves int(steps x strength) = 0 denoising steps; "
            "raise steps or strength",
        )
    else:
        out["strength"] = strength


def check_columns(names: list[str]) -> None:
    """Refuse tables without `prompt` or with columns sdray writes itself."""
    if "prompt" not in names:
        raise InputError(
            f"the prompt table has no 'prompt' column (columns: {', '.join(names) or 'none'})"
        )
    reserved = [n for n in names if n in RESULT_COLUMNS or n.startswith("__sdray")]
    if reserved:
        raise InputError(
            f"the prompt table has columns that sdray writes itself: {', '.join(reserved)}; "
            "rename them"
        )


def prepare_table(table: pa.Table, config: GenerationConfig) -> pa.Table:
    """Validate and complete every row of a prompt table (one block of it).

    Returns the request columns in `PREPARED_SCHEMA` plus `status`/`error`, followed by the
    carried-through columns unchanged. Invalid rows get status "error"; none are dropped. The
    reader has already refused tables without a `prompt` column; a block without one (JSON
    lines that all lack it) is a block of rows with null prompts.
    """
    if config.width is None or config.height is None:
        raise ValueError(
            "generation.width/height are unset here: fill them from the model first "
            "(sdray.families.with_model_defaults)"
        )
    check_columns([n for n in table.column_names if not n.startswith("__sdray")] + ["prompt"])
    carried = [
        n for n in table.column_names if n not in REQUEST_COLUMNS and not n.startswith("__sdray")
    ]
    request_cols = [n for n in REQUEST_COLUMNS if n in table.column_names]
    rows = table.select(request_cols).to_pylist()
    sources = (
        table.column(SOURCE_COLUMN).to_pylist() if SOURCE_COLUMN in table.column_names else None
    )
    positions = table.column(ROW_COLUMN).to_pylist() if ROW_COLUMN in table.column_names else None
    read_errors = (
        table.column(READ_ERROR_COLUMN).to_pylist()
        if READ_ERROR_COLUMN in table.column_names
        else None
    )

    columns: dict[str, list[Any]] = {field.name: [] for field in PREPARED_SCHEMA}
    image_bytes: dict[str, list[bytes | None]] = {name: [] for name in IMAGE_INPUTS}
    for index, row in enumerate(rows):
        fields, errors = validate_row(row, config)
        if read_errors and read_errors[index]:
            errors.append(read_errors[index])
        raw_id = row.get("id")
        if raw_id == "":  # given, but empty; a null id is a missing one, derived like none
            errors.insert(0, "id='': is empty")
        row_id = resolve_id(
            raw_id, sources[index] if sources else "row", positions[index] if positions else index
        )
        if fields["seed"] is None and not any(e.startswith("seed=") for e in errors):
            fields["seed"] = derive_seed(config.seed, row_id)
        fields["id"] = row_id
        fields["status"] = "error" if errors else "ok"
        fields["error"] = "; ".join(errors) if errors else None
        for name in IMAGE_INPUTS:  # bytes ride hidden; the visible column holds only URIs
            value = fields.get(name)
            image_bytes[name].append(value if isinstance(value, bytes) else None)
            if isinstance(value, bytes):
                fields[name] = None
        for name in columns:
            columns[name].append(fields.get(name))
    prepared = pa.table(columns, schema=PREPARED_SCHEMA)
    keys = [
        batch_key_string(row)
        for row in prepared.select(
            [
                "status",
                "width",
                "height",
                "steps",
                "scheduler",
                "guidance_scale",
                "mode",
                "strength",
            ]
        ).to_pylist()
    ]
    prepared = prepared.append_column(BATCH_KEY_COLUMN, pa.array(keys, pa.string()))
    for name, values in image_bytes.items():  # always, so every block has the same columns
        prepared = prepared.append_column(IMAGE_BYTES[name], pa.array(values, pa.binary()))
    for name in carried:
        prepared = prepared.append_column(name, table.column(name))
    return prepared


def request_from_row(row: dict[str, Any], **images: Any) -> GenerationRequest:
    """A GenerationRequest from a prepared (status ok) row; `images`: its init_image and
    mask_image pixels, and preview_at."""
    strength = row.get("strength")
    return GenerationRequest(
        id=row["id"],
        prompt=row["prompt"],
        negative_prompt=row["negative_prompt"] or "",
        seed=int(row["seed"]),
        steps=int(row["steps"]),
        guidance_scale=float(row["guidance_scale"]),
        width=int(row["width"]),
        height=int(row["height"]),
        scheduler=row["scheduler"],
        **{name: _optional_int(row.get(name)) for name in MICRO_CONDITIONING},
        strength=None if strength is None else float(strength),
        **images,
    )


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)

"""HTTP protocol: request/response models, OpenAI error bodies, and request -> engine requests."""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sdray.config import GenerationConfig, ServeConfig
from sdray.images import ImageInputError, prepare_inputs
from sdray.requests import (
    SEED_LIMIT,
    GenerationRequest,
    denoising_start,
    is_unicode_text,
    validate_row,
)

# Seeds chosen for requests that give none: small enough to read and type back.
RANDOM_SEED_LIMIT = 2**32
_SIZE = re.compile(r"^\s*(\d{1,6})\s*x\s*(\d{1,6})\s*$")
# OpenAI's bound on `partial_images`.
MAX_PARTIAL_IMAGES = 3
# How the edits route names the row fields (OpenAI's parameters).
EDIT_PARAMS = {"init_image": "image", "mask_image": "mask", "width": "size", "height": "size"}


class ApiError(Exception):
    """A request that fails with an HTTP status and an OpenAI-shaped error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The OpenAI error body: {"error": {"message", "type", "param", "code"}}."""
        return ErrorBody(
            error=ErrorDetail(
                message=self.message, type=self.type, param=self.param, code=self.code
            )
        ).model_dump()


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Body(BaseModel):
    # Strict: JSON "2" is not an integer and 2.0 is not a count; wrong types are 400s.
    model_config = ConfigDict(extra="forbid", strict=True)


class ErrorDetail(_Model):
    """What went wrong, and which request parameter caused it."""

    message: str = Field(description="Human-readable explanation.")
    type: str = Field(description="Error class, e.g. invalid_request_error, server_error.")
    param: str | None = Field(description="The request parameter at fault, if any.")
    code: str | None = Field(description="Machine-readable error code, if any.")


class ErrorBody(_Model):
    """The OpenAI error envelope."""

    error: ErrorDetail = Field(description="The error.")


class ImagesGenerationRequest(_Body):
    """`POST /v1/images/generations`: the OpenAI Images API request plus sdray's extensions."""

    prompt: str = Field(description="Text description of the image.")
    model: str | None = Field(None, description="Model id; must be the served model if given.")
    n: int | None = Field(None, description="Images to generate (1..serve.max_n); default 1.")
    size: str | None = Field(None, description='"WIDTHxHEIGHT" (multiples of 8) or "auto".')
    response_format: Literal["b64_json", "url"] | None = Field(
        None, description="Only b64_json is served (the default); url is refused."
    )
    output_format: Literal["png"] | None = Field(None, description="Only png is served.")
    stream: bool | None = Field(
        None, description="Server-Sent Events: partial images, then each completed image."
    )
    partial_images: int | None = Field(
        None, description="Partial images streamed before each final one (0..3; default 0)."
    )
    user: str | None = Field(None, description="End-user identifier; accepted and ignored.")
    safety_identifier: str | None = Field(None, description="Accepted and ignored.")
    quality: str | None = Field(None, description="OpenAI's quality tier; accepted and ignored.")
    style: str | None = Field(None, description="OpenAI's dall-e-3 style; accepted and ignored.")
    seed: int | None = Field(
        None, description="Seed of the first image; image i gets (seed + i) mod 2^63."
    )
    steps: int | None = Field(None, description="Denoising steps.")
    guidance_scale: float | None = Field(None, description="Classifier-free guidance scale.")
    negative_prompt: str | None = Field(None, description="What the image should not show.")
    scheduler: str | None = Field(None, description="Scheduler name, e.g. ddim, euler.")


class GenerateRequest(_Body):
    """`POST /v1/generate`: one image with the offline row's fields; answers image/png."""

    prompt: str = Field(description="Text description of the image.")
    model: str | None = Field(None, description="Model id; must be the served model if given.")
    negative_prompt: str | None = Field(None, description="What the image should not show.")
    seed: int | None = Field(None, description="Seed; random (and reported) when left out.")
    steps: int | None = Field(None, description="Denoising steps.")
    guidance_scale: float | None = Field(None, description="Classifier-free guidance scale.")
    width: int | None = Field(None, description="Width in pixels, a multiple of 8.")
    height: int | None = Field(None, description="Height in pixels, a multiple of 8.")
    scheduler: str | None = Field(None, description="Scheduler name, e.g. ddim, euler.")
    init_image: str | None = Field(
        None,
        description="Image-to-image: the starting picture's file (PNG/JPEG/WebP...) in base64, "
        "or as a data: URL. Without width/height the picture's size, rounded down to a "
        "multiple of 8 within the limits.",
    )
    mask_image: str | None = Field(
        None, description="Inpainting: the mask's file in base64; white (>= 128) is repainted."
    )
    strength: float | None = Field(
        None, description="How much of the schedule re-noises init_image (0 < s <= 1)."
    )


class ImagesEditForm(_Model):
    """The text fields of a `POST /v1/images/edits` multipart form (OpenAI's plus sdray's);
    they arrive as text, so numbers and booleans are parsed from it. The files (`image`, `mask`)
    are read separately."""

    prompt: str = Field(description="Text description of the edited image.")
    model: str | None = Field(None, description="Model id; must be the served model if given.")
    n: int | None = Field(None, description="Images to generate (1..serve.max_n); default 1.")
    size: str | None = Field(
        None, description='"WIDTHxHEIGHT" (multiples of 8), or "auto": the picture\'s size.'
    )
    response_format: Literal["b64_json", "url"] | None = Field(
        None, description="Only b64_json is served (the default); url is refused."
    )
    output_format: Literal["png"] | None = Field(None, description="Only png is served.")
    background: Literal["auto", "opaque"] | None = Field(
        None, description="Images are opaque; 'transparent' is refused."
    )
    stream: bool | None = Field(
        None, description="Server-Sent Events: partial images, then each completed image."
    )
    partial_images: int | None = Field(
        None, description="Partial images streamed before each final one (0..3; default 0)."
    )
    quality: str | None = Field(None, description="OpenAI's quality tier; accepted and ignored.")
    input_fidelity: str | None = Field(None, description="Accepted and ignored.")
    user: str | None = Field(None, description="End-user identifier; accepted and ignored.")
    safety_identifier: str | None = Field(None, description="Accepted and ignored.")
    seed: int | None = Field(
        None, description="Seed of the first image; image i gets (seed + i) mod 2^63."
    )
    steps: int | None = Field(
        None, description="Denoising steps of the full schedule; int(steps x strength) run."
    )
    guidance_scale: float | None = Field(None, description="Classifier-free guidance scale.")
    negative_prompt: str | None = Field(None, description="What the image should not show.")
    scheduler: str | None = Field(None, description="Scheduler name, e.g. ddim, euler.")
    strength: float | None = Field(
        None, description="How much of the schedule re-noises the image (0 < s <= 1)."
    )


class ImageData(_Model):
    """One generated image and the seed that reproduces it."""

    b64_json: str = Field(description="Base64 of the PNG file (parameters embedded).")
    seed: int = Field(description="The seed this image was generated from.")


class ImagesResponse(_Model):
    """The OpenAI Images API response."""

    created: int = Field(description="Unix time of the response.")
    data: list[ImageData] = Field(description="The images, in seed order.")
    size: str = Field(description="WIDTHxHEIGHT of every image.")
    output_format: Literal["png"] = Field("png", description="Image encoding.")


class ModelCard(_Model):
    """An OpenAI model object."""

    id: str = Field(description="Model id to pass as `model`.")
    object: Literal["model"] = Field("model", description="Always `model`.")
    created: int = Field(description="Unix time the model was loaded.")
    owned_by: str = Field("sdray", description="Always `sdray`.")
    family: str = Field(description="The model's family (sdray's extension): `sd` or `sdxl`.")


class ModelList(_Model):
    """The OpenAI model list."""

    object: Literal["list"] = Field("list", description="Always `list`.")
    data: list[ModelCard] = Field(description="The served models.")


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """Decode a JSON object body into `model`, or raise a 400 ApiError naming the parameter."""
    try:
        data = json.loads(raw or b"")
    # ValueError: JSONDecodeError, and integers longer than Python converts (4300 digits).
    except (ValueError, RecursionError) as error:
        raise ApiError(
            400,
            f"We could not parse the JSON body of your request ({error}). "
            "Send a JSON object with Content-Type: application/json.",
            code="invalid_json",
        ) from None
    if not isinstance(data, dict):
        raise ApiError(
            400,
            f"The request body must be a JSON object, got {type(data).__name__}.",
            code="invalid_json",
        )
    for key, value in data.items():
        check_text(key, value)
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise _from_validation_error(error) from None


def _unencodable(value: Any) -> str | None:
    """The first string in `value`, nested lists and objects included, that UTF-8 cannot encode."""
    if isinstance(value, str):
        return None if is_unicode_text(value) else value
    if isinstance(value, dict):
        parts: list[Any] = [part for item in value.items() for part in item]
    elif isinstance(value, list):
        parts = value
    else:
        return None
    for part in parts:
        found = _unencodable(part)
        if found is not None:
            return found
    return None


def check_text(param: str, value: Any) -> None:
    """Refuse text that is not valid Unicode: JSON escapes can carry lone surrogates (\\ud800),
    which neither the tokenizer nor the PNG text chunk can take, so they are the sender's 400."""
    bad = _unencodable(value)
    if bad is None:
        bad = _unencodable(param)
    if bad is None:
        return
    name = param.encode("utf-8", "backslashreplace").decode()
    raise ApiError(
        400,
        f"Invalid value for '{name}': the text is not valid Unicode; it cannot be encoded as "
        f"UTF-8 (got {ascii(bad)[:80]}).",
        param=name,
        code="invalid_value",
    )


def _from_validation_error(error: ValidationError) -> ApiError:
    first = error.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    kind = first["type"]
    if kind == "missing":
        return ApiError(
            400, f"Missing required parameter: '{param}'.", param=param, code="missing_parameter"
        )
    if kind == "extra_forbidden":
        return ApiError(
            400,
            f"Unrecognized request argument supplied: '{param}'.",
            param=param,
            code="unknown_parameter",
        )
    value = first.get("input")
    shown = "null" if value is None else json.dumps(value)[:80]
    code = "invalid_value" if kind in ("literal_error", "enum") else "invalid_type"
    return ApiError(
        400, f"Invalid value for '{param}': {first['msg']} (got {shown}).", param=param, code=code
    )


def parse_size(size: str | None, generation: GenerationConfig) -> tuple[int, int]:
    """(width, height) from an OpenAI `size` ("WxH" or "auto"; default: the config's size)."""
    if size is None or size.strip() == "auto":
        return generation.width, generation.height
    match = _SIZE.match(size)
    if not match:
        raise ApiError(
            400,
            f"Invalid value for 'size': {size!r}; expected 'WIDTHxHEIGHT' such as '512x512'.",
            param="size",
            code="invalid_value",
        )
    return int(match.group(1)), int(match.group(2))


def image_seeds(seed: int | None, n: int) -> list[int]:
    """Seeds for `n` images: seed, seed+1, ... (mod 2^63); a random start when seed is None."""
    start = secrets.randbelow(RANDOM_SEED_LIMIT) if seed is None else seed
    return [(start + i) % SEED_LIMIT for i in range(n)]


def check_model(model: str | None, served: str) -> None:
    """Refuse a `model` other than the served one with the OpenAI 404."""
    if model is not None and model != served:
        raise ApiError(
            404,
            f"The model '{model}' does not exist; this server serves '{served}'.",
            param="model",
            code="model_not_found",
        )


def _check_prompt(name: str, text: str | None, limits: ServeConfig) -> None:
    if text is not None and len(text) > limits.max_prompt_chars:
        raise ApiError(
            400,
            f"Invalid value for '{name}': {len(text)} characters is above the limit of "
            f"{limits.max_prompt_chars}.",
            param=name,
            code="above_limit",
        )


def preview_steps(steps: int, strength: float | None, partial_images: int) -> tuple[int, ...]:
    """Which denoising steps (1-based, of the steps run) stream a partial image: up to
    `partial_images` evenly spaced before the last step (whose image is the final one), so a
    short schedule streams fewer, as OpenAI allows."""
    run = steps - denoising_start(steps, strength)
    spaced = {max(1, run * k // (partial_images + 1)) for k in range(1, partial_images + 1)}
    return tuple(sorted(spaced - {run}))


def _partial_images(stream: bool | None, partial_images: int | None) -> int:
    count = partial_images or 0
    if not 0 <= count <= MAX_PARTIAL_IMAGES:
        raise ApiError(
            400,
            f"Invalid value for 'partial_images': {count}; it must be between 0 and "
            f"{MAX_PARTIAL_IMAGES}.",
            param="partial_images",
            code="invalid_value",
        )
    return count if stream else 0


def _prepare_images(
    resolved: dict[str, Any],
    generation: GenerationConfig,
    params: dict[str, str],
    shown: dict[str, str],
    mask_alpha: bool,
):
    """Decode, check and size the init image and mask exactly as the batch path does; a bad one
    is a 400 naming the request's parameter."""
    try:
        return prepare_inputs(
            resolved["init_image"],
            resolved.get("mask_image"),
            width=resolved["width"],
            height=resolved["height"],
            max_width=generation.max_width,
            max_height=generation.max_height,
            max_pixels=generation.max_input_pixels,
            shown=shown,
            mask_alpha=mask_alpha,
        )
    except ImageInputError as error:
        field, _, detail = str(error).partition("=")
        param = params.get(field, field)
        raise ApiError(
            400, f"Invalid value for '{param}': {detail}.", param=param, code="invalid_value"
        ) from None


def _requests(
    fields: dict[str, Any],
    n: int,
    generation: GenerationConfig,
    limits: ServeConfig,
    *,
    params: dict[str, str],
    partial_images: int = 0,
    shown: dict[str, str] | None = None,
    mask_alpha: bool = False,
) -> list[GenerationRequest]:
    """Validate request fields as an input row (`params`: the request's names of row fields)
    and expand them into `n` requests with consecutive seeds. Init images are prepared here:
    call it off the event loop when they are present."""
    _check_prompt("prompt", fields["prompt"], limits)
    _check_prompt("negative_prompt", fields.get("negative_prompt"), limits)
    if not 1 <= n <= limits.max_n:
        raise ApiError(
            400,
            f"Invalid value for 'n': {n}; it must be between 1 and {limits.max_n}.",
            param="n",
            code="above_limit" if n > limits.max_n else "invalid_value",
        )
    resolved, errors = validate_row(fields, generation)
    if errors:
        field = errors[0].split("=", 1)[0]
        param = params.get(field, field)
        raise ApiError(
            400,
            f"Invalid value for '{param}': {'; '.join(errors)}.",
            param=param,
            code="invalid_value",
        )
    width, height = resolved["width"], resolved["height"]
    images: dict[str, Any] = {}
    if resolved["init_image"] is not None:
        prepared = _prepare_images(resolved, generation, params, shown or {}, mask_alpha)
        width, height = prepared.width, prepared.height
        images = {
            "init_image": prepared.init,
            "mask_image": prepared.mask,
            "strength": resolved["strength"],
        }
    preview_at = preview_steps(resolved["steps"], resolved["strength"], partial_images)
    prefix = uuid.uuid4().hex
    return [
        GenerationRequest(
            id=f"{prefix}-{i}",
            prompt=resolved["prompt"],
            negative_prompt=resolved["negative_prompt"] or "",
            seed=seed,
            steps=resolved["steps"],
            guidance_scale=float(resolved["guidance_scale"]),
            width=width,
            height=height,
            scheduler=resolved["scheduler"],
            preview_at=preview_at,
            **images,
        )
        for i, seed in enumerate(image_seeds(resolved["seed"], n))
    ]


def _refuse_url(response_format: str | None) -> None:
    if response_format == "url":
        raise ApiError(
            400,
            "Invalid value for 'response_format': 'url' is not served; use 'b64_json'.",
            param="response_format",
            code="invalid_value",
        )


def images_requests(
    body: ImagesGenerationRequest, generation: GenerationConfig, limits: ServeConfig
) -> list[GenerationRequest]:
    """Validate an Images API request against the config and expand it into `n` requests."""
    _refuse_url(body.response_format)
    width, height = parse_size(body.size, generation)
    fields = {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt,
        "seed": body.seed,
        "steps": body.steps,
        "guidance_scale": body.guidance_scale,
        "width": width,
        "height": height,
        "scheduler": body.scheduler,
    }
    n = 1 if body.n is None else body.n
    partial = _partial_images(body.stream, body.partial_images)
    params = {"width": "size", "height": "size"}
    return _requests(fields, n, generation, limits, params=params, partial_images=partial)


def parse_form(fields: dict[str, str]) -> ImagesEditForm:
    """The edits form's text fields, typed; an empty optional field counts as left out (the
    openai client sends an explicit None as "")."""
    for key, value in fields.items():
        check_text(key, value)
    data = {k: v for k, v in fields.items() if v != "" or k in ("prompt", "negative_prompt")}
    try:
        return ImagesEditForm.model_validate(data)
    except ValidationError as error:
        raise _from_validation_error(error) from None


def edit_requests(
    form: ImagesEditForm,
    image: bytes,
    mask: bytes | None,
    generation: GenerationConfig,
    limits: ServeConfig,
    shown: dict[str, str] | None = None,
) -> list[GenerationRequest]:
    """An Images API edit as `n` image-to-image (or, with a mask, inpainting) requests. The
    mask follows OpenAI's convention where it has transparency (transparent = edit), else the
    rows' (white = repaint). Decodes the images: call it off the event loop."""
    _refuse_url(form.response_format)
    if form.size is None or form.size.strip() == "auto":
        width, height = None, None  # the picture's size, as for a row without width/height
    else:
        width, height = parse_size(form.size, generation)
    fields = {
        "prompt": form.prompt,
        "negative_prompt": form.negative_prompt,
        "seed": form.seed,
        "steps": form.steps,
        "guidance_scale": form.guidance_scale,
        "width": width,
        "height": height,
        "scheduler": form.scheduler,
        "init_image": image,
        "mask_image": mask,
        "strength": form.strength,
    }
    n = 1 if form.n is None else form.n
    return _requests(
        fields,
        n,
        generation,
        limits,
        params=EDIT_PARAMS,
        partial_images=_partial_images(form.stream, form.partial_images),
        shown=shown,
        mask_alpha=True,
    )


def decode_base64(param: str, value: str) -> bytes:
    """A file sent in a JSON body: base64, or a data: URL holding base64."""
    text = value.partition(",")[2] if value.startswith("data:") else value
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(
            400,
            f"Invalid value for '{param}': it is not valid base64 (send the image file's bytes "
            "base64-encoded, or as a data: URL).",
            param=param,
            code="invalid_value",
        ) from None
    if not data:
        raise ApiError(
            400, f"Invalid value for '{param}': it is empty.", param=param, code="invalid_value"
        )
    return data


def generate_request(
    body: GenerateRequest, generation: GenerationConfig, limits: ServeConfig
) -> GenerationRequest:
    """Validate a `/v1/generate` request against the config, as an input row: init_image and
    mask_image (base64) have the rows' semantics (white repaints). Decodes any images: call it
    off the event loop when they are present."""
    fields = body.model_dump(exclude={"model"})
    if body.init_image is None and body.strength is not None:
        raise ApiError(
            400,
            "Invalid value for 'strength': it applies only with an init_image.",
            param="strength",
            code="invalid_value",
        )
    shown = {}
    for name in ("init_image", "mask_image"):
        if fields[name] is not None:
            fields[name] = decode_base64(name, fields[name])
            shown[name] = f"<{len(fields[name])} bytes>"
    return _requests(fields, 1, generation, limits, params={}, shown=shown)[0]

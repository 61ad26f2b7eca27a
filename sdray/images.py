"""Image encoding (PNG/JPEG/WebP) with the generation parameters embedded in each file."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

from sdray.schedulers import SCHEDULERS

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286


def infotext(params: dict[str, Any]) -> str:
    """The A1111 "parameters" text: prompt, optional negative prompt, then the settings line."""
    lines = [params["prompt"]]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    scheduler = params["scheduler"]
    sampler = SCHEDULERS[scheduler].label if scheduler in SCHEDULERS else scheduler
    guidance = float(params["guidance_scale"])
    lines.append(
        f"Steps: {params['steps']}, Sampler: {sampler}, CFG scale: {guidance:g}, "
        f"Seed: {params['seed']}, Size: {params['width']}x{params['height']}, "
        f"Model: {params['model']}"
    )
    return "\n".join(lines)


def encode_image(pixels: np.ndarray, image_format: str, text: str, quality: int = 95) -> bytes:
    """Encode HxWx3 uint8 pixels; PNG gets a `parameters` text chunk, JPEG/WebP an EXIF comment."""
    image = Image.fromarray(pixels, mode="RGB")
    buffer = io.BytesIO()
    if image_format == "png":
        info = PngImagePlugin.PngInfo()
        info.add_itxt("parameters", text)
        image.save(buffer, format="PNG", pnginfo=info, compress_level=4)
    elif image_format in ("jpeg", "webp"):
        exif = Image.Exif()
        # EXIF UserComment with the UNICODE charset prefix, as A1111 writes it.
        exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = b"UNICODE\x00" + text.encode("utf-16-be")
        fmt = "JPEG" if image_format == "jpeg" else "WEBP"
        image.save(buffer, format=fmt, quality=quality, exif=exif.tobytes())
    else:
        raise ValueError(f"unknown image format {image_format!r}")
    return buffer.getvalue()


def read_infotext(data: bytes) -> str | None:
    """The embedded parameters text of an encoded image, if any."""
    image = Image.open(io.BytesIO(data))
    if "parameters" in image.info:
        return image.info["parameters"]
    comment = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if isinstance(comment, bytes) and comment.startswith(b"UNICODE\x00"):
        return comment[8:].decode("utf-16-be")
    if isinstance(comment, str):
        return comment
    return None

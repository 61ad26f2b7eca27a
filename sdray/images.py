"""Image encoding (PNG/JPEG/WebP) with the generation parameters embedded in each file."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin

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
    settings = (
        f"Steps: {params['steps']}, Sampler: {sampler}, CFG scale: {guidance:g}, "
        f"Seed: {params['seed']}, Size: {params['width']}x{params['height']}, "
        f"Model: {params['model']}"
    )
    if params.get("strength") is not None:
        settings += f", Denoising strength: {float(params['strength']):g}"
    lines.append(settings)
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


# ---------------------------------------------------------------------------------------------
# Image inputs (image-to-image, inpainting): decode, check, size and crop, as CPU work outside
# the model, the same for batch rows and served requests.


class ImageInputError(ValueError):
    """An init or mask image that cannot be used; the message names the field and value."""


@dataclass
class PreparedInputs:
    """An init image (HxWx3 uint8) and optional mask (HxW uint8) at the size to generate."""

    init: np.ndarray
    mask: np.ndarray | None
    width: int
    height: int


def decode_input(data: bytes, field: str, shown: str, max_pixels: int) -> Image.Image:
    """Open an encoded image, refusing non-images, truncated files and images over `max_pixels`
    (checked from the header, before the pixels are decoded: no decompression bomb is ever
    expanded)."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > max_pixels:
            raise ImageInputError(
                f"{field}={shown}: {image.width}x{image.height} is over the limit of "
                f"{max_pixels} pixels (generation.max_input_pixels)"
            )
        image.load()
    except ImageInputError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageInputError(
            f"{field}={shown}: refused as a decompression bomb ({error})"
        ) from None
    except (OSError, SyntaxError, ValueError) as error:  # PIL: unknown format, truncated data
        raise ImageInputError(f"{field}={shown}: is not a readable image ({error})") from None
    return image


def input_size(
    image_size: tuple[int, int],
    width: int | None,
    height: int | None,
    max_width: int,
    max_height: int,
) -> tuple[int, int]:
    """The size to generate from an init image: the row's width/height where given, else the
    picture's, scaled down (keeping its aspect ratio) to fit the limits, then rounded down to a
    multiple of 8."""
    w, h = image_size
    scale = min(1.0, max_width / w, max_height / h)
    w, h = w * scale, h * scale
    return (
        width if width is not None else max(8, int(w) // 8 * 8),
        height if height is not None else max(8, int(h) // 8 * 8),
    )


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """The picture at exactly width x height without distortion: scaled (Lanczos) to cover it,
    then centre-cropped, as diffusers' `VaeImageProcessor.resize(..., resize_mode="crop")`."""
    if image.size == (width, height):
        return image
    if width / height > image.width / image.height:
        size = (width, image.height * width // image.width)
    else:
        size = (image.width * height // image.height, height)
    scaled = image.resize(size, resample=Image.LANCZOS)
    canvas = Image.new(image.mode, (width, height))
    canvas.paste(scaled, (width // 2 - size[0] // 2, height // 2 - size[1] // 2))
    return canvas


def mask_layer(mask: Image.Image, alpha: bool = False) -> Image.Image:
    """A mask as greyscale, white (>= 128) = repaint. With `alpha` (OpenAI's convention: the
    transparent areas are edited), a mask that has transparent pixels repaints where it is
    transparent (255 - alpha); one without transparency is read by its luminance."""
    if alpha and mask.has_transparency_data:
        opacity = mask.convert("RGBA").getchannel("A")
        if opacity.getextrema()[0] < 255:
            return ImageOps.invert(opacity)
    return mask.convert("L")


def prepare_inputs(
    init: bytes,
    mask: bytes | None,
    *,
    width: int | None,
    height: int | None,
    max_width: int,
    max_height: int,
    max_pixels: int,
    shown: dict[str, str] | None = None,
    mask_alpha: bool = False,
) -> PreparedInputs:
    """Decode, check and size an init image (RGB) and its mask (greyscale; white repaints;
    with `mask_alpha`, transparent repaints where the mask has transparency: see `mask_layer`)."""
    shown = shown or {}
    picture = decode_input(init, "init_image", shown.get("init_image", "<bytes>"), max_pixels)
    layer = None
    if mask is not None:
        layer = decode_input(mask, "mask_image", shown.get("mask_image", "<bytes>"), max_pixels)
        if layer.size != picture.size:
            raise ImageInputError(
                f"mask_image={shown.get('mask_image', '<bytes>')}: its size "
                f"{layer.width}x{layer.height} differs from the init image's "
                f"{picture.width}x{picture.height}"
            )
    w, h = input_size(picture.size, width, height, max_width, max_height)
    return PreparedInputs(
        init=np.asarray(fit(picture.convert("RGB"), w, h)),
        mask=None if layer is None else np.asarray(fit(mask_layer(layer, mask_alpha), w, h)),
        width=w,
        height=h,
    )


def filmstrip(frames: list[tuple[str, np.ndarray]], image_format: str = "png") -> bytes:
    """One strip image of labelled frames, left to right (the image emerging, step by step)."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    label_height = 14
    height = max(frame.shape[0] for _, frame in frames)
    width = sum(frame.shape[1] for _, frame in frames) + 2 * (len(frames) - 1)
    strip = Image.new("RGB", (width, height + label_height), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    x = 0
    for label, frame in frames:
        strip.paste(Image.fromarray(frame, "RGB"), (x, 0))
        draw.text((x + 2, height + 1), label, fill=(0, 0, 0), font=font)
        x += frame.shape[1] + 2
    buffer = io.BytesIO()
    strip.save(buffer, format="PNG" if image_format == "png" else image_format.upper())
    return buffer.getvalue()

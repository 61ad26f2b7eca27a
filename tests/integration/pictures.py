"""Pictures and masks drawn in code, for image-to-image and inpainting over HTTP."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw

SIZE = (80, 72)  # not square, not a default size: requests without one take the picture's


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def scene() -> bytes:
    """A sky, a sun and a field, as PNG bytes."""
    image = Image.new("RGB", SIZE, (90, 140, 220))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 48, SIZE[0], SIZE[1]), fill=(60, 150, 60))
    draw.ellipse((50, 8, 70, 28), fill=(250, 220, 40))
    return png(image)


def masks() -> tuple[bytes, bytes]:
    """The same region (around the sun) as OpenAI's mask (transparent = edit) and as a row's
    mask (white = repaint)."""
    openai_mask = Image.new("RGBA", SIZE, (255, 255, 255, 255))
    ImageDraw.Draw(openai_mask).rectangle((44, 4, 76, 34), fill=(255, 255, 255, 0))
    row_mask = Image.new("L", SIZE, 0)
    ImageDraw.Draw(row_mask).rectangle((44, 4, 76, 34), fill=255)
    return png(openai_mask), png(row_mask)

"""Draw the example pictures and masks that configs/examples/img2img.csv and inpaint.csv use.

    python pipelines/draw_examples.py      # rewrites configs/examples/pictures/*.png

The pictures are drawn in code (nothing downloaded): flat shapes on plain backgrounds, the world
the embedded model knows. One is 100x76 on purpose: rows that give no width/height take the
picture's size rounded down to a multiple of 8 (96x72).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parents[1] / "configs" / "examples" / "pictures"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    circle = Image.new("RGB", (128, 128), (245, 245, 240))
    ImageDraw.Draw(circle).ellipse((28, 28, 100, 100), fill=(200, 30, 30))
    circle.save(OUT / "red-circle.png")

    square = Image.new("RGB", (128, 128), (30, 60, 140))
    ImageDraw.Draw(square).rectangle((16, 16, 64, 64), fill=(240, 200, 20))
    square.save(OUT / "yellow-square.png")

    wide = Image.new("RGB", (100, 76), (235, 235, 235))
    ImageDraw.Draw(wide).polygon([(50, 8), (90, 68), (10, 68)], fill=(20, 140, 60))
    wide.save(OUT / "green-triangle.png")

    # Inpainting masks: white is repainted, black kept.
    right = Image.new("L", (128, 128), 0)
    ImageDraw.Draw(right).rectangle((64, 0, 127, 127), fill=255)
    right.save(OUT / "mask-right-half.png")
    centre = Image.new("L", (128, 128), 0)
    ImageDraw.Draw(centre).ellipse((24, 24, 104, 104), fill=255)
    centre.save(OUT / "mask-centre.png")


if __name__ == "__main__":
    main()

"""The README's contact sheet of a `make demo` output: its images in the table's order, captioned.

python pipelines/demo_sheet.py demo-output configs/examples/demo.png
"""

import argparse
import io
import sys
import textwrap

import pyarrow.csv as pcsv
from PIL import Image, ImageDraw, ImageFont

from sdray.batch import read_metadata
from sdray.storage import filesystem, join

CELL, PAD, TEXT, COLUMNS = 128, 6, 44, 4


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="the demo's output directory or URI")
    parser.add_argument("sheet", help="PNG to write")
    parser.add_argument("--prompts", default="configs/examples/prompts.csv")
    args = parser.parse_args(argv)
    order = [r["id"] for r in pcsv.read_csv(args.prompts).to_pylist()]
    rows = [r for r in read_metadata(args.output).to_pylist() if r["status"] == "ok"]
    rows.sort(key=lambda r: order.index(r["id"]) if r["id"] in order else len(order))
    fs, root = filesystem(args.output)
    lines = (len(rows) + COLUMNS - 1) // COLUMNS
    sheet = Image.new(
        "RGB", (COLUMNS * (CELL + PAD) + PAD, lines * (CELL + TEXT + PAD) + PAD), "white"
    )
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default(11)
    for index, row in enumerate(rows):
        x = PAD + (index % COLUMNS) * (CELL + PAD)
        y = PAD + (index // COLUMNS) * (CELL + TEXT + PAD)
        with fs.open(join(root, row["image_path"]), "rb") as handle:
            image = Image.open(io.BytesIO(handle.read())).convert("RGB")
        sheet.paste(image.resize((CELL, CELL), Image.NEAREST), (x, y))
        for line, text in enumerate(textwrap.wrap(row["prompt"], 22)[:3]):
            draw.text((x, y + CELL + 2 + 13 * line), text, fill="black", font=font)
    sheet.save(args.sheet, optimize=True)
    print(f"{args.sheet}: {len(rows)} images, {sheet.size[0]}x{sheet.size[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

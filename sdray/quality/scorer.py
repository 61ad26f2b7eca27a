"""Score a picture against its prompt, analytically: no model, no download.

`detect` segments the one shape from its background (the border's colour) and reads its colour
(hue), shape (how much of its bounding box it fills, and whether it is top-light like a
triangle), position (bounding-box centre on a 3x3 grid), size and the background colour.
`score(image, prompt)` says, for each attribute the prompt names, whether the picture has it.
"""

from __future__ import annotations

import colorsys
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields

import numpy as np

from sdray.quality.world import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZE_WORDS

ATTRIBUTES = ("colour", "shape", "position", "size", "background")

# Thresholds on the features `detect` measures, set from renders of the world (see the tests):
# a circle fills pi/4 of its box, a square all of it, a diamond half; a triangle (apex up) has a
# quarter of its area in the top half of its box, the others half.
TRIANGLE_MAX_TOP_SHARE = 0.36
SQUARE_MIN_FILL = 0.89
CIRCLE_MIN_FILL = 0.66
# Bounding-box side as a fraction of the picture's side: small < 0.28 <= medium < 0.40 <= large.
SIZE_LIMITS = (0.28, 0.40)
# An object pixel differs from the background by more than this (RGB distance), and the shape
# must cover this fraction of the picture, or the picture has no object at all.
MIN_CONTRAST = 60.0
MIN_AREA_FRACTION = 0.01
MIN_SATURATION = 0.3  # below it the object is grey, white or black: no colour of the world


@dataclass(frozen=True)
class Spec:
    """The attributes a prompt names; None where it says nothing of one."""

    colour: str | None = None
    shape: str | None = None
    position: str | None = None
    size: str | None = None
    background: str | None = None


@dataclass(frozen=True)
class Detection:
    """What `detect` sees in a picture: the same attributes (None when no object is found)."""

    colour: str | None
    shape: str | None
    position: str | None
    size: str | None
    background: str | None
    features: dict[str, float] = field(default_factory=dict, compare=False)


_SIZE_WORD = {w: size for size, words in SIZE_WORDS.items() for w in words}


def parse_prompt(prompt: str) -> Spec:
    """The world's attributes named in a prompt (first mention wins; 'grey' is gray)."""
    words = re.findall(r"[a-z]+", prompt.lower().replace("grey", "gray"))

    def first(choices: Iterable[str]) -> str | None:
        return next((w for w in words if w in choices), None)

    vertical = first(("top", "bottom"))
    horizontal = first(("left", "right"))
    if vertical or horizontal:
        position = " ".join(p for p in (vertical, horizontal) if p)
    else:
        position = "center" if first(("center", "centre", "middle")) else None
    size = first(_SIZE_WORD)
    return Spec(
        colour=first(COLOURS),
        shape=first(SHAPES),
        position=position,
        size=_SIZE_WORD[size] if size else None,
        background=first(BACKGROUNDS),
    )


def _hue(rgb: np.ndarray) -> tuple[float, float]:
    hue, _, saturation = colorsys.rgb_to_hls(*(rgb / 255.0))
    return hue, saturation


_COLOUR_HUES = {name: _hue(np.array(rgb, dtype=float))[0] for name, rgb in COLOURS.items()}


def _nearest_hue(hue: float) -> str:
    def distance(name: str) -> float:
        d = abs(hue - _COLOUR_HUES[name])
        return min(d, 1 - d)

    return min(_COLOUR_HUES, key=distance)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = ndimage.sum(mask, labels, index=range(1, count + 1))
    return ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))


def detect(image) -> Detection:
    """Find the one shape in an HxWx3 picture (array or PIL image) and read its attributes."""
    pixels = np.asarray(image, dtype=np.float64)[..., :3]
    height, width = pixels.shape[:2]
    border = np.concatenate(
        [pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3)]
        + [pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)]
    )
    background_rgb = np.median(border, axis=0)
    background = min(
        BACKGROUNDS, key=lambda n: np.linalg.norm(background_rgb - np.array(BACKGROUNDS[n]))
    )
    to_background = np.linalg.norm(pixels - background_rgb, axis=-1)
    candidates = to_background > MIN_CONTRAST
    if candidates.mean() < MIN_AREA_FRACTION:
        return Detection(None, None, None, None, background, {"area": float(candidates.mean())})
    # The object's colour from its most distinct pixels; then every pixel nearer to it than to
    # the background is the object (the midpoint of an anti-aliased edge).
    strong = to_background >= 0.7 * np.percentile(to_background[candidates], 90)
    object_rgb = np.median(pixels[strong & candidates], axis=0)
    to_object = np.linalg.norm(pixels - object_rgb, axis=-1)
    mask = _largest_component(to_object < to_background)
    rows, columns = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max() + 1, columns.min(), columns.max() + 1
    box_height, box_width = bottom - top, right - left
    area = float(mask.sum())
    middle = (top + bottom) / 2
    top_share = float(mask[top : int(np.floor(middle))].sum() + 0.0)
    top_share += float(mask[int(np.floor(middle))].sum()) * (middle - np.floor(middle))
    top_share /= area
    fill = area / (box_height * box_width)
    if top_share < TRIANGLE_MAX_TOP_SHARE:
        shape = "triangle"
    elif fill >= SQUARE_MIN_FILL:
        shape = "square"
    elif fill >= CIRCLE_MIN_FILL:
        shape = "circle"
    else:
        shape = "diamond"
    hue, saturation = _hue(object_rgb)
    colour = _nearest_hue(hue) if saturation >= MIN_SATURATION else None
    centre_x, centre_y = (left + right) / 2 / width, (top + bottom) / 2 / height
    position = POSITIONS[3 * min(int(centre_y * 3), 2) + min(int(centre_x * 3), 2)]
    extent = max(box_width / width, box_height / height)
    size = "small" if extent < SIZE_LIMITS[0] else "medium" if extent < SIZE_LIMITS[1] else "large"
    features = {
        "fill": fill,
        "top_share": top_share,
        "hue": hue,
        "saturation": saturation,
        "extent": extent,
        "centre_x": centre_x,
        "centre_y": centre_y,
        "area": area / (height * width),
    }
    return Detection(colour, shape, position, size, background, features)


def score(image, prompt: str | Spec) -> dict[str, bool]:
    """For each attribute the prompt names, whether the picture shows it."""
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    seen = detect(image)
    return {
        f.name: getattr(seen, f.name) == getattr(spec, f.name)
        for f in fields(spec)
        if getattr(spec, f.name) is not None
    }


def accuracy(scores: Iterable[Mapping[str, bool]]) -> dict[str, float]:
    """Per attribute, the fraction of pictures that show it (over those whose prompt names it),
    and `all`: the fraction showing every attribute their prompt names."""
    hits: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES}
    everything = []
    for row in scores:
        for name, hit in row.items():
            hits[name].append(bool(hit))
        everything.append(all(row.values()))
    result = {name: float(np.mean(v)) for name, v in hits.items() if v}
    if everything:
        result["all"] = float(np.mean(everything))
    return result

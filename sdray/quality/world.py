"""The embedded model's world: one flat shape on a plain background, drawn and captioned in code.

A scene is (colour, shape, position, size, background) plus a little jitter; `render` draws it
and `caption` states it in one of several phrasings. The (colour, shape, position) triples that
`is_held_out` names never appear in training, so evaluation asks for pictures the model never saw.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64  # pixels: the size the embedded model was trained at (latents 8x8)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 215, 40),
    "green": (50, 165, 70),
    "blue": (45, 90, 215),
    "purple": (140, 60, 190),
}
SHAPES = ("circle", "square", "triangle", "diamond")
# Reading order over a 3x3 grid: index = 3 * row + column.
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
# Side of the shape's bounding box, in pixels of a 64-pixel picture (uniform in the range).
SIZES: dict[str, tuple[float, float]] = {"small": (12, 15), "medium": (19, 23), "large": (27, 30)}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}

POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "center": ("in the center", "in the middle", "at the center"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "left": ("on the left", "at the left side"),
    "right": ("on the right", "at the right side"),
    **{
        corner: (f"in the {corner} corner", f"at the {corner}", f"in the {corner}")
        for corner in ("top left", "top right", "bottom left", "bottom right")
    },
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "large": ("large", "big"),
}
BACKGROUND_PHRASES = ("on a {} background", "on {}", "against a {} background")
TEMPLATES = (
    "{object} {position} {background}",
    "{object} {background} {position}",
    "a picture of {object} {position} {background}",
    "there is {object} {position} {background}",
    "{position}, {object} {background}",
    "{noun}, {position}, {background}",
)


@dataclass(frozen=True)
class Scene:
    """One picture of the world: its attributes, and where exactly the shape lies (pixels of 64)."""

    colour: str
    shape: str
    position: str
    size: str
    background: str
    x: float  # centre of the shape's bounding box
    y: float
    side: float  # side of the bounding box
    colour_jitter: tuple[int, int, int] = (0, 0, 0)


def is_held_out(colour: str, shape: str, position: str) -> bool:
    """Whether training never shows this (colour, shape, position): one triple in six.

    Every pair of the three is still seen in training (with other values of the third).
    """
    code = list(COLOURS).index(colour) + 2 * SHAPES.index(shape) + POSITIONS.index(position)
    return code % 6 == 0


def held_out_triples() -> list[tuple[str, str, str]]:
    """Every held-out (colour, shape, position), in a fixed order."""
    return [(c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS if is_held_out(c, s, p)]


def place(position: str, side: float, rng: random.Random) -> tuple[float, float]:
    """A bounding-box centre inside the position's third of the picture, shape fully visible."""
    row, column = divmod(POSITIONS.index(position), 3)
    third, half, margin = IMAGE_SIZE / 3, side / 2, 2.0

    def coordinate(index: int) -> float:
        value = (index + 0.5) * third + rng.uniform(-4, 4)
        value = min(max(value, index * third + margin), (index + 1) * third - margin)
        return min(max(value, half + 1), IMAGE_SIZE - half - 1)

    return coordinate(column), coordinate(row)


def sample_scene(rng: random.Random, *, held_out: bool | None = False, **fixed: str) -> Scene:
    """A random scene; `fixed` pins attributes by name. `held_out`: False draws only training
    triples, True only held-out ones, None any."""
    while True:
        colour = fixed.get("colour") or rng.choice(list(COLOURS))
        shape = fixed.get("shape") or rng.choice(SHAPES)
        position = fixed.get("position") or rng.choice(POSITIONS)
        if held_out is None or is_held_out(colour, shape, position) == held_out:
            break
        if {"colour", "shape", "position"} <= fixed.keys():
            raise ValueError(f"{colour} {shape} {position} is not in the requested split")
    size = fixed.get("size") or rng.choice(list(SIZES))
    background = fixed.get("background") or rng.choice(list(BACKGROUNDS))
    side = rng.uniform(*SIZES[size])
    x, y = place(position, side, rng)
    jitter = tuple(rng.randint(-12, 12) for _ in range(3))
    return Scene(colour, shape, position, size, background, x, y, side, jitter)  # type: ignore[arg-type]


def render(scene: Scene, supersample: int = 4) -> np.ndarray:
    """Draw a scene as a 64x64x3 uint8 array (anti-aliased by drawing large, then shrinking)."""
    from PIL import Image, ImageDraw

    scale = supersample
    background = BACKGROUNDS[scene.background]
    image = Image.new("RGB", (IMAGE_SIZE * scale, IMAGE_SIZE * scale), background)
    draw = ImageDraw.Draw(image)
    fill = tuple(
        min(max(c + j, 0), 255)
        for c, j in zip(COLOURS[scene.colour], scene.colour_jitter, strict=True)
    )
    x, y, h = scene.x * scale, scene.y * scale, scene.side * scale / 2
    if scene.shape == "circle":
        draw.ellipse((x - h, y - h, x + h, y + h), fill=fill)
    elif scene.shape == "square":
        draw.rectangle((x - h, y - h, x + h, y + h), fill=fill)
    elif scene.shape == "triangle":
        draw.polygon([(x, y - h), (x + h, y + h), (x - h, y + h)], fill=fill)
    elif scene.shape == "diamond":
        draw.polygon([(x, y - h), (x + h, y), (x, y + h), (x - h, y)], fill=fill)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.uint8)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(
    scene: Scene,
    rng: random.Random,
    *,
    position: bool = True,
    size: bool = True,
    background: bool = True,
) -> str:
    """A caption of the scene in a random phrasing; flags leave attributes unsaid.

    Medium size is never said; colour and shape always are.
    """
    size_word = rng.choice(SIZE_WORDS[scene.size]) if size and scene.size in SIZE_WORDS else ""
    noun = " ".join(w for w in (size_word, scene.colour, scene.shape) if w)
    parts = {
        "object": f"{_article(noun)} {noun}",
        "noun": noun,
        "position": rng.choice(POSITION_PHRASES[scene.position]) if position else "",
        "background": rng.choice(BACKGROUND_PHRASES).format(scene.background) if background else "",
    }
    text = rng.choice(TEMPLATES).format(**parts)
    text = re.sub(r"\s*,(\s*,)+", ",", text)  # an unsaid part between two commas
    return re.sub(r"\s+", " ", text).strip(" ,").replace(" ,", ",")


def training_caption(scene: Scene, rng: random.Random) -> str:
    """A caption as training sees it: position mostly said, size and background often."""
    return caption(
        scene,
        rng,
        position=rng.random() < 0.85,
        size=rng.random() < 0.6,
        background=rng.random() < 0.5,
    )


def vocabulary() -> list[str]:
    """Every word the captions use, sorted (the tokenizer gives each one a token)."""
    texts = [
        *COLOURS,
        *SHAPES,
        *BACKGROUNDS,
        *(w for words in SIZE_WORDS.values() for w in words),
        *(p for phrases in POSITION_PHRASES.values() for p in phrases),
        *BACKGROUND_PHRASES,
        *TEMPLATES,
        "an",
    ]
    words = set()
    for text in texts:
        words.update(re.findall(r"[a-z]+", re.sub(r"\{[a-z]*\}", " ", text)))
    return sorted(words)


def evaluation_prompts(count: int, seed: int = 0, *, held_out: bool = True) -> list[dict]:
    """`count` rows (`id`, `prompt`, `seed`) naming colour, shape and position, from held-out
    triples in turn (or training ones); about half also name size, half the background."""
    rng = random.Random(seed)
    if held_out:
        triples = held_out_triples()
    else:
        triples = [
            (c, s, p)
            for c in COLOURS
            for s in SHAPES
            for p in POSITIONS
            if not is_held_out(c, s, p)
        ]
        rng.shuffle(triples)
    rows = []
    for index in range(count):
        colour, shape, position = triples[index % len(triples)]
        scene = sample_scene(rng, held_out=held_out, colour=colour, shape=shape, position=position)
        text = caption(scene, rng, size=rng.random() < 0.5, background=rng.random() < 0.5)
        rows.append({"id": f"q{index:04d}", "prompt": text, "seed": rng.randrange(2**31)})
    return rows

"""The synthetic world and the quality scorer: captions say what is drawn, the scorer reads it
back from ground-truth renders, and the held-out split holds."""

import random

import numpy as np
import pytest

from sdray.quality import Spec, accuracy, detect, parse_prompt, score, world


@pytest.fixture(scope="module")
def scenes():
    rng = random.Random(123)
    return [world.sample_scene(rng, held_out=None) for _ in range(400)]


def test_scorer_reads_ground_truth_renders_perfectly(scenes):
    scores = [
        score(world.render(s), Spec(s.colour, s.shape, s.position, s.size, s.background))
        for s in scenes
    ]
    figures = accuracy(scores)
    assert set(figures) == {"colour", "shape", "position", "size", "background", "all"}
    assert figures["all"] >= 0.99, figures


def test_every_attribute_value_is_recognised(scenes):
    seen = {a: set() for a in ("colour", "shape", "position", "size", "background")}
    for scene in scenes:
        found = detect(world.render(scene))
        for attribute, values in seen.items():
            if getattr(found, attribute) == getattr(scene, attribute):
                values.add(getattr(found, attribute))
    assert seen["colour"] == set(world.COLOURS) and seen["shape"] == set(world.SHAPES)
    assert seen["position"] == set(world.POSITIONS) and seen["size"] == set(world.SIZES)
    assert seen["background"] == set(world.BACKGROUNDS)


def test_wrong_prompts_and_empty_pictures_score_misses():
    scene = world.sample_scene(
        random.Random(0), colour="red", shape="circle", position="top left", held_out=None
    )
    picture = world.render(scene)
    hits = score(picture, "a blue square in the bottom right corner")
    assert hits == {"colour": False, "shape": False, "position": False}
    assert score(picture, "a red circle in the top left corner") == {
        "colour": True,
        "shape": True,
        "position": True,
    }
    blank = np.full((64, 64, 3), 245, np.uint8)
    assert score(blank, "a red circle at the top on a white background") == {
        "colour": False,
        "shape": False,
        "position": False,
        "background": True,
    }
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert not all(score(noise, "a red circle at the top").values())


def test_scorer_works_at_other_sizes():
    scene = world.sample_scene(
        random.Random(1), colour="green", shape="triangle", position="right", held_out=None
    )
    from PIL import Image

    large = Image.fromarray(world.render(scene)).resize((128, 192))
    assert all(score(large, f"a green triangle on the right on {scene.background}").values())


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a small red circle in the top left corner", Spec("red", "circle", "top left", "small")),
        ("Big BLUE square, bottom, on grey", Spec("blue", "square", "bottom", "large", "gray")),
        ("in the middle, an orange diamond", Spec("orange", "diamond", "center")),
        ("a red fox in the snow", Spec(colour="red")),
        ("", Spec()),
    ],
)
def test_prompts_parse_into_the_attributes_they_name(prompt, expected):
    assert parse_prompt(prompt) == expected


def test_captions_name_what_is_drawn(scenes):
    rng = random.Random(5)
    for scene in scenes:
        text = world.caption(scene, rng)
        expected_size = scene.size if scene.size != "medium" else None
        assert parse_prompt(text) == Spec(
            scene.colour, scene.shape, scene.position, expected_size, scene.background
        ), text
        spec = parse_prompt(world.training_caption(scene, rng))
        assert (spec.colour, spec.shape) == (scene.colour, scene.shape)


def test_held_out_triples_never_train_and_every_pair_still_does():
    rng = random.Random(0)
    training = {
        (s.colour, s.shape, s.position) for s in (world.sample_scene(rng) for _ in range(5000))
    }
    held_out = set(world.held_out_triples())
    assert len(held_out) == 36 and not training & held_out
    for first, second in ((0, 1), (0, 2), (1, 2)):
        pairs = {(t[first], t[second]) for t in training}
        assert {(t[first], t[second]) for t in held_out} <= pairs
    prompts = world.evaluation_prompts(72)
    named = {(s.colour, s.shape, s.position) for s in (parse_prompt(p["prompt"]) for p in prompts)}
    assert named == held_out
    assert len({p["id"] for p in prompts}) == 72


def test_every_caption_word_is_one_token(tiny_engine):
    tokenizer = tiny_engine.tokenizer
    for word in world.vocabulary():
        assert len(tokenizer(word).input_ids) == 3, word  # start, the word, end
    # anything else still tokenizes, byte by byte
    assert len(tokenizer("a zebra").input_ids) == 2 + 1 + len("zebra")

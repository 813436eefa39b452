"""`mmstack.apps.image_checks`: caption parsing, and a shape/colour checker validated on synthetic ground truth."""
from __future__ import annotations

import itertools
import json

import pytest
from PIL import Image, ImageFilter

from mmstack.apps import image_checks as M
from mmstack.apps import synth


# ------------------------------------------------------------------------------------------ captions


def test_parse_caption_and_caption_score():
    assert M.parse_caption("a red circle, a Blue square and a green triangle.") == [
        ("red", "circle"), ("blue", "square"), ("green", "triangle")]
    truth = [("red", "circle"), ("blue", "square")]
    assert M.caption_score("a red circle and a blue square.", truth) == 1.0
    assert M.caption_score("a red circle and a red square.", truth) == 0.5
    assert M.caption_score("two red circles", [("red", "circle"), ("red", "circle")]) == 0.5  # one mention
    assert M.caption_score("nothing", [{"colour": "red", "shape": "circle"}]) == 0.0
    assert M.caption_score("", []) == 1.0


# ------------------------------------------------------------------------------------------ generated-image checker


def _drawn(colour: str, shape: str, side: int, size: int = 64, bg=(255, 255, 255)) -> Image.Image:
    img = Image.new("RGB", (size, size), bg)
    x = (size - side) // 2
    synth.draw_shape(img, shape, colour, [x, x, x + side, x + side])
    return img


@pytest.mark.parametrize("side", [8, 20, 44])
def test_classifier_names_every_colour_and_shape(side):
    for colour, shape in itertools.product(synth.COLOURS, synth.SHAPES):
        assert M.classify_shape_colour(_drawn(colour, shape, side)) == (colour, shape)
        blurred = _drawn(colour, shape, side, bg=(235, 240, 228)).filter(ImageFilter.GaussianBlur(1))
        if side >= 20:  # blur erases the shape of an 8-px blob, but not of the larger ones
            assert M.classify_shape_colour(blurred) == (colour, shape)


def test_check_generated_rejects_wrong_missing_extra_and_misordered_objects():
    img = _drawn("red", "circle", 24)
    assert M.check_generated(img, "a red circle") and M.check_generated(img, "A red circle.")
    assert not M.check_generated(img, "a blue circle") and not M.check_generated(img, "a red square")
    assert not M.check_generated(Image.new("RGB", (64, 64), "white"), "a red circle")
    assert M.classify_shape_colour(Image.new("RGB", (64, 64), "white")) == (None, None)
    two = Image.new("RGB", (64, 64), "white")
    synth.draw_shape(two, "square", "blue", [20, 4, 44, 28])
    synth.draw_shape(two, "triangle", "yellow", [20, 36, 44, 60])
    assert M.check_generated(two, "a blue square above a yellow triangle")
    assert not M.check_generated(two, "a yellow triangle above a blue square")
    assert not M.check_generated(two, "a blue square")  # an extra object
    with pytest.raises(ValueError):
        M.check_generated(img, "a cat on a mat")


@pytest.mark.parametrize("size", [32, 96])
def test_checker_agrees_with_the_synthetic_ground_truth(tmp_path, size):
    """The checker scores generated images only if it is right on the real thing: >= 95% required (100% seen),
    also after a blur like the one a VQ decoder adds."""
    synth.generate(tmp_path, 120, seed=7, kinds=("t2i",), t2i_size=size, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "t2i.jsonl").read_text().splitlines()]
    images = [Image.open(tmp_path / r["image"]).convert("RGB") for r in rows]
    exact = sum(M.check_generated(img, r["prompt"]) for img, r in zip(images, rows)) / len(rows)
    blurred = sum(M.check_generated(img.filter(ImageFilter.GaussianBlur(size / 96)), r["prompt"])
                  for img, r in zip(images, rows)) / len(rows)
    single = [(img, r) for img, r in zip(images, rows) if " above " not in r["prompt"]]
    named = sum(M.classify_shape_colour(img) == tuple(r["prompt"].split()[1:]) for img, r in single) / len(single)
    assert exact >= 0.95 and blurred >= 0.95 and named >= 0.95, (exact, blurred, named)


def test_find_objects_recovers_every_scene_object_and_its_box(tmp_path):
    """Scenes have tinted backgrounds and up to three objects; the checker finds each one's colour, shape and box."""
    synth.generate(tmp_path, 60, seed=3, kinds=("scene",), image_size=64, progress=False)
    for line in (tmp_path / "data.jsonl").read_text().splitlines():
        r = json.loads(line)
        found = sorted((o.colour, o.shape, list(o.box)) for o in M.find_objects(Image.open(tmp_path / r["images"][0])))
        assert found == sorted((o["colour"], o["shape"], o["box"]) for o in r["meta"]["objects"]), r["id"]

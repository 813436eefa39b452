"""`mmstack.vision.grounding`: DeepSeek-VL2 <|ref|>/<|det|> answers -> pixel boxes, tolerant of bad output."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mmstack.vision.grounding import Box, draw_boxes, grounding_prompt, parse_boxes, strip_grounding

README_ANSWER = "<|ref|>The giraffe at the back.<|/ref|><|det|>[[580, 270, 999, 900]]<|/det|>"


def xyxy(boxes):
    return [pytest.approx(b.xyxy) for b in boxes]


def test_prompt_matches_official_readme():
    assert grounding_prompt("The giraffe at the back.") == "<|ref|>The giraffe at the back.<|/ref|>."


def test_readme_answer_converts_exactly_to_pixels():
    (box,) = parse_boxes(README_ANSWER, 640, 480)
    assert box.label == "The giraffe at the back."
    assert box.xyxy == pytest.approx((580 * 640 / 999, 270 * 480 / 999, 640.0, 900 * 480 / 999))
    assert parse_boxes(README_ANSWER, 1998, 999)[0].xyxy == (1160.0, 270.0, 1998.0, 900.0)


def test_several_boxes_per_ref_and_several_refs():
    text = ("Find <|ref|>slices<|/ref|><|det|>[[0, 0, 999, 999], [333, 333, 666, 666]]<|/det|> and "
            "<|ref|>a knife<|/ref|><|det|>[[99.9, 0, 199.8, 999]]<|/det|>.")
    boxes = parse_boxes(text, 999, 999)
    assert [b.label for b in boxes] == ["slices", "slices", "a knife"]
    assert [b.xyxy for b in boxes] == [(0, 0, 999, 999), (333, 333, 666, 666), (99.9, 0, 199.8, 999)]


def test_det_without_ref_has_no_label():
    text = "<|det|>[[0, 0, 9, 9]]<|/det|> <|ref|>x<|/ref|><|det|>[[1,1,2,2]]<|/det|><|det|>[[3,3,4,4]]"
    boxes = parse_boxes(text, 999, 999)
    assert [b.label for b in boxes] == [None, "x", None]


@pytest.mark.parametrize("text, expected", [
    ("<|det|>[[1, 2, 3], [10, 20, 30, 40]]<|/det|>", [(10, 20, 30, 40)]),              # three numbers skipped
    ("<|det|>[[[10, 20, 30, 40]]]<|/det|>", [(10, 20, 30, 40)]),                         # nesting flattened
    ("<|det|>[[10, 20, 30, 40], [[50, 60, 70, 80]]]<|/det|>", [(10, 20, 30, 40), (50, 60, 70, 80)]),
    ("<|det|>[[10, 20, 99999999, 40]]<|/det|>", [(10, 20, 999, 40)]),                    # runaway digits clamped
    ("<|det|>[[10, 20, 30, 4" + "9" * 5000 + "]]", [(10, 20, 30, 999)]),                 # ... even past float range
    ("<|det|>[[-5, 20, 30, -40]]<|/det|>", [(0, 0, 30, 20)]),                           # negatives clamped, reordered
    ("<|det|>[[10.5, 20.25, 30, 40]]<|/det|>", [(10.5, 20.25, 30, 40)]),                 # floats
    ("<|det|>[[30, 40, 10, 20]]<|/det|>", [(10, 20, 30, 40)]),                           # swapped corners
    ("<|det|>[[10, 20, 30, 40]", [(10, 20, 30, 40)]),                                    # missing closing tag
    ("<|det|>[[10, 20, 30, 40], [50, 60", [(10, 20, 30, 40)]),                           # cut off mid-box
    ("<|det|>[[10, 20, 30, 40]] is here, see [1, 2, 3, 4]", [(10, 20, 30, 40)]),         # prose after it ignored
    ("<|det|>[10, 20, 30, 40]]]<|/det|>", [(10, 20, 30, 40)]),                           # unbalanced brackets
    ("<|det|>[[10, 20, 30, 40]<|/det|>", [(10, 20, 30, 40)]),
    ("<|det|>10, 20, 30, 40<|/det|>", [(10, 20, 30, 40)]),                               # no brackets at all
    ("<|det|>[[x=10, y=20, 30 px, 40]], [junk], [[]]<|/det|>", [(10, 20, 30, 40)]),      # junk inside
    ("<|det|><|/det|><|det|>[[]]<|/det|><|det|>", []),
    ("[10, 20, 30, 40] outside any det block", []),
    ("", []),
])
def test_malformed_answers(text, expected):
    assert xyxy(parse_boxes(text, 999, 999)) == expected


def test_missing_closing_ref_label_runs_to_next_tag():
    (box,) = parse_boxes("<|ref|>the dog <|det|>[[1, 2, 3, 4]]<|/det|>", 999, 999)
    assert box.label == "the dog"


def test_invalid_image_size_is_a_value_error():
    with pytest.raises(ValueError):
        parse_boxes(README_ANSWER, 0, 10)


def test_strip_grounding_keeps_labels_and_drops_coordinates():
    assert strip_grounding(README_ANSWER) == "The giraffe at the back."
    assert strip_grounding("<|grounding|>A <|ref|>cat<|/ref|><|det|>[[1,2,3,4]]<|/det|> naps.") == "A cat naps."
    assert strip_grounding("see <|ref|>it<|/ref|><|det|>[[1, 2, 3, 4]] then more") == "see it then more"
    assert strip_grounding("plain [1, 2] text") == "plain [1, 2] text"


_PIECES = st.sampled_from(["<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>", "<|", "|>",
                           "[", "]", "[[", "]]", ",", ", ", " ", "-", ".", "999", "99999999", "0", "label"])
_TAGGY = st.lists(_PIECES | st.integers(-10**6, 10**12).map(str) | st.text(max_size=3), max_size=60).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=st.text() | _TAGGY, width=st.integers(1, 5000), height=st.integers(1, 5000))
def test_parse_never_raises_and_boxes_stay_inside_the_image(text, width, height):
    for box in parse_boxes(text, width, height):
        assert 0 <= box.x1 <= box.x2 <= width and 0 <= box.y1 <= box.y2 <= height
    assert "<|det|>" not in strip_grounding(text)


def test_draw_boxes_returns_a_changed_copy_of_the_same_size():
    image = Image.new("RGB", (120, 80), (255, 255, 255))
    text = README_ANSWER + "<|ref|>淡定姐<|/ref|><|det|>[[0, 0, 300, 300]]<|/det|><|det|>[[5,5,9,9]]"
    boxes = parse_boxes(text, 120, 80)
    out = draw_boxes(image, boxes)
    assert out.size == image.size and out.mode == "RGB" and out is not image
    assert (np.asarray(out) != 255).any()
    assert (np.asarray(image) == 255).all()  # input untouched
    thin = np.asarray(draw_boxes(image, [Box("a", 10, 10, 50, 50)], width=1))
    assert (thin[30, 10] != 255).any() and (thin[30, 12] == 255).all()  # one-pixel outline, hollow inside

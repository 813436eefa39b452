"""`mmstack.apps.metrics`: hand-computed examples, and a shape/colour checker validated on synthetic ground truth."""
from __future__ import annotations

import itertools
import json
import random

import pytest
from PIL import Image, ImageFilter

from mmstack.apps import metrics as M
from mmstack.apps import synth


# ------------------------------------------------------------------------------------------ OCR


def test_levenshtein_and_exact_match_after_whitespace_normalisation():
    assert M.levenshtein("kitten", "sitting") == 3
    assert M.levenshtein("", "abc") == 3
    assert M.exact_match("  AB12\t CD \n", "AB12 CD")
    assert M.exact_match("AB\n\n CD", "AB\nCD")  # line breaks count, blank lines do not
    assert not M.exact_match("ab12", "AB12")
    assert M.exact_match("ab12", "AB12", case_sensitive=False)


def test_cer_is_edit_distance_over_reference_length():
    assert M.cer("abd", "abc") == pytest.approx(1 / 3)
    assert M.cer("abc", "abc") == 0.0
    assert M.cer("", "abcd") == 1.0
    assert M.cer("abcdef", "ab") == 2.0  # insertions can push CER above 1
    assert M.cer("", "") == 0.0 and M.cer("x", "") == 1.0


def test_anls_takes_the_best_reference_and_zeroes_below_the_threshold():
    assert M.anls("abcd", ["abcd"]) == 1.0
    assert M.anls("abcx", "abcd") == pytest.approx(0.75)
    assert M.anls("abxy", "abcd") == 0.0  # NL = 0.5 is not < tau
    assert M.anls("abxy", "abcd", tau=0.6) == pytest.approx(0.5)
    assert M.anls("ABCX", ["zzzz", "abcd"]) == pytest.approx(0.75)  # case-insensitive, max over refs
    assert M.anls("anything", []) == 0.0


# ------------------------------------------------------------------------------------------ charts


def test_relaxed_accuracy_accepts_five_percent_and_otherwise_needs_exact_strings():
    assert M.relaxed_accuracy(104, 100) and M.relaxed_accuracy("105", "100") and M.relaxed_accuracy(95.5, 100)
    assert not M.relaxed_accuracy(106, 100) and not M.relaxed_accuracy("94", 100)
    assert M.relaxed_accuracy("4.1%", 0.04) and M.relaxed_accuracy("1,000", 1020)
    assert M.relaxed_accuracy(" Yes ", "yes") and not M.relaxed_accuracy("yes", "no")
    assert M.relaxed_accuracy("0.0", 0) and not M.relaxed_accuracy(1, 0)
    assert M.relaxed_accuracy(10, 100, tol=0.95) and not M.relaxed_accuracy("ten", 10)


def test_table_triples_reads_title_header_and_rows():
    text = "Title: SALES\n| label | value |\n|---|---|\n| A | 42 |\n| B | 7 |"
    assert M.table_triples(text) == [("title", "", "SALES"), ("A", "value", "42"), ("B", "value", "7")]
    assert M.table_triples("label | x | y\nA | 1 | 2") == [("A", "x", "1"), ("A", "y", "2")]
    assert M.table_triples("no table here") == []


@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 3), (4, 4), (2, 5), (5, 2), (3, 4)])
def test_hungarian_assignment_finds_the_brute_force_optimum(rows, cols):
    rng = random.Random(rows * 10 + cols)
    for _ in range(30):
        cost = [[rng.choice([0, 0.5, 1, 2, 3.25, 7]) for _ in range(cols)] for _ in range(rows)]
        pairs = M.linear_sum_assignment(cost)
        assert len(pairs) == min(rows, cols)
        assert len({r for r, _ in pairs}) == len({c for _, c in pairs}) == len(pairs)
        if rows <= cols:
            best = min(sum(cost[i][p[i]] for i in range(rows)) for p in itertools.permutations(range(cols), rows))
        else:
            best = min(sum(cost[p[j]][j] for j in range(cols)) for p in itertools.permutations(range(rows), cols))
        assert sum(cost[r][c] for r, c in pairs) == pytest.approx(best)


REF = [("A", "value", "10"), ("B", "value", "20")]


def test_rms_f1_hand_computed_examples():
    assert M.rms_f1(REF, REF) == 1.0
    assert M.rms_f1(list(reversed(REF)), REF) == 1.0  # order-free
    # B off by 5% (< number_theta 0.1): that point scores 0.95 -> P = R = 1.95 / 2
    assert M.rms(REF[:1] + [("B", "value", "21")], REF) == pytest.approx((0.975, 0.975, 0.975))
    # B off by 50%: that point scores 0; P = R = 0.5
    assert M.rms_f1(REF[:1] + [("B", "value", "30")], REF) == pytest.approx(0.5)
    # plain relative error when number_theta = 1: 1 - 0.5 = 0.5 for B -> 1.5 / 2
    assert M.rms_f1(REF[:1] + [("B", "value", "30")], REF, number_theta=1.0) == pytest.approx(0.75)
    # a missing row: score 1, P = 1/1, R = 1/2, F1 = 2/3
    assert M.rms(REF[:1], REF) == pytest.approx((1.0, 0.5, 2 / 3))
    # a misspelt key ("a vaIue" vs "a value": 1 edit in 7) scales its point by 6/7
    assert M.rms_f1([("A", "vaIue", "10"), REF[1]], REF) == pytest.approx((6 / 7 + 1) / 2)
    assert M.rms_f1([], []) == 1.0 and M.rms_f1([], REF) == 0.0 and M.rms(REF, []) == (0.0, 1.0, 0.0)


def test_rms_reads_markdown_and_forgives_a_transposed_prediction():
    ref = "Title: COST\n| label | value |\n|---|---|\n| A | 10 |\n| B | 20 |"
    assert M.rms_f1(ref, ref) == 1.0
    transposed = [("value", "A", "10"), ("value", "B", "20"), ("title", "", "COST")]
    assert M.rms_f1(transposed, ref) == 1.0
    assert M.rms_f1(transposed, ref, transposed=False) < 1.0
    assert M.rms_f1(ref.replace("COST", "SPEED"), ref) == pytest.approx(2 / 3)  # title is one point of three


# ------------------------------------------------------------------------------------------ grounding, captions


def test_box_iou_of_known_boxes():
    assert M.box_iou([0, 0, 10, 10], [5, 5, 15, 15]) == pytest.approx(25 / 175)
    assert M.box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert M.box_iou([0, 0, 10, 10], [0, 0, 10, 5]) == pytest.approx(0.5)
    assert M.box_iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # touching
    assert M.box_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert M.box_iou([1, 1, 1, 1], [1, 1, 1, 1]) == 0.0  # empty union


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

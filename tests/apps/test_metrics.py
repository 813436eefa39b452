"""`mmstack.apps.metrics`: OCR, number and chart scores against hand-computed values, the bit-parallel edit
distance against the plain table, and the matching against brute force (scipy and the pure-Python Hungarian)."""
from __future__ import annotations

import itertools
import random
import sys

import pytest

from mmstack.apps import metrics as M

# ------------------------------------------------------------------------------------------ OCR


def _levenshtein_table(a, b):
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def test_bit_parallel_levenshtein_equals_the_dynamic_programming_table():
    assert M.levenshtein("kitten", "sitting") == 3 and M.levenshtein("", "abc") == 3
    assert M.levenshtein(["ab", "c"], ["ab", "d", "c"]) == 1  # any sequence of hashables
    rng = random.Random(0)
    for _ in range(500):
        a = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 15)))
        b = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 80)))  # > 64: several machine words
        assert M.levenshtein(a, b) == M.levenshtein(b, a) == _levenshtein_table(a, b)


def test_normalize_text_keeps_line_breaks_unless_asked_not_to():
    assert M.normalize_text("  a \t b \n\n  c ") == "a b\nc"
    assert M.normalize_text("  a \t b \n\n  c ", keep_lines=False) == "a b c"


def test_exact_match_after_whitespace_normalisation():
    assert M.exact_match("  AB12\t CD \n", "AB12 CD")
    assert M.exact_match("Total:  12 ", "Total: 12") and not M.exact_match("total: 12", "Total: 12")
    assert M.exact_match("AB\n\n CD", "AB\nCD")  # line breaks count, blank lines do not
    assert not M.exact_match("AB CD", "AB\nCD")
    assert not M.exact_match("ab12", "AB12")
    assert M.exact_match("ab12", "AB12", case_sensitive=False)
    assert M.exact_match("b", ["a", "b"]) and not M.exact_match("c", ["a", "b"]) and not M.exact_match("a", [])
    assert M.exact_match("12", 12)  # a manifest answer may be a number


def test_cer_is_edit_distance_over_reference_length():
    assert M.cer("abd", "abc") == pytest.approx(1 / 3)
    assert M.cer("kitten", "sitting") == pytest.approx(3 / 7)
    assert M.cer("abc", "abc") == 0.0
    assert M.cer("", "abcd") == 1.0
    assert M.cer("abcdef", "ab") == 2.0  # insertions can push CER above 1
    assert M.cer("", "") == 0.0 and M.cer("x", "") == 1.0
    assert M.cer("abd", ["xyz", "abc"]) == pytest.approx(1 / 3)  # the closest of several references


def test_anls_takes_the_best_reference_and_zeroes_below_the_threshold():
    assert M.anls("abcd", ["abcd"]) == 1.0 and M.anls("Hello", "hello") == 1.0
    assert M.anls("abcx", "abcd") == pytest.approx(0.75)
    assert M.anls("helo", ["xyz", "hello"]) == pytest.approx(1 - 1 / 5)
    assert M.anls("abxy", "abcd") == 0.0  # NL = 0.5 is not < tau
    assert M.anls("abc", "xyz") == 0.0
    assert M.anls("abxy", "abcd", tau=0.6) == pytest.approx(0.5)
    assert M.anls("ABCX", ["zzzz", "abcd"]) == pytest.approx(0.75)  # case-insensitive, max over refs
    assert M.anls("a\nb", "a b") == 1.0  # DocVQA collapses every whitespace run
    assert M.anls("anything", []) == 0.0


# ------------------------------------------------------------------------------------------ numbers


@pytest.mark.parametrize("cell,value", [("12", 12.0), ("-3.5", -3.5), ("1,234", 1234.0), ("45%", 45.0),
                                        ("$3.2", 3.2), ("-$5", -5.0), ("12 kg", 12.0), ("~7", 7.0),
                                        ("\u22121", -1.0), ("1.5e3", 1500.0), ("**8**", 8.0), (".5", 0.5),
                                        ("2019-2020", None), ("n/a", None), ("Year 2019", None), ("", None),
                                        ("1e999", None), ("--5", None), ("1,2", None), (None, None), (True, None),
                                        (7, 7.0), (float("nan"), None)])
def test_numbers_with_units_percent_and_commas(cell, value):
    assert M.to_number(cell) == value


def test_percent_read_as_a_fraction_on_request():
    assert M.to_number("4.5%", percent_as_fraction=True) == pytest.approx(0.045)
    assert M.to_number("45 %", percent_as_fraction=True) == pytest.approx(0.45)
    assert M.to_number("45 kg", percent_as_fraction=True) == 45.0


# ------------------------------------------------------------------------------------------ charts


def test_relaxed_accuracy_accepts_five_percent_and_otherwise_needs_exact_strings():
    assert M.relaxed_accuracy(104, 100) and M.relaxed_accuracy("105", "100") and M.relaxed_accuracy(95.5, 100)
    assert M.relaxed_accuracy("104.9", "100") and not M.relaxed_accuracy("105.1", "100")
    assert not M.relaxed_accuracy(106, 100) and not M.relaxed_accuracy("94", 100)
    assert M.relaxed_accuracy("4.1%", 0.04) and M.relaxed_accuracy("1,000", 1020)  # percent as in pix2struct
    assert M.relaxed_accuracy("$1,000", "1000 USD")
    assert M.relaxed_accuracy(" Yes ", "yes") and not M.relaxed_accuracy("yes", "no")
    assert M.relaxed_accuracy("0.0", 0) and M.relaxed_accuracy("0", "0")
    assert not M.relaxed_accuracy(1, 0) and not M.relaxed_accuracy("0.01", "0")
    assert M.relaxed_accuracy(10, 100, tol=0.95) and not M.relaxed_accuracy("ten", 10)


def test_table_relaxed_accuracy_per_cell_ignoring_a_lone_value_header_and_transposition():
    ref = [("2019", "Sales", 100.0), ("2020", "Sales", 200.0), ("2021", "Sales", 50.0), ("2022", "Sales", "n/a")]
    pred = [("2019", "value", 104.0), ("2020", "value", 215.0), ("2022", "value", "N/A")]  # 2021 missing
    assert M.table_relaxed_accuracy(pred, ref) == pytest.approx(2 / 4)  # one value column: header ignored
    two_cols = [("2019", "A", 1.0), ("2019", "B", 2.0)]
    assert M.table_relaxed_accuracy([("2019", "b", 2.0), ("2019", "a", 9.0)], two_cols) == pytest.approx(1 / 2)
    assert M.table_relaxed_accuracy([("A", "2019", 1.0), ("B", "2019", 2.0)], two_cols) == 1.0  # transposed
    assert M.table_relaxed_accuracy([], []) == 1.0 and M.table_relaxed_accuracy([("a", "b", 1.0)], []) == 0.0


def _brute_force(w, best):
    n, m = len(w), len(w[0])
    if n <= m:
        return best(sum(w[i][p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))
    return best(sum(w[p[j]][j] for j in range(m)) for p in itertools.permutations(range(n), m))


@pytest.mark.parametrize("use_scipy", [False, True], ids=["hungarian", "scipy"])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
def test_assignment_finds_the_brute_force_optimum(use_scipy, maximize):
    if use_scipy:
        pytest.importorskip("scipy")
    rng = random.Random(0)
    shapes = [(1, 1), (3, 3), (4, 4), (2, 5), (5, 2), (3, 4)] + [(rng.randint(1, 5), rng.randint(1, 5))
                                                                 for _ in range(40)]
    for rows, cols in shapes:
        for _ in range(5):  # repeated values make ties, the case an implementation gets wrong
            w = [[rng.choice([0.0, 0.5, 1.0, 2.0, 3.25, 7.0, rng.random()]) for _ in range(cols)] for _ in range(rows)]
            pairs = M.linear_sum_assignment(w, maximize=maximize, use_scipy=use_scipy)
            assert len(pairs) == min(rows, cols) and pairs == sorted(pairs)
            assert len({r for r, _ in pairs}) == len({c for _, c in pairs}) == len(pairs)
            assert sum(w[r][c] for r, c in pairs) == pytest.approx(_brute_force(w, max if maximize else min))
    assert M.linear_sum_assignment([]) == [] and M.linear_sum_assignment([[]]) == []


def test_hungarian_equals_scipy_on_larger_matrices():
    pytest.importorskip("scipy")
    rng = random.Random(1)
    for n, m in [(30, 30), (20, 45), (45, 20)]:
        w = [[rng.random() for _ in range(m)] for _ in range(n)]
        ours, ref = (M.linear_sum_assignment(w, use_scipy=s) for s in (False, True))
        assert sum(w[r][c] for r, c in ours) == pytest.approx(sum(w[r][c] for r, c in ref))


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
    # text values score their similarity: "red" vs "rad"
    assert M.rms_f1([("A", "colour", "rad")], [("A", "colour", "Red")]) == pytest.approx(2 / 3)
    assert M.rms_f1([], []) == 1.0 and M.rms_f1([], REF) == 0.0 and M.rms(REF, []) == (0.0, 1.0, 0.0)


def test_rms_with_number_values_and_a_transposed_prediction():
    ref = [("2019", "sales", 10.0), ("2020", "sales", 15.0)]
    assert M.rms_f1(ref, ref) == 1.0
    # 2019 exact (similarity 1); 2020: 12 vs 15 is 20% off > number_theta = 10% -> 0
    assert M.rms([("2019", "sales", 10.0), ("2020", "sales", 12.0)], ref) == pytest.approx((0.5, 0.5, 0.5))
    # 5% off: similarity 1 - 0.5/10.5; one prediction vs two references: P = s/1, R = s/2
    s = 1 - 0.5 / 10.5
    p, r, f = M.rms([("2019", "sales", 10.0)], [("2019", "sales", 10.5), ("2020", "sales", 99.0)])
    assert (p, r) == (pytest.approx(s), pytest.approx(s / 2)) and f == pytest.approx(2 * s * (s / 2) / (s + s / 2))
    # key typo "2019 sale" vs "2019 sales": normalized edit distance 1/10 -> key similarity 0.9
    assert M.rms_f1([("2019", "sale", 10.0)], [("2019", "sales", 10.0)]) == pytest.approx(0.9)
    assert M.rms_f1([("x", "y", 1.0)], [("2019", "sales", 10.0)]) == 0.0  # keys too different (> text_theta)
    transposed = [("sales", "2019", 10.0), ("sales", "2020", 15.0)]
    assert M.rms_f1(transposed, ref) == 1.0 and M.rms_f1(transposed, ref, transposed=False) == 0.0
    assert M.rms_f1([], []) == 1.0 and M.rms_f1([], ref) == 0.0


def test_rms_breaks_key_ties_by_value_whatever_the_solver(monkeypatch):
    """"a y" and "a z" are equally close to "a x" (DePlot matches keys only and leaves the tie to scipy's order);
    the matching takes the one whose value agrees, with or without scipy."""
    ref = [("a", "x", 10.0)]
    key = 2 / 3  # one edit in three characters
    expected = pytest.approx((key / 2, key, 2 * (key / 2) * key / (key / 2 + key)))
    preds = [[("a", "y", 99.0), ("a", "z", 10.0)], [("a", "z", 10.0), ("a", "y", 99.0)]]
    assert [M.rms(p, ref, transposed=False) for p in preds] == [expected, expected]
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # the import fails: the pure-Python Hungarian
    assert [M.rms(p, ref, transposed=False) for p in preds] == [expected, expected]


def test_rms_of_a_runaway_prediction_is_cheap_and_counts_every_entry():
    ref = [(f"r{i}", "v", float(i + 1)) for i in range(3)]
    pred = ref + [(f"junk {i}", "v", float(i)) for i in range(5000)]
    p, r, _ = M.rms(pred, ref)
    assert p == pytest.approx(3 / len(pred)) and r == 1.0


# ------------------------------------------------------------------------------------------ grounding, summary


def test_box_iou_of_known_boxes():
    assert M.box_iou([0, 0, 10, 10], [5, 5, 15, 15]) == pytest.approx(25 / 175)
    assert M.box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert M.box_iou([0, 0, 10, 10], [0, 0, 10, 5]) == pytest.approx(0.5)
    assert M.box_iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # touching
    assert M.box_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert M.box_iou([1, 1, 1, 1], [1, 1, 1, 1]) == 0.0  # empty union


def test_mean_of_scores_and_of_nothing():
    assert M.mean([True, False, 1.0, 0.0]) == 0.5 and M.mean(x for x in [2.0]) == 2.0 and M.mean([]) is None

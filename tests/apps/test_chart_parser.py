"""`mmstack.apps.chart`: reading tables out of noisy model answers, the table scorers (relaxed accuracy,
DePlot RMS-F1) against hand-computed values, and a chart job writing CSV / JSON tables."""
from __future__ import annotations

import csv
import io
import itertools
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mmstack.apps import batch
from mmstack.apps.batch_scores import (max_weight_matching, relaxed_match, rms_f1, rms_scores,
                                       table_relaxed_accuracy, to_number)
from mmstack.apps.chart import Table, chart, parse_table, table_from_answer

NOISY = {
    "markdown_with_prose": ("Sure! Here is the table:\n\n| Year | Sales | Profit |\n|:---|---:|---:|\n"
                            "| 2019 | $1,200 | 5% |\n| 2020 | $1,350.5 | 7.5% |\n\n"
                            "Let me know if you need anything else.",
                            ["Year", "Sales", "Profit"], {"Sales": {"2019": 1200.0, "2020": 1350.5},
                                                          "Profit": {"2019": 5.0, "2020": 7.5}}),
    "markdown_without_separator": ("| Fruit | Count |\n| Apple | 3 |\n| Pear | 4 |", ["Fruit", "Count"],
                                   {"Count": {"Apple": 3.0, "Pear": 4.0}}),
    "csv_with_unquoted_thousands": ("Here is the data, as CSV:\nYear,Sales\n2019,1,234\n2020,\"2,345\"\n"
                                    "Hope this helps, thanks.", ["Year", "Sales"],
                                    {"Sales": {"2019": 1234.0, "2020": 2345.0}}),
    "tsv_with_units": ("Month\tRain\tTemp\nJan\t12 mm\t-3 °C\nFeb\t9.5 mm\t\u22121 °C", ["Month", "Rain", "Temp"],
                       {"Rain": {"Jan": 12.0, "Feb": 9.5}, "Temp": {"Jan": -3.0, "Feb": -1.0}}),
    "label_value_lines": ("The chart shows these shares:\n- Apples: 10%\n- Pears: 20.5 %\n* Plums: 1,000\nThat is all.",
                          ["label", "value"], {"value": {"Apples": 10.0, "Pears": 20.5, "Plums": 1000.0}}),
    "deplot_linearised": ("TITLE | Revenue <0x0A> Year | A | B <0x0A> 2019 | 1 | 2 <0x0A> 2020 | 3 | n/a",
                          ["Year", "A", "B"], {"A": {"2019": 1.0, "2020": 3.0}, "B": {"2019": 2.0, "2020": None}}),
    "space_aligned_in_fence": ("```\nCity     Pop\nOslo     0.7\nBergen   0.29\n```", ["City", "Pop"],
                               {"Pop": {"Oslo": 0.7, "Bergen": 0.29}}),
    "headerless_csv": ("2019, 10\n2020, 12", ["label", "value"], {"value": {"2019": 10.0, "2020": 12.0}}),
}


@pytest.mark.parametrize("name", sorted(NOISY))
def test_parse_table_reads_noisy_answers(name):
    text, columns, series = NOISY[name]
    t = parse_table(text)
    assert t.columns == columns
    assert t.series() == series


def test_parse_table_reads_title_and_axis_labels():
    t = parse_table("**Title:** Fruit sold\nx-axis: Fruit\nY axis label: Count (units)\n\n"
                    "| Fruit | Count |\n|-|-|\n| Apple | 3 |")
    assert (t.title, t.x_label, t.y_label) == ("Fruit sold", "Fruit", "Count (units)")
    assert parse_table("## Sales by year\n| Year | Sales |\n|---|---|\n| 2019 | 1 |").title == "Sales by year"
    # "Title" as a column header is data, not metadata
    assert parse_table("| Title | Value |\n|---|---|\n| a | 1 |").columns == ["Title", "Value"]


@pytest.mark.parametrize("text", ["", "   \n\n", "I cannot read this chart.", "asdkj ;;; ||| ,,,", "one, two",
                                  "|||\n|---|", "\x00\x01\ufffd", "1, 2", "Title: only a title"])
def test_garbage_gives_an_empty_table(text):
    assert parse_table(text).is_empty() and parse_table(text).rows == []


def test_non_text_inputs_give_an_empty_table():
    assert parse_table(None).is_empty() and parse_table(b"\xff\xfe").is_empty() and parse_table(12).is_empty()


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.text(alphabet="|,\t:;-=*#`\n 0123456789.%$abcXY<>x", max_size=300)))
def test_parse_table_never_raises(text):
    t = parse_table(text)
    assert isinstance(t, Table)
    json.dumps(t.to_json(), allow_nan=False)  # always writable
    assert all(len(r) == len(t.columns) for r in t.rows)


@pytest.mark.parametrize("cell,value", [("12", 12.0), ("-3.5", -3.5), ("1,234", 1234.0), ("45%", 45.0),
                                        ("$3.2", 3.2), ("-$5", -5.0), ("12 kg", 12.0), ("~7", 7.0),
                                        ("\u22121", -1.0), ("1.5e3", 1500.0), ("**8**", 8.0), (".5", 0.5),
                                        ("2019-2020", None), ("n/a", None), ("Year 2019", None), ("", None),
                                        ("1e999", None), ("--5", None)])
def test_numbers_with_units_percent_and_commas(cell, value):
    assert to_number(cell) == value


def test_json_and_csv_round_trips_and_answers():
    t = parse_table(NOISY["markdown_with_prose"][0])
    t.title = "Sales"
    again = Table.from_json(json.loads(json.dumps(t.to_json())))
    assert again == t
    assert list(csv.reader(io.StringIO(t.to_csv()))) == [t.columns] + t.rows
    assert table_from_answer(t.to_csv()).series() == t.series()
    assert table_from_answer({"series": {"Sales": {"2019": 1200, "2020": 1350.5}}}).series() == \
        {"Sales": {"2019": 1200.0, "2020": 1350.5}}
    assert table_from_answer('[["Year", "Sales"], ["2019", 10]]').series() == {"Sales": {"2019": 10.0}}
    with pytest.raises(ValueError):
        Table.from_json({"nothing": 1})


# ------------------------------------------------------------------------------------------- scorers

def test_relaxed_accuracy_allows_five_percent():
    assert relaxed_match("104.9", "100") and not relaxed_match("105.1", "100")
    assert relaxed_match("0", "0") and not relaxed_match("0.01", "0") and relaxed_match(" Yes", "yes")
    target = [("2019", "Sales", 100.0), ("2020", "Sales", 200.0), ("2021", "Sales", 50.0), ("2022", "Sales", "n/a")]
    pred = [("2019", "value", 104.0), ("2020", "value", 215.0), ("2022", "value", "N/A")]  # 2021 missing
    assert table_relaxed_accuracy(pred, target) == pytest.approx(2 / 4)  # one value column: header ignored
    two_cols = [("2019", "A", 1.0), ("2019", "B", 2.0)]
    assert table_relaxed_accuracy([("2019", "b", 2.0), ("2019", "a", 9.0)], two_cols) == pytest.approx(1 / 2)
    assert table_relaxed_accuracy([("A", "2019", 1.0), ("B", "2019", 2.0)], two_cols) == 1.0  # transposed
    assert table_relaxed_accuracy([], []) == 1.0 and table_relaxed_accuracy([("a", "b", 1.0)], []) == 0.0


def test_rms_f1_matches_hand_computed_values():
    target = [("2019", "sales", 10.0), ("2020", "sales", 15.0)]
    assert rms_f1(target, target) == 1.0
    # 2019 exact (similarity 1); 2020: 12 vs 15 is 20% off > theta=10% -> 0; cross pairs also 0 by value
    assert rms_scores([("2019", "sales", 10.0), ("2020", "sales", 12.0)], target) == pytest.approx((0.5, 0.5, 0.5))
    # 5% off: similarity 1 - 0.5/10.5; one prediction vs two targets: P = s/1, R = s/2
    s = 1 - 0.5 / 10.5
    p, r, f = rms_scores([("2019", "sales", 10.0)], [("2019", "sales", 10.5), ("2020", "sales", 99.0)])
    assert (p, r) == (pytest.approx(s), pytest.approx(s / 2)) and f == pytest.approx(2 * s * (s / 2) / (s + s / 2))
    # key typo "2019 sale" vs "2019 sales": normalized edit distance 1/10 -> key similarity 0.9
    assert rms_f1([("2019", "sale", 10.0)], [("2019", "sales", 10.0)]) == pytest.approx(0.9)
    assert rms_f1([("x", "y", 1.0)], [("2019", "sales", 10.0)]) == 0.0  # keys too different (> tau)
    assert rms_f1([("sales", "2019", 10.0), ("sales", "2020", 15.0)], target) == 1.0  # transposed reading
    assert rms_f1([], []) == 1.0 and rms_f1([], target) == 0.0


@pytest.mark.parametrize("use_scipy", [False, True], ids=["hungarian", "scipy"])
def test_matching_is_optimal_against_brute_force(use_scipy):
    if use_scipy:
        pytest.importorskip("scipy")
    rng = random.Random(0)
    for _ in range(100):
        n, m = rng.randint(1, 5), rng.randint(1, 5)
        w = [[rng.choice([0.0, rng.random()]) for _ in range(m)] for _ in range(n)]
        pairs = max_weight_matching(w, use_scipy=use_scipy)
        assert len(pairs) == min(n, m) and len({i for i, _ in pairs}) == len({j for _, j in pairs}) == len(pairs)
        if n <= m:
            best = max(sum(w[i][p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))
        else:
            best = max(sum(w[p[j]][j] for j in range(m)) for p in itertools.permutations(range(n), m))
        assert sum(w[i][j] for i, j in pairs) == pytest.approx(best)


# ---------------------------------------------------------------------------------------------- job

def test_chart_job_writes_tables_results_and_scores(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGB", (30, 20), "red").save(imgs / "a.png")
    Image.new("RGB", (40, 10), "blue").save(imgs / "b.png")
    (imgs / "c.png").write_bytes(b"corrupt")
    man = tmp_path / "m.jsonl"
    rows = [{"id": "a/../chart 1", "image": "imgs/a.png",
             "answer": {"columns": ["Measure", "Pixels"], "rows": [["width", "30"], ["height", "20"], ["red", "255"]]}},
            {"id": "b", "image": "imgs/b.png", "answer": "Measure,Pixels\nwidth,40\nheight,11\nred,0"},
            {"id": "c", "image": "imgs/c.png", "answer": "Measure,Pixels\nwidth,1"}]
    man.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    s = chart([man], out, batch.fake_describe("table"), progress=False)
    assert (s.done, s.errors) == (2, 1)
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in recs] == ["a/../chart 1", "b", "c"]
    first = recs[0]
    assert first["table"]["title"] == "Size of image" and first["table"]["series"]["Pixels"]["width"] == 30.0
    assert (out / first["csv"]).read_text().splitlines()[0] == "Measure,Pixels"
    assert json.loads((out / first["json"]).read_text())["id"] == "a/../chart 1"
    assert all(p.parent == out / "tables" for p in out.rglob("*.csv"))
    assert recs[2]["table"] is None and recs[2]["error"].startswith("ImageError")
    # a: all 3 cells right; b: width and red (0 == 0) right, height 10 vs 11 is 9% off; c: errored -> empty
    assert s.scores["n"] == 3
    assert s.scores["relaxed_accuracy"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    b_rms = rms_f1(Table.from_json(recs[1]["table"]).triples(), table_from_answer(rows[1]["answer"]).triples())
    assert s.scores["rms_f1"] == pytest.approx((1 + b_rms + 0) / 3)

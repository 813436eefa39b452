"""`mmstack.apps.chart`: reading tables out of noisy model answers, the triples the scorers read from them, and a
chart job writing CSV / JSON tables (the scorers themselves are tested in test_metrics.py)."""
from __future__ import annotations

import csv
import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from fake_model import fake_describe
from mmstack.apps.chart import Table, chart, parse_table, table_from_answer, table_triples
from mmstack.apps.metrics import rms_f1

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


# ------------------------------------------------------------------------------------------- triples

def test_table_triples_reads_title_header_and_rows():
    text = "Title: SALES\n| label | value |\n|---|---|\n| A | 42 |\n| B | 7 |"
    assert table_triples(text) == [("title", "", "SALES"), ("A", "value", 42.0), ("B", "value", 7.0)]
    assert table_triples("label | x | y\nA | 1 | 2") == [("A", "x", 1.0), ("A", "y", 2.0)]
    assert table_triples("| k | v |\n|---|---|\n| A | n/a |\n| B |  |") == [("A", "v", "n/a")]  # empty cell: no point
    assert table_triples("no table here") == []
    assert parse_table(text).triples() == table_triples(text)[1:]  # the job's scores leave the title out


def test_rms_of_markdown_answers_forgives_a_transposed_prediction():
    ref = table_triples("Title: COST\n| label | value |\n|---|---|\n| A | 10 |\n| B | 20 |")
    assert rms_f1(ref, ref) == 1.0
    transposed = table_triples("TITLE | COST <0x0A> label | A | B <0x0A> value | 10 | 20")
    assert transposed == [("title", "", "COST"), ("value", "A", 10.0), ("value", "B", 20.0)]
    assert rms_f1(transposed, ref) == 1.0
    assert rms_f1(transposed, ref, transposed=False) < 1.0
    speed = table_triples("Title: SPEED\n| label | value |\n|---|---|\n| A | 10 |\n| B | 20 |")
    assert rms_f1(speed, ref) == pytest.approx(2 / 3)  # the title is one data point of three


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
    s = chart([man], out, fake_describe("table"), progress=False)
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

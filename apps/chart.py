"""`mmstack chart INPUT... --out DIR`: turn charts into data tables.

Per image, the model's answer is parsed (`parse_table`) into a `Table` written as `DIR/tables/<name>.csv`
and `.json` (title, axis labels, columns, rows, series -> values; `<name>` is `batch.safe_name(id)`), and
one line goes to `DIR/results.jsonl`: `{id, source, page, text, table, csv, json, seconds, error}`. With
answer tables in a manifest (a JSON table or CSV text), the summary scores relaxed accuracy (5%) and
DePlot's RMS-F1.

    parse_table("Sure!\\n| Year | Sales |\\n|---|---|\\n| 2019 | $1,200 |").series()
    # {'Sales': {'2019': 1200.0}}
"""
from __future__ import annotations

import csv
import io
import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from mmstack.io.atomic import atomic_write_text

from . import batch
from .metrics import Triple, mean, rms_f1, table_relaxed_accuracy, to_number

log = logging.getLogger(__name__)

DEFAULT_PROMPT = ("Convert this chart into a markdown data table. Give the title and the axis labels first, "
                  "then one row per category and one column per series.")
EMPTY = {"text": None, "table": None, "csv": None, "json": None}
MAX_TEXT = 200_000  # characters of an answer that are parsed


@dataclass
class Table:
    """A parsed chart table: `columns[0]` names the category column, the rest are series."""

    columns: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    title: str = ""
    x_label: str = ""
    y_label: str = ""

    def is_empty(self) -> bool:
        return not self.rows

    def series(self) -> dict[str, dict[str, Optional[float]]]:
        """Series name -> {category: number, or None for a cell that is not a number}."""
        return {name: {row[0]: to_number(row[j]) for row in self.rows}
                for j, name in enumerate(self.columns) if j > 0}

    def triples(self, title: bool = False) -> list[Triple]:
        """(category, series, value) for every non-empty value cell; numbers as floats (`to_number`), else the
        text. With `title`, a titled table starts with DePlot's data point ("title", "", title)."""
        out: list[Triple] = [("title", "", self.title)] if title and self.title else []
        for row in self.rows:
            for j in range(1, len(self.columns)):
                cell = row[j].strip()
                if cell:
                    num = to_number(cell)
                    out.append((row[0], self.columns[j], cell if num is None else num))
        return out

    def to_json(self) -> dict:
        return {"title": self.title, "x_label": self.x_label, "y_label": self.y_label, "columns": self.columns,
                "rows": self.rows, "series": self.series()}

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.columns)
        w.writerows(self.rows)
        return buf.getvalue()

    @classmethod
    def from_json(cls, obj) -> "Table":
        """From `to_json` output (`columns` + `rows`, or `series` alone) or a list of rows (header first)."""
        if isinstance(obj, list):
            rows = [[_cell(c) for c in r] for r in obj if isinstance(r, list)]
            return _shaped(rows[0], rows[1:]) if rows else cls()
        if not isinstance(obj, dict):
            raise ValueError(f"a JSON table is an object or a list of rows, got {type(obj).__name__}")
        meta = {k: str(obj.get(k) or "") for k in ("title", "x_label", "y_label")}
        if isinstance(obj.get("columns"), list) and isinstance(obj.get("rows"), list):
            t = _shaped([_cell(c) for c in obj["columns"]],
                        [[_cell(c) for c in r] for r in obj["rows"] if isinstance(r, list)])
        elif isinstance(obj.get("series"), dict):
            series = {str(k): v for k, v in obj["series"].items() if isinstance(v, dict)}
            cats = list(dict.fromkeys(str(c) for v in series.values() for c in v))
            rows = [[c] + [_cell(v.get(c)) for v in series.values()] for c in cats]
            t = cls([str(obj.get("x_label") or "")] + list(series), rows)
        else:
            raise ValueError("a JSON table needs 'columns' and 'rows', or 'series'")
        t.title, t.x_label, t.y_label = meta["title"], meta["x_label"], meta["y_label"]
        return t


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()


def _shaped(header: list[str], rows: list[list[str]]) -> Table:
    width = max([len(header)] + [len(r) for r in rows])
    header = header + [f"column {k + 1}" for k in range(len(header), width)]
    return Table(header, [r + [""] * (width - len(r)) for r in rows])


# ------------------------------------------------------------------------------------------ parsing

_META = [
    ("title", re.compile(r"^(?:chart |figure |graph |plot )?title\s*:\s*(.*)$", re.I)),
    ("x_label", re.compile(r"^(?:x[ _-]?axis(?:[ _-]?(?:label|title))?|x[ _-]?label|horizontal axis)\s*:\s*(.*)$",
                           re.I)),
    ("y_label", re.compile(r"^(?:y[ _-]?axis(?:[ _-]?(?:label|title))?|y[ _-]?label|vertical axis)\s*:\s*(.*)$",
                           re.I)),
]
_DEPLOT_TITLE = re.compile(r"^title\s*\|([^|]*)$", re.I)  # DePlot's first line: "TITLE | Sales per year"
_KV = re.compile(r"^(?:[-*•+]\s+|\d+[.)]\s+)?(?P<label>[^:=|\t]{1,80}?)\s*[:=]\s*(?P<value>[^:=|\t]{1,40})$")
_PRIORITY = ("pipe", "tab", "kv", "csv", "spaces")
_LEADING_GROUP = re.compile(r"[-+]?[$€£¥]?\d{1,3}(?:,\d{3})*")
_THOUSANDS_GROUP = re.compile(r"\d{3}(?:\.\d+)?%?")


_EMPHASIS = "*_`" + " \t\r\n\f\v\u00a0"
_SEPARATOR_CHARS = frozenset(" \t|:+=-")


def _strip(s: str) -> str:
    """Cell text without surrounding space and markdown emphasis (`**Sales**` -> `Sales`)."""
    return s.strip(_EMPHASIS)


def _is_separator(line: str) -> bool:
    return "-" in line and set(line) <= _SEPARATOR_CHARS  # |---|:--:| (no regex: no backtracking)


def _split(kind: str, line: str) -> Optional[list[str]]:
    """The cells of `line` read as `kind`, or None when the line is not of that kind."""
    s = line.strip()
    if kind == "pipe":
        if "|" not in s:
            return None
        inner = s[1:] if s.startswith("|") else s
        inner = inner[:-1] if inner.endswith("|") and not inner.endswith("\\|") else inner
        cells = [_strip(c.replace("\\|", "|")) for c in re.split(r"(?<!\\)\|", inner)]
        return cells if len(cells) >= 2 or s.startswith("|") else None
    if kind == "tab":
        cells = [_strip(c) for c in s.split("\t")]
        return cells if "\t" in s and sum(bool(c) for c in cells) >= 2 else None
    if kind == "csv":
        if "," not in s:
            return None
        cells = [_strip(c) for c in next(csv.reader([s], skipinitialspace=True), [])]
        return cells if len(cells) >= 2 else None
    if kind == "spaces":
        cells = [_strip(c) for c in re.split(r"\s{2,}", s)]
        return cells if len(cells) >= 2 else None
    m = _KV.match(_strip(s))  # "label: value" with a numeric value
    if m and to_number(m.group("value")) is not None:
        return [_strip(m.group("label")), _strip(m.group("value"))]
    return None


def _is_prose(line: str) -> bool:
    s = line.strip()
    return s.endswith(":") or (s[-1:] in ".!?" and len(s.split()) >= 4 and to_number(s.split()[-1]) is None)


def _merge_thousands(cells: list[str], width: int) -> list[str]:
    # "2019,1,234" read as CSV: rejoin "1" and "234" while the row is too wide.
    cells = list(cells)
    k = 1
    while len(cells) > width and k < len(cells):
        if _LEADING_GROUP.fullmatch(cells[k - 1]) and _THOUSANDS_GROUP.fullmatch(cells[k]):
            cells[k - 1:k + 1] = [cells[k - 1] + "," + cells[k]]
        else:
            k += 1
    return cells


def _blocks(lines: list[str], kind: str) -> list[list[Optional[list[str]]]]:
    """Runs of consecutive lines that split as `kind`, with prose trimmed from both ends; a markdown
    separator row is kept as None."""
    blocks, cur = [], []
    for line in lines + [""]:
        cells = _split(kind, line) if line.strip() else None
        if cells is not None and kind != "pipe" and not cur and _is_prose(line):
            cells = None  # "Here is the data, as a table:" is an introduction, not a header
        if cells is not None:
            cur.append((line, None if kind == "pipe" and _is_separator(line.strip()) else cells))
            continue
        while cur and kind != "pipe" and _is_prose(cur[-1][0]):
            cur.pop()  # "Let me know if you need more, thanks."
        if any(cells is not None for _, cells in cur):
            blocks.append([cells for _, cells in cur])
        cur = []
    return blocks


def _to_table(kind: str, block: list) -> Table:
    has_sep = any(r is None for r in block)
    rows = [r for r in block if r is not None]
    if kind == "kv" or not rows:
        return _shaped(["label", "value"], rows) if rows else Table()
    width = len(rows[0])
    if kind == "csv":
        rows = [_merge_thousands(r, width) for r in rows]
    header, body = rows[0], rows[1:]
    numeric = len(header) > 1 and all(to_number(c) is not None for c in header[1:])
    if numeric and not (kind == "pipe" and has_sep):  # no header row: name the columns
        header, body = (["label", "value"] if width == 2 else ["label"] + [f"value {k}" for k in range(1, width)]), rows
    body = [r for r in body if any(c for c in r)]
    return _shaped(header, body) if body else Table()


def _readings(lines: list[str]):
    for rank, kind in enumerate(_PRIORITY):
        for block in _blocks(lines, kind):
            t = _to_table(kind, block)
            # one headerless CSV-like row ("1, 2") is more likely prose than a table
            if not t.is_empty() and (kind in ("pipe", "kv") or len(t.rows) >= 2 or t.columns[0] != "label"):
                yield rank, t


def _numeric_cells(t: Table) -> int:
    return sum(1 for row in t.rows for c in row[1:] if to_number(c) is not None)


def parse_table(text) -> Table:
    """Read a data table from a model's answer; never raises (arbitrary text gives an empty `Table`).

    Understands markdown tables (with or without the `|---|` row or outer pipes, DePlot's `<0x0A>` line
    breaks), tab- and comma-separated lines (unquoted thousands like `1,234` rejoined), columns aligned
    by runs of spaces, and `label: value` lines; prose before and after is ignored; `Title:`, `x-axis:`,
    `y-axis:` lines (or a markdown heading) give the title and axis labels. Cells stay text in `rows`;
    `series()` reads numbers with units, percent signs and thousands separators.
    """
    try:
        return _parse(str(text)[:MAX_TEXT] if text is not None else "")
    except Exception:  # a parser bug must not kill a batch job; the table is just empty
        log.debug("parse_table failed", exc_info=True)
        return Table()


def _parse(text: str) -> Table:
    text = text.replace("<0x0A>", "\n").replace("\r\n", "\n").replace("\r", "\n")
    meta, lines, first = {}, [], True
    for line in text.split("\n"):
        s = _strip(line.strip())
        m = _DEPLOT_TITLE.match(s) if first and s else None
        first = first and not s
        if m:
            meta["title"] = _strip(m.group(1))
        elif line.strip().startswith("```"):
            pass
        elif re.match(r"^#{1,6}\s+\S", s) and "heading" not in meta:
            meta["heading"] = s.lstrip("#").strip()
        else:
            key, m = next(((k, pat.match(s)) for k, pat in _META if pat.match(s) and k not in meta), (None, None))
            if key is None:
                lines.append(line)
                continue
            meta[key] = _strip(m.group(1))
        lines.append("")  # a consumed line still ends a block
    # Every reading of every block competes; the one with the most numbers wins, then the most cells,
    # then the reading earlier in _PRIORITY ("Apples: 1,000" is a label-value line, not two CSV cells).
    candidates = [(_numeric_cells(t), len(t.rows) * len(t.columns), -rank, t) for rank, t in _readings(lines)]
    table = max(candidates, key=lambda c: c[:3])[3] if candidates else Table()
    table.title = meta.get("title") or meta.get("heading", "")
    table.x_label, table.y_label = meta.get("x_label", ""), meta.get("y_label", "")
    return table


def table_triples(text) -> list[Triple]:
    """A chart answer as DePlot's data points, the input of `metrics.rms`: `parse_table(text).triples(title=True)`.

    Examples:
        >>> table_triples("Title: SALES\\n| label | value |\\n|---|---|\\n| A | 42 |")
        [('title', '', 'SALES'), ('A', 'value', 42.0)]
    """
    return parse_table(text).triples(title=True)


def table_from_answer(answer) -> Table:
    """A ground-truth table from a manifest `answer`: a JSON table (object, list, or JSON text) or CSV /
    markdown text."""
    if isinstance(answer, (dict, list)):
        return Table.from_json(answer)
    text = str(answer)
    if text.lstrip()[:1] in "{[":
        try:
            return Table.from_json(json.loads(text))
        except ValueError:
            pass
    return parse_table(text)


def score_chart(pairs: list[tuple[dict, Any]]) -> dict:
    """Mean relaxed accuracy (5%) and RMS-F1 of predicted tables against answer tables; an errored or
    unparsable record counts as an empty table, an unreadable answer is left out."""
    scored = []
    for rec, answer in pairs:
        try:
            target = table_from_answer(answer)
        except ValueError as e:
            log.warning("%s: answer is not a table (%s); not scored", rec.get("id"), e)
            continue
        pred = Table.from_json(rec["table"]) if isinstance(rec.get("table"), dict) else Table()
        scored.append((pred.triples(), target.triples()))
    return {"n": len(scored), "relaxed_accuracy": mean(table_relaxed_accuracy(p, t) for p, t in scored),
            "rms_f1": mean(rms_f1(p, t) for p, t in scored)}


def chart_work(describe: batch.Describe, out_dir: Union[str, Path], prompt: str = DEFAULT_PROMPT) -> batch.Work:
    """The per-item work of a chart job: ask, parse, write `tables/<safe name>.csv` and `.json` under
    `out_dir`; returns the record fields (paths relative to `out_dir`)."""
    tables = Path(out_dir) / "tables"

    def work(item: batch.Item) -> dict:
        text = describe(item.load(), prompt)
        table = parse_table(text)
        if not table.rows or not table.series():
            raise batch.ItemError("the answer holds no table with values", {"text": text})
        name = batch.safe_name(item.id)
        tables.mkdir(parents=True, exist_ok=True)
        atomic_write_text(tables / f"{name}.csv", table.to_csv())
        doc = json.dumps({"id": item.id, **table.to_json()}, ensure_ascii=False, indent=1)
        atomic_write_text(tables / f"{name}.json", doc)
        return {"text": text, "table": table.to_json(), "csv": f"tables/{name}.csv", "json": f"tables/{name}.json"}

    return work


def chart(inputs: Sequence[Union[str, Path]], out_dir: Union[str, Path], describe: batch.Describe, *,
          prompt: str = DEFAULT_PROMPT, resume: bool = False, overwrite: bool = False, retry_errors: bool = False,
          shard: tuple[int, int] = (0, 1), progress: bool = True, pdf_dpi: float = 144.0,
          batch_size: int = 1) -> batch.Summary:
    """Run a chart job in Python (the CLI's behaviour with an injected `describe(image, prompt) -> str`);
    results go to `out_dir/results.jsonl` (per shard: `results.shard-I-of-N.jsonl`). `batch_size` items run
    at once (a thread each: give a thread-safe describe, e.g. a pipeline's)."""
    items = list(batch.iter_items(inputs, pdf_dpi=pdf_dpi))
    return batch.run(items, chart_work(describe, out_dir, prompt), Path(out_dir) / "results.jsonl", resume=resume,
                     overwrite=overwrite, retry_errors=retry_errors, shard=shard, empty=EMPTY, scorer=score_chart,
                     progress=progress, desc="chart", concurrency=batch_size)


def add_arguments(parser) -> None:
    batch.add_job_arguments(parser, out_help="output folder: results.jsonl and tables/", prompt=DEFAULT_PROMPT,
                            max_new_tokens=1024)


def main(args, describe: Optional[batch.Describe] = None) -> int:
    """`mmstack chart`: 0 when the job ran (item errors are in the output), 2 for usage errors.

    `describe` answers instead of the model of `--model` (see `batch.job_main`)."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"mmstack chart: error: --out {out} is a file; chart writes a folder", file=sys.stderr)
        return 2
    return batch.job_main(args, name="chart", results=out / "results.jsonl",
                          work_for=lambda d, prompt: chart_work(d, out, prompt), empty=EMPTY, scorer=score_chart,
                          describe=describe)


if __name__ == "__main__":
    sys.exit(batch.module_main("chart", add_arguments, main))

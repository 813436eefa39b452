"""What the demo's Documents tab shows besides the answer: the table in a chart answer (header and rows, for
the dataframe and the CSV download) and the page of an uploaded PDF as an image.

    parse_markdown_table("| Year | Sales |\\n|---|---|\\n| 2019 | 10 |")   # (['Year', 'Sales'], [['2019', '10']])
"""
from __future__ import annotations

import re

from .demo_gradio import gr


def parse_markdown_table(text: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the first `|`-separated table in `text`; ([], []) when there is none.

    Separator lines (`|---|:--:|`) are skipped; rows are padded or cut to the header's width.
    """
    lines = text.replace("<0x0A>", "\n").splitlines()  # DePlot-style answers spell newlines out
    rows: list[list[str]] = []
    for line in lines:
        if "|" not in line:
            if rows:
                break
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if all(re.fullmatch(r":?-+:?", c) or not c for c in cells):
            continue
        rows.append(cells)
    if not rows:
        return [], []
    header = rows[0]
    body = [(r + [""] * len(header))[: len(header)] for r in rows[1:]]
    return header, body


def chart_table(text: str) -> tuple[list[str], list[list[str]]]:
    """The chart answer as (header, rows): `mmstack.apps.chart.parse_table` when present, else our own parser."""
    try:
        from mmstack.apps.chart import parse_table
    except ImportError:
        return parse_markdown_table(text)
    table = parse_table(text)
    return list(table.columns), [list(r) for r in table.rows]


def unique_headers(names: list[str]) -> list[str]:
    """Dataframe headers must be unique and non-empty."""
    out: list[str] = []
    for i, n in enumerate(names):
        name = n or f"column {i + 1}"
        while name in out:
            name += "'"
        out.append(name)
    return out


def pdf_page(path: str, page: int):
    """One page (1-based) of a PDF as an RGB PIL image, rendered like the batch OCR does (144 dpi, capped)."""
    try:
        import pypdfium2
    except ImportError:
        raise gr.Error("Reading PDFs needs pypdfium2 (pip install pypdfium2); upload an image instead.") from None
    from .batch_inputs import PdfPage

    doc = pypdfium2.PdfDocument(path)
    count = len(doc)
    doc.close()
    if not 1 <= page <= count:
        raise gr.Error(f"Page {page} does not exist: this PDF has {count} page(s).")
    return PdfPage(path, page - 1).render()

"""Inputs of the batch jobs (`mmstack ocr`, `mmstack chart`): files, folders, glob patterns, PDFs (one item per
page, rendered on demand) and `.jsonl` / `.csv` manifests, expanded into `Item`s in a stable order.

    items = list(iter_items(["scans/", "invoices/*.pdf", "eval.jsonl"]))

Ids and paths read from inputs are data: they are never executed, and an unreadable input becomes an item
with its `error` set (one error line in the output) rather than a failed job.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MANIFEST_EXTENSIONS = frozenset({".jsonl", ".csv"})
PDF_MAX_PIXELS = 40_000_000  # a rendered page is scaled down to stay under this
class UsageError(ValueError):
    """A problem with the command line: missing inputs, an output that exists without --resume, ..."""


class MissingDependency(RuntimeError):
    """An optional package needed for these inputs is not installed."""


@dataclass(frozen=True)
class PdfPage:
    """One page of a PDF, rendered on demand (so shards and resumed runs never render pages they skip)."""

    path: str
    index: int  # 0-based
    dpi: float = 144.0

    def render(self):
        pdfium = _pdfium()
        doc = pdfium.PdfDocument(self.path)
        try:
            page = doc[self.index]
            w, h = page.get_size()  # points, 1/72 inch
            scale = self.dpi / 72.0
            scale = min(scale, math.sqrt(PDF_MAX_PIXELS / max(w * h, 1.0)))
            return page.render(scale=scale).to_pil().convert("RGB")
        finally:
            doc.close()


@dataclass
class Item:
    """One unit of work. `image` is a path, a PIL image, or a `PdfPage`; `load()` gives a path or PIL
    image that `Pipeline.describe` accepts. `error` is set when the input itself was unreadable."""

    id: str
    source: str
    page: Optional[int] = None  # 1-based PDF page
    image: Any = None
    answer: Any = None
    error: Optional[str] = None

    def load(self):
        return self.image.render() if isinstance(self.image, PdfPage) else self.image


def iter_items(inputs: Iterable[Union[str, os.PathLike]], pdf_dpi: float = 144.0) -> Iterator[Item]:
    """Expand files, folders (recursive, image files), glob patterns, PDFs (one item per page) and
    manifests (`.jsonl` / `.csv` with `id`, `image`, optional `answer`; image paths relative to the
    manifest) into items, in a stable order. Ids: the manifest id, else the path as given (plus
    `#page=N` for PDF pages). A repeated id is skipped with a warning.

    Raises:
        UsageError: an input matches nothing, or a CSV manifest has no `image` column.
        MissingDependency: a PDF is given and pypdfium2 is not installed.
    """
    seen: set[str] = set()
    for raw in inputs:
        for item in _expand(os.fspath(raw), pdf_dpi):
            if item.id in seen:
                log.warning("skipping %s from %s: the id was already seen", item.id, item.source)
                continue
            seen.add(item.id)
            yield item


_LONE_SURROGATE = re.compile("[\ud800-\udc7f\udd00-\udfff]")  # outside the surrogateescape range


def _clean(s: str) -> str:
    # File names that are not UTF-8 arrive as surrogate escapes, and JSON may spell a lone surrogate
    # ("\ud800"); ids must be writable as UTF-8 JSON: both become U+FFFD.
    s = _LONE_SURROGATE.sub("\ufffd", s)
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _path_id(p: str) -> str:
    return _clean(Path(os.path.normpath(p)).as_posix())


def _expand(raw: str, pdf_dpi: float) -> Iterator[Item]:
    if not os.path.exists(raw) and any(c in raw for c in "*?["):
        matches = sorted(glob.glob(raw, recursive=True))
        if not matches:
            raise UsageError(f"{raw}: no files match this pattern")
        for m in matches:
            yield from _expand_path(m, pdf_dpi, from_glob=True)
        return
    if not os.path.exists(raw):
        raise UsageError(f"{raw}: no such file or folder")
    yield from _expand_path(raw, pdf_dpi)


def _expand_path(p: str, pdf_dpi: float, from_glob: bool = False) -> Iterator[Item]:
    suffix = Path(p).suffix.lower()
    if os.path.isdir(p):
        found = False
        for f in _walk_images(p):
            found = True
            if f.lower().endswith(".pdf"):  # every page of a PDF inside the folder
                yield from _pdf_items(f, pdf_dpi)
            else:
                yield Item(id=_path_id(f), source=_clean(f), image=f)
        if not found:
            log.warning("%s: no image or PDF files (%s, .pdf) in this folder", p, ", ".join(sorted(IMAGE_EXTENSIONS)))
    elif suffix == ".pdf":
        yield from _pdf_items(p, pdf_dpi)
    elif suffix in MANIFEST_EXTENSIONS:
        yield from _manifest_items(p)
    elif from_glob and suffix not in IMAGE_EXTENSIONS:
        log.debug("glob match %s is not an image; skipped", p)
    else:  # a file named explicitly is tried as an image; an unreadable one becomes an error line
        yield Item(id=_path_id(p), source=_clean(p), image=p)


def _walk_images(root: str) -> Iterator[str]:
    """Image files and PDFs under `root`, recursively, in sorted order (hidden files and folders skipped)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            suffix = Path(name).suffix.lower()
            if not name.startswith(".") and (suffix in IMAGE_EXTENSIONS or suffix == ".pdf"):
                yield os.path.join(dirpath, name)


def _pdfium():
    try:
        import pypdfium2
    except ImportError as e:
        raise MissingDependency("reading PDFs needs pypdfium2: pip install pypdfium2") from e
    return pypdfium2


def _pdf_items(p: str, pdf_dpi: float) -> Iterator[Item]:
    pdfium = _pdfium()
    base = _path_id(p)
    try:
        doc = pdfium.PdfDocument(p)
        try:
            n = len(doc)
        finally:
            doc.close()
    except Exception as e:  # pdfium raises PdfiumError for damaged files; the run goes on
        yield Item(id=base, source=_clean(p), error=f"cannot read PDF: {type(e).__name__}: {e}")
        return
    for k in range(n):
        yield Item(id=f"{base}#page={k + 1}", source=_clean(p), page=k + 1, image=PdfPage(p, k, pdf_dpi))


def _manifest_items(p: str) -> Iterator[Item]:
    rows = _jsonl_rows(p) if p.lower().endswith(".jsonl") else _csv_rows(p)
    base, folder = _path_id(p), os.path.dirname(p)
    for line, row, error in rows:
        if error is None:
            image = row.get("image")
            if not isinstance(image, str) or not image.strip():
                error = "missing 'image'"
        if error is not None:
            yield Item(id=f"{base}:{line}", source=_clean(p), error=f"{base} line {line}: {error}")
            continue
        rid = row.get("id")
        rid = str(rid).strip() if rid is not None and not isinstance(rid, (dict, list)) else ""
        path = os.path.join(folder, image.strip())
        yield Item(id=_clean(rid) or _path_id(image.strip()), source=_clean(path), image=path,
                   answer=row.get("answer"))


MANIFEST_MAX_BYTES = 1 << 30  # a CSV manifest is read whole; a JSONL one streams (and may be larger)


def _regular(p: str, max_bytes: Optional[int] = None) -> None:
    """A manifest must be a regular file: a FIFO or a device behind the name would hang or never end."""
    from mmstack.io.files import UnsafeFileError, check_regular

    try:
        check_regular(p, "manifest", max_bytes)
    except UnsafeFileError as e:
        raise UsageError(str(e)) from None


def _jsonl_rows(p: str) -> Iterator[tuple[int, dict, Optional[str]]]:
    _regular(p)
    with open(p, "rb") as f:
        for line, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8").strip().lstrip("\ufeff")
            except UnicodeDecodeError:
                yield line, {}, "not valid UTF-8"
                continue
            if not text:
                continue
            try:
                row = json.loads(text)
            except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
                yield line, {}, f"not valid JSON ({type(e).__name__}: {str(e)[:200]})"
                continue
            yield (line, row, None) if isinstance(row, dict) else (line, {}, "not a JSON object")


_BAD_UTF8 = re.compile("[\udc80-\udcff]")


def _csv_rows(p: str) -> Iterator[tuple[int, dict, Optional[str]]]:
    # Decoded with surrogate escapes so one bad record (quoted answers may span lines) is reported alone.
    _regular(p, MANIFEST_MAX_BYTES)
    text = Path(p).read_bytes().decode("utf-8", "surrogateescape").lstrip("\ufeff")
    # No field can be longer than the file: lift csv's 128 KiB default so a long answer is not "malformed"
    # (which would skip the rest of the manifest). The limit is process-wide; it only ever grows here.
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))
    reader = csv.DictReader(io.StringIO(text, newline=""))
    fields = [(f or "").strip() for f in (reader.fieldnames or [])]
    if "image" not in fields:
        raise UsageError(f"{p}: a CSV manifest needs a header row with an 'image' column (and 'id', 'answer')")
    reader.fieldnames = fields
    try:
        for row in reader:
            values = [v for v in row.values() if isinstance(v, str)]
            if any(_BAD_UTF8.search(v) for v in values):
                yield reader.line_num, {}, "not valid UTF-8"
            else:
                # an empty answer cell means "no answer", not "the answer is empty"
                kept = {k: v for k, v in row.items() if k in ("id", "image", "answer") and v != ""}
                yield reader.line_num, kept, None
    except csv.Error as e:  # the reader cannot resynchronise; report and stop reading this manifest
        yield reader.line_num, {}, f"malformed CSV, rest of the manifest skipped ({e})"

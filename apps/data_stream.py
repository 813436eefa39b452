"""Training data files read as a stream of records, never whole: JSONL line by line, and a JSON array (LLaVA
format) item by item with the standard library's `json.JSONDecoder.raw_decode` over a bounded text buffer.
Memory stays at about one record plus one read chunk, whatever the file size.

    for n, obj in records(Path("llava_665k.json")):   # n: JSONL line / 1-based item of a JSON array
        ...                                            # obj: the parsed record, or a DataError for that n

A record that is not valid UTF-8 JSON, or longer than `RECORD_MAX_CHARS`, is a `DataError` yielded at its number
(JSONL: the line, which does not stop the file; JSON array: the item, and when its JSON is broken the rest of the
array cannot be located, so the file ends there; invalid UTF-8 inside an item refuses that item only). A JSON file
that is a single object (not an array) is one record, parsed whole within `JSON_MAX_BYTES` (the record limit).
"""
from __future__ import annotations

import codecs
import json
import re
from pathlib import Path
from typing import BinaryIO, Iterator

RECORD_MAX_CHARS = 1 << 26  # one record: a JSONL line (bytes) or a JSON array item (a broken one is not read to the end)
JSON_MAX_BYTES = RECORD_MAX_CHARS  # a .json file that is one object (one record, not an array) is parsed whole
CHUNK = 1 << 16  # bytes read at a time from a JSON array
_WS = " \t\n\r"
_INVALID = re.compile("[\udc80-\udcff]")  # what `surrogateescape` makes of bytes that are not UTF-8


class DataError(ValueError):
    """Bad training data; the message lists `file:line: problem` entries."""


def records(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed object) for JSONL, or (1-based index, item) for a JSON array / object; a record
    that does not parse is yielded as a `DataError` in place of the object.

    Raises:
        DataError: the path is not a regular file (a FIFO or a device would hang or never end).
    """
    from mmstack.io.files import UnsafeFileError, check_regular

    try:
        check_regular(path, "data file", None)
    except UnsafeFileError as e:
        raise DataError(str(e)) from None
    with open(path, "rb") as f:
        yield from (_jsonl(f) if path.suffix == ".jsonl" else _json(f))


def _jsonl(f: BinaryIO) -> Iterator[tuple[int, object]]:
    n = 0
    while True:
        raw = f.readline(RECORD_MAX_CHARS + 1)  # a line is read whole only up to the record limit
        if not raw:
            return
        n += 1
        if len(raw) > RECORD_MAX_CHARS and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):  # the rest of the line, a chunk at a time
                raw = f.readline(CHUNK)
            yield n, DataError(f"a line over {RECORD_MAX_CHARS} bytes (one record is at most that)")
            continue
        if not raw.strip():
            continue
        try:
            yield n, json.loads(raw.decode("utf-8-sig" if n == 1 else "utf-8"))  # a BOM may open the file
        except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: absurd nesting
            yield n, DataError(f"not valid UTF-8 JSON ({type(e).__name__})")


class _Text:
    """The decoded text of a binary file, read on demand: `more()` appends the next chunk, `drop(i)` forgets
    `buf[:i]`. Each read at least doubles what a stalled parse can see, so an item of any size is parsed a
    logarithmic number of times."""

    def __init__(self, f: BinaryIO):
        self.f, self.buf, self.eof = f, "", False
        # invalid bytes become lone surrogates (U+DC80..U+DCFF, which JSON text cannot hold raw): the item holding
        # them is refused on its own and the items around it still parse
        self.dec = codecs.getincrementaldecoder("utf-8")("surrogateescape")

    def more(self) -> bool:
        if self.eof:
            return False
        raw = self.f.read(max(CHUNK, len(self.buf)))  # doubles the text a stalled parse sees
        self.buf += self.dec.decode(raw, final=not raw)
        self.eof = not raw
        return True

    def skip_ws(self, i: int) -> int:
        """The index of the first non-whitespace character at or after i (len(buf) at the end of the file)."""
        while True:
            while i < len(self.buf) and self.buf[i] in _WS:
                i += 1
            if i < len(self.buf) or not self.more():
                return i

    def drop(self, i: int) -> int:
        self.buf = self.buf[i:]
        return 0


def _json(f: BinaryIO) -> Iterator[tuple[int, object]]:
    decoder = json.JSONDecoder()
    text = _Text(f)
    n = 0  # the item being read
    try:
        text.more()
        if text.buf.startswith("\ufeff"):  # a byte-order mark (editors on Windows write one)
            text.drop(1)
        i = text.skip_ws(0)
        if i >= len(text.buf):
            raise ValueError("an empty file")
        if text.buf[i] != "[":  # one object: parsed whole, as before
            f.seek(0)
            whole = f.read(JSON_MAX_BYTES + 1)
            if len(whole) > JSON_MAX_BYTES:
                yield 1, DataError(f"a JSON object over {JSON_MAX_BYTES} bytes (write one record per line: .jsonl)")
                return
            yield 1, json.loads(whole.decode("utf-8-sig"))
            return
        i = text.skip_ws(i + 1)
        while i < len(text.buf) and text.buf[i] != "]":
            n += 1
            if i >= CHUNK:  # forget what was read, now and then (not per item: that copies the buffer each time)
                i = text.drop(i)
            start = i
            obj, i = _one(decoder, text, i)
            if _INVALID.search(text.buf, start, i):
                obj = DataError("not valid UTF-8 JSON (UnicodeDecodeError: invalid bytes in this item)")
            yield n, obj
            i = text.skip_ws(i)
            if i < len(text.buf) and text.buf[i] == ",":
                i = text.skip_ws(i + 1)
            elif i < len(text.buf) and text.buf[i] != "]":
                raise ValueError("expected ',' or ']' after an item")
        if i >= len(text.buf):
            raise ValueError("the array is not closed")
        if text.skip_ws(i + 1) < len(text.buf):
            raise ValueError("extra data after the array")
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        yield max(1, n), DataError(f"not valid UTF-8 JSON ({type(e).__name__}: {str(e)[:200]})")


def _one(decoder: json.JSONDecoder, text: _Text, i: int) -> tuple[object, int]:
    """Decode the value at `buf[i]`, reading more while it is cut off by the buffer's end; returns (value, end).
    A value is complete once a character follows it (a number or literal could otherwise go on)."""
    while True:
        try:
            obj, end = decoder.raw_decode(text.buf, i)
        except ValueError:
            if len(text.buf) - i <= RECORD_MAX_CHARS and text.more():
                continue
            raise
        if end < len(text.buf) or not text.more():
            return obj, end

"""Training data read as a stream: large JSONL and LLaVA JSON files in bounded memory, with the same `file:line`
problems as before (`mmstack.apps.data_stream`)."""
from __future__ import annotations

import json
import tracemalloc

import pytest

from mmstack.apps import data_stream
from mmstack.apps.data import DataError, iter_examples, load_examples


def _record(i: int) -> dict:
    return {"id": f"r{i}", "conversations": [{"from": "human", "value": f"Question {i}: " + "why? " * 40},
                                             {"from": "gpt", "value": f"Answer {i} " + "because. " * 40}]}


def _write_llava(path, n: int, pretty: bool = False, bad_at: int = 0) -> None:
    """A LLaVA JSON array of n records written item by item (the test never holds the file either)."""
    with open(path, "w") as f:
        f.write("[\n")
        for i in range(1, n + 1):
            rec = json.dumps(_record(i), indent=2 if pretty else None)
            if i == bad_at:
                rec = rec[:-1] + ', "oops": }'  # invalid JSON inside item i
            f.write(rec + (",\n" if i < n else "\n"))
        f.write("]\n")


def _peak_while_streaming(path) -> tuple[int, int]:
    """(records seen, peak traced bytes) while validating every record of `path` without keeping any."""
    tracemalloc.start()
    try:
        count = sum(1 for ex, issues in iter_examples(path, check_images=False) if ex is not None)
        return count, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_large_file_streams_in_memory_far_below_its_size(tmp_path, suffix):
    path = tmp_path / f"big{suffix}"
    n = 12_000
    if suffix == ".json":
        _write_llava(path, n, pretty=True)
    else:
        path.write_text("".join(json.dumps(_record(i)) + "\n" for i in range(1, n + 1)))
    size = path.stat().st_size
    assert size > 8_000_000
    count, peak = _peak_while_streaming(path)
    assert count == n
    # one record and a read buffer (a few 64 KiB chunks), not the file: a whole-file parse peaks above its size
    assert peak < size / 10, (peak, size)


def test_streaming_a_json_array_gives_the_records_of_a_whole_parse(tmp_path):
    path = tmp_path / "d.json"
    # items larger than a read chunk, numbers and literals cut by chunk ends, multi-byte UTF-8 across chunks
    items = [_record(1), {"x": "é" * (data_stream.CHUNK + 7)}, 12345678901234567890, True, None, [1, [2, {}]],
             "ü" * 3, {"y": [1.5e300] * 5000}, _record(2)]
    for text in (json.dumps(items), json.dumps(items, indent=3), json.dumps(items, ensure_ascii=False)):
        path.write_text(text, encoding="utf-8")
        assert [obj for _, obj in data_stream.records(path)] == items
        assert [n for n, _ in data_stream.records(path)] == list(range(1, len(items) + 1))


def test_errors_in_a_large_llava_file_name_the_file_and_item(tmp_path):
    path = tmp_path / "big.json"
    _write_llava(path, 3000, bad_at=2500)
    with pytest.raises(DataError) as e:
        load_examples(path, check_images=False)
    assert f"{path}:2500: not valid UTF-8 JSON" in str(e.value)
    good, bad = load_examples(path, skip_bad=True, check_images=False)
    assert len(good) == 2499 and len(bad) == 1 and bad[0].startswith(f"{path}:2500: ")


def test_errors_in_a_large_jsonl_file_name_the_file_and_line(tmp_path):
    path = tmp_path / "big.jsonl"
    lines = [json.dumps(_record(i)) for i in range(1, 3001)]
    lines[1999] = "{broken"
    lines[2499] = json.dumps({"messages": [{"role": "robot", "content": "hi"}]})
    path.write_text("\n".join(lines) + "\n")
    good, bad = load_examples(path, skip_bad=True, check_images=False)
    assert len(good) == 2998
    assert bad[0].startswith(f"{path}:2000: not valid UTF-8 JSON")
    assert bad[1] == f"{path}:2500: unknown role 'robot'"


@pytest.mark.parametrize("text, where, problem", [
    ("", 1, "empty file"),
    ("[" + json.dumps(_record(1)), 1, "not closed"),
    ("[" + json.dumps(_record(1)) + " " + json.dumps(_record(2)) + "]", 1, "expected ','"),
    ("[" + json.dumps(_record(1)) + "] junk", 1, "extra data"),
    ("[1, 2, ", 2, "not closed"),
], ids=["empty", "unclosed", "no-comma", "trailing-junk", "trailing-comma"])
def test_a_malformed_array_is_a_problem_of_its_item(tmp_path, text, where, problem):
    path = tmp_path / "d.json"
    path.write_text(text)
    _, bad = load_examples(path, skip_bad=True, check_images=False)
    assert any(b.startswith(f"{path}:{where}: not valid UTF-8 JSON") and problem in b for b in bad), bad


def test_invalid_utf8_in_a_json_array_is_a_problem_not_a_crash(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b'[{"id": "a", "conversations": []}, {"id": "\xff"}]')
    _, bad = load_examples(path, skip_bad=True, check_images=False)
    assert any("UnicodeDecodeError" in b for b in bad)


def test_a_broken_item_in_a_huge_array_is_not_read_to_the_end_of_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(data_stream, "RECORD_MAX_CHARS", 1 << 18)
    path = tmp_path / "d.json"
    with open(path, "w") as f:
        f.write('[{"id": "x", "value": "unterminated')
        for _ in range(200):
            f.write("a" * 50_000)
    tracemalloc.start()
    try:
        _, bad = load_examples(path, skip_bad=True, check_images=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert bad[0].startswith(f"{path}:1: not valid UTF-8 JSON")
    assert peak < path.stat().st_size / 4


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
@pytest.mark.parametrize("shape", ["array", "object"])
def test_a_byte_order_mark_opening_the_file_is_not_an_error(tmp_path, suffix, shape):
    """Editors on Windows open UTF-8 files with a BOM; the records read as without it."""
    recs = [{"id": str(i), "text": f"r{i}"} for i in range(3)]
    if suffix == ".jsonl":
        body = "".join(json.dumps(r) + "\n" for r in recs) if shape == "array" else json.dumps(recs[0]) + "\n"
    else:
        body = json.dumps(recs if shape == "array" else recs[0])
    plain, bom = tmp_path / f"plain{suffix}", tmp_path / f"bom{suffix}"
    plain.write_bytes(body.encode())
    bom.write_bytes(b"\xef\xbb\xbf" + body.encode())
    want = list(data_stream.records(plain))
    assert list(data_stream.records(bom)) == want and all(not isinstance(r, Exception) for _, r in want)

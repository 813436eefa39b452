"""Streamed training data (round 3 of the adversarial cases, docs/limits.md): a JSONL line is read whole only up to
the record limit, so one endless line costs a bounded read and becomes a `file:line` problem of its own; a data path
that is a FIFO, a device or a folder is refused naming what it is."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from mmstack.apps import data_stream
from mmstack.apps.data import DataError, load_examples

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def test_a_line_over_the_record_limit_is_a_problem_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr(data_stream, "RECORD_MAX_CHARS", 1000)
    path = tmp_path / "d.jsonl"
    line = json.dumps(GOOD) + "\n"
    long = json.dumps({**GOOD, "pad": "x" * 5000}) + "\n"
    path.write_text(line + long + line + "y" * 3000)  # the last line has no newline either
    good, bad = load_examples(path, skip_bad=True, check_images=False)
    assert len(good) == 2 and [b.split(": ", 1)[0] for b in bad] == [f"{path}:2", f"{path}:4"]
    assert all("a line over 1000 bytes" in b for b in bad)


def test_an_endless_line_is_read_in_bounded_memory(tmp_path):
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as f:  # 160 MiB without a newline, then one good record
        f.write(b'{"messages": "')
        for _ in range(160):
            f.write(b"a" * (1 << 20))
        f.write(b'"}\n' + json.dumps(GOOD).encode() + b"\n")
    code = textwrap.dedent(f"""
        import resource
        from mmstack.apps.data import load_examples
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        good, bad = load_examples({str(path)!r}, skip_bad=True, check_images=False)
        assert len(good) == 1 and "a line over" in bad[0], bad
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    grown = int(out.stdout.split()[-1])  # MiB above the imports' peak
    assert grown < 200, f"peak RSS grew {grown} MiB reading a 160 MiB line (record limit 64 MiB)"


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_a_data_path_that_is_not_a_regular_file_is_named_for_what_it_is(tmp_path, kind):
    path = tmp_path / "d.jsonl"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    words = {"fifo": "is a FIFO", "device": "is a device", "folder": "is a directory"}[kind]
    with pytest.raises(DataError, match=rf"{path}: this data file {words}, not a regular file"):
        load_examples(path, check_images=False)


def test_invalid_utf8_in_one_array_item_loses_that_item_only(tmp_path):
    path = tmp_path / "d.json"
    good = json.dumps(GOOD).encode()
    path.write_bytes(b"[" + good + b', {"messages": "\xff\xfe"}, ' + good + b"]")
    good_items, bad = load_examples(path, skip_bad=True, check_images=False)
    assert len(good_items) == 2
    assert bad == [f"{path}:2: not valid UTF-8 JSON (UnicodeDecodeError: invalid bytes in this item)"]


def test_a_json_file_of_one_object_is_held_to_the_record_limit(tmp_path, monkeypatch):
    assert data_stream.JSON_MAX_BYTES == data_stream.RECORD_MAX_CHARS  # 64 MiB, not 1 GiB (a 300 MB object took +600 MB)
    monkeypatch.setattr(data_stream, "JSON_MAX_BYTES", 1000)
    path = tmp_path / "one.json"
    path.write_text(json.dumps({**GOOD, "pad": "x" * 5000}))
    good, bad = load_examples(path, skip_bad=True, check_images=False)
    assert not good and bad == [f"{path}:1: a JSON object over 1000 bytes (write one record per line: .jsonl)"]

"""Manifests and data files are data: ids never name a path (a chart id `../../evil` writes inside --out like
any other), image paths are opened as given and never reach a shell, and non-UTF-8 records, absurdly deep
JSON and very long lines and fields become error lines for themselves alone, the rest of the job going on."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mmstack.apps.data import DataError, load_examples

HOSTILE_IDS = ["../../evil", "../../../../../../tmp/evil", "/tmp/evil-absolute", "..", ".", "", "a/../../b",
               "..\\..\\evil", "evil\x00.png", "x" * 10_000, "\u202egnp.live", "$(touch pwned-id)", "a\nb", "\ud800"]
SHELL_PATHS = ["$(touch pwned-1).png", "`touch pwned-2`.png", "a.png; touch pwned-3", "| touch pwned-4",
               "&& touch pwned-5"]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


FAKE_JOB = Path(__file__).resolve().parents[1] / "apps" / "fake_job.py"  # `mmstack chart` with the stand-in model


def _chart(cwd: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(FAKE_JOB), "chart", *map(str, args), "--fake-model", "table",
                           "--no-progress"], cwd=cwd, capture_output=True, text=True, timeout=120)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_chart_ids_and_image_paths_from_a_manifest_are_data(tmp_path):
    work = tmp_path / "a" / "b"  # deep enough that an escaping write would land inside tmp_path
    work.mkdir(parents=True)
    Image.new("RGB", (12, 8), "red").save(work / "ok.png")
    rows = [{"id": i, "image": "ok.png"} for i in HOSTILE_IDS] + [{"id": f"shell{k}", "image": p}
                                                                  for k, p in enumerate(SHELL_PATHS)]
    (work / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    before, outside = _tree(tmp_path), {p: p.exists() for p in (Path("/tmp/evil"), Path("/tmp/evil-absolute"))}
    done = _chart(work, "manifest.jsonl", "--out", "out")
    assert done.returncode == 0, done.stderr
    created = _tree(tmp_path) - before
    assert created and all(p.startswith("a/b/out") for p in created), sorted(created)[:5]
    assert {p: p.exists() for p in outside} == outside
    assert not list(work.glob("pwned*")) and not list(Path.cwd().glob("pwned*"))
    records = _records(work / "out" / "results.jsonl")
    ids = [r["id"] for r in records]
    assert len(set(ids)) == len(ids)  # distinct hostile ids stay distinct records ("." and "" included)
    tables = (work / "out" / "tables").resolve()
    for r in records:
        if r["error"] is None:  # its two files sit directly in tables/
            assert all((work / "out" / r[k]).resolve().parent == tables for k in ("csv", "json"))
    by_id = {r["id"]: r for r in records}
    assert all(by_id[f"shell{k}"]["error"].startswith("ImageError") for k in range(len(SHELL_PATHS)))


def test_non_utf8_deep_and_very_long_manifest_lines_fail_alone(tmp_path):
    Image.new("RGB", (10, 6), "blue").save(tmp_path / "ok.png")
    long_answer = "7" * 5_000_000
    lines = [json.dumps({"id": "first", "image": "ok.png"}).encode(),
             b'{"id": "latin1 \xe9\xe8", "image": "ok.png"}',
             b"[" * 200_000,
             json.dumps({"id": "long", "image": "ok.png", "answer": long_answer}).encode(),
             json.dumps({"id": "long-path", "image": "d/" * 5000 + "x.png"}).encode(),
             b"\xff\xfe\x00garbage",
             json.dumps({"id": "last", "image": "ok.png"}).encode()]
    (tmp_path / "m.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    done = _chart(tmp_path, "m.jsonl", "--out", "out")
    assert done.returncode == 0, done.stderr
    records = {r["id"]: r for r in _records(tmp_path / "out" / "results.jsonl")}
    assert {k for k, r in records.items() if r["error"] is None} == {"first", "long", "last"}
    errors = {k: r["error"] for k, r in records.items() if r["error"]}
    assert "not valid UTF-8" in errors["m.jsonl:2"] and "not valid UTF-8" in errors["m.jsonl:6"]
    assert "not valid JSON" in errors["m.jsonl:3"] and "ImageError" in errors["long-path"]


def test_csv_manifest_with_a_huge_field_and_a_non_utf8_record_keeps_the_rest(tmp_path):
    Image.new("RGB", (10, 6), "green").save(tmp_path / "ok.png")
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerows([["id", "image", "answer"], ["a", "ok.png", "1"], ["huge", "ok.png", "x" * 1_000_000]])
    body = buf.getvalue().encode() + b"latin,ok.png,\xe9\r\n" + b"z,ok.png,2\r\n"
    (tmp_path / "m.csv").write_bytes(body)
    done = _chart(tmp_path, "m.csv", "--out", "out")
    assert done.returncode == 0, done.stderr
    records = {r["id"]: r for r in _records(tmp_path / "out" / "results.jsonl")}
    assert {k for k, r in records.items() if r["error"] is None} == {"a", "huge", "z"}
    assert [r["error"] for k, r in records.items() if r["error"]] == ["m.csv line 4: not valid UTF-8"]


def test_training_data_with_hostile_paths_and_lines_is_reported_by_file_and_line(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    turn = [{"role": "user", "content": "<image>\nHi"}, {"role": "assistant", "content": "Hello."}]
    lines = [json.dumps({"messages": turn, "images": ["ok.png"]}).encode(),
             json.dumps({"messages": turn, "images": ["$(touch pwned).png"]}).encode(),
             json.dumps({"messages": turn, "images": ["x\x00y.png"]}).encode(),
             json.dumps({"messages": turn, "images": ["d/" * 5000 + "a.png"]}).encode(),
             b"\xff not utf-8", b"[" * 100_000, json.dumps({"messages": "hi", "images": 3}).encode(),
             json.dumps({"messages": turn, "images": ["ok.png"], "id": "x" * 1_000_000}).encode()]
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    cwd = os.getcwd()
    with pytest.raises(DataError) as e:
        load_examples(tmp_path / "d.jsonl")
    message = str(e.value)
    assert "6 problem(s)" in message
    for line in (2, 3, 4, 5, 6, 7):
        assert f"d.jsonl:{line}: " in message
    good, bad = load_examples(tmp_path / "d.jsonl", skip_bad=True)
    assert len(good) == 2 and len(bad) == 6 and not (Path(cwd) / "pwned").exists()

"""Batch jobs (`mmstack.apps.batch`, `mmstack ocr`): input expansion, error lines, kill-and-resume,
sharding and merging, OCR scores, and one end-to-end run of the real tiny model through the module."""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from fake_model import fake_describe
from golden import golden_dir
from mmstack.apps import batch, chart, ocr

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "gray"]


def make_images(root: Path, n: int = 4, corrupt: bool = False) -> list[Path]:
    """n small PNGs (some in a sub-folder), optionally a corrupt one, plus files that are not images."""
    paths = []
    for k in range(n):
        p = root / ("sub" if k % 2 else "") / f"im{k}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20 + k, 10), COLORS[k % len(COLORS)]).save(p)
        paths.append(p)
    if corrupt:
        (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"skipped")
    return paths


def fake_text(image, prompt):
    return fake_describe("text")(image, prompt)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def without_timing(recs):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in recs]


def run_module(*args, cwd, timeout=120):
    return subprocess.run([sys.executable, "-m", "mmstack.apps.ocr", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


FAKE_JOB = [sys.executable, str(Path(__file__).with_name("fake_job.py")), "ocr"]  # the module with the fake model


def run_fake_job(*args, cwd, timeout=120):
    return subprocess.run([*FAKE_JOB, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------------------------- inputs

def test_folder_expansion_is_recursive_sorted_and_keeps_only_images(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_images(tmp_path / "imgs", n=4)
    ids = [it.id for it in batch.iter_items(["imgs"])]
    assert ids == ["imgs/im0.png", "imgs/im2.png", "imgs/sub/im1.png", "imgs/sub/im3.png"]


def test_glob_patterns_and_explicit_files_expand_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_images(tmp_path / "imgs", n=4)
    ids = [it.id for it in batch.iter_items(["imgs/**/*.png", "imgs/notes.txt"])]
    # the glob matches im0..im3 (recursive); an explicitly named file is tried as an image whatever its name
    assert ids == ["imgs/im0.png", "imgs/im2.png", "imgs/sub/im1.png", "imgs/sub/im3.png", "imgs/notes.txt"]
    assert [it.id for it in batch.iter_items(["imgs/im0.png", "./imgs/im0.png"])] == ["imgs/im0.png"]


def test_missing_inputs_are_usage_errors(tmp_path):
    with pytest.raises(batch.UsageError, match="no such file"):
        list(batch.iter_items([tmp_path / "nope.png"]))
    with pytest.raises(batch.UsageError, match="no files match"):
        list(batch.iter_items([str(tmp_path / "*.png")]))


def test_jsonl_manifest_resolves_paths_keeps_answers_and_turns_bad_lines_into_error_items(tmp_path):
    make_images(tmp_path / "data" / "imgs", n=2)
    lines = [b'{"id": "first", "image": "imgs/im0.png", "answer": "hello"}',
             b'{"image": "imgs/sub/im1.png", "answer": ["a", "b"]}',
             b'{"id": "latin1", "image": "caf\xe9.png"}',  # not UTF-8
             b'not json', b'', b'{"id": "noimage"}', b'[1, 2]']
    man = tmp_path / "data" / "m.jsonl"
    man.write_bytes(b"\n".join(lines) + b"\n")
    items = list(batch.iter_items([man]))
    assert [it.id for it in items[:2]] == ["first", "imgs/sub/im1.png"]
    assert Path(items[0].image) == tmp_path / "data" / "imgs" / "im0.png" and items[0].answer == "hello"
    assert items[1].answer == ["a", "b"] and items[0].error is None
    errors = items[2:]
    assert [it.id.rsplit(":", 1)[1] for it in errors] == ["3", "4", "6", "7"]
    assert "UTF-8" in errors[0].error and "JSON" in errors[1].error and "image" in errors[2].error
    assert all(it.image is None for it in errors)


def test_csv_manifest_reads_multiline_answers_and_reports_non_utf8_records(tmp_path):
    make_images(tmp_path / "imgs", n=1)
    man = tmp_path / "m.csv"
    man.write_bytes(b'id,image,answer\r\n'
                    b'c1,imgs/im0.png,"Year,Sales\n2019,10"\r\n'  # a quoted answer spanning two lines
                    b'c2,caf\xe9.png,x\r\n'  # not UTF-8
                    b',imgs/im0.png,\r\n')
    items = list(batch.iter_items([man]))
    assert items[0].id == "c1" and items[0].answer == "Year,Sales\n2019,10" and items[0].error is None
    assert items[1].error and "UTF-8" in items[1].error
    assert items[2].id == "imgs/im0.png"
    (tmp_path / "bad.csv").write_text("name,path\nx,y\n")
    with pytest.raises(batch.UsageError, match="'image' column"):
        list(batch.iter_items([tmp_path / "bad.csv"]))


def test_pdf_pages_become_items_rendered_on_demand(tmp_path):
    pytest.importorskip("pypdfium2")
    pages = [Image.new("RGB", (100, 50), c) for c in ("red", "blue")]
    pdf = tmp_path / "doc.pdf"
    pages[0].save(pdf, "PDF", save_all=True, append_images=pages[1:], resolution=72)
    (tmp_path / "damaged.pdf").write_bytes(b"%PDF-1.4 nothing else")
    items = list(batch.iter_items([pdf, tmp_path / "damaged.pdf"], pdf_dpi=144))
    assert [it.id.rsplit("/", 1)[1] for it in items[:2]] == ["doc.pdf#page=1", "doc.pdf#page=2"]
    assert [it.page for it in items[:2]] == [1, 2]
    first = items[0].load()
    assert first.size == (200, 100) and first.getpixel((50, 50))[0] > 200  # 2x scale, red page
    assert items[2].error and "PDF" in items[2].error
    summary = ocr.ocr([pdf], tmp_path / "out.jsonl", fake_text, progress=False)
    assert (summary.done, summary.errors) == (2, 0)
    texts = [r["text"] for r in records(tmp_path / "out.jsonl")]  # PIL stores pages as JPEG: colours approximate
    assert [t.split()[0] for t in texts] == ["200x100", "200x100"]
    assert int(texts[0][-6:-4], 16) > 200 and int(texts[1][-2:], 16) > 200  # red page, then blue


def test_pdf_without_pypdfium2_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "doc.pdf").write_bytes(b"%PDF-1.4")
    monkeypatch.setitem(sys.modules, "pypdfium2", None)  # import fails
    with pytest.raises(batch.MissingDependency, match="pip install pypdfium2"):
        list(batch.iter_items([tmp_path / "doc.pdf"]))


def test_ids_never_leave_the_output_folder(tmp_path):
    for bad in ["../../etc/passwd", "/abs/x.png", "..", "a/b\\c:d*?.png#page=2", "\u00e9\u00e9", ""]:
        name = batch.safe_name(bad)
        assert "/" not in name and "\\" not in name and not name.startswith(".")
        assert (tmp_path / name).resolve().parent == tmp_path.resolve()
    assert batch.safe_name("a/b.png") != batch.safe_name("a_b.png")  # the hash keeps ids apart
    item = batch.Item(id="../../escape", source="x", image=Image.new("RGB", (4, 4)))
    fields = chart.chart_work(fake_describe("table"), tmp_path / "out")(item)
    written = (tmp_path / "out" / fields["csv"]).resolve()
    assert written.is_file() and (tmp_path / "out" / "tables").resolve() == written.parent


# --------------------------------------------------------------------------------------- the runner

def test_a_corrupt_file_gives_an_error_line_and_the_rest_succeed(tmp_path):
    make_images(tmp_path / "imgs", n=3, corrupt=True)
    summary = ocr.ocr([tmp_path / "imgs"], tmp_path / "out.jsonl", fake_text, progress=False)
    recs = records(tmp_path / "out.jsonl")
    assert (summary.done, summary.errors, summary.skipped) == (3, 1, 0)
    bad = [r for r in recs if r["error"]]
    assert len(bad) == 1 and bad[0]["id"].endswith("broken.png") and "ImageError" in bad[0]["error"]
    assert bad[0]["text"] is None
    assert all(set(r) == {"id", "source", "page", "text", "seconds", "error"} for r in recs)
    assert all(r["text"] and r["error"] is None for r in recs if r is not bad[0])


def test_a_model_error_is_recorded_and_the_run_continues(tmp_path):
    make_images(tmp_path / "imgs", n=3)

    def flaky(image, prompt):
        if str(image).endswith("im1.png"):
            raise RuntimeError("CUDA out of memory")
        return "ok"

    summary = ocr.ocr([tmp_path / "imgs"], tmp_path / "out.jsonl", flaky, progress=False)
    recs = {Path(r["id"]).name: r for r in records(tmp_path / "out.jsonl")}
    assert (summary.done, summary.errors) == (2, 1)
    assert recs["im1.png"]["error"] == "RuntimeError: CUDA out of memory"
    # --retry-errors redoes only the failed item
    summary = ocr.ocr([tmp_path / "imgs"], tmp_path / "out.jsonl", lambda i, p: "ok", resume=True,
                      retry_errors=True, progress=False)
    assert (summary.done, summary.errors, summary.skipped) == (1, 0, 2)
    assert [r["error"] for r in records(tmp_path / "out.jsonl")] == [None] * 3


def test_resume_drops_a_truncated_last_line_and_redoes_that_item(tmp_path):
    make_images(tmp_path / "imgs", n=4)
    out = tmp_path / "out.jsonl"
    ocr.ocr([tmp_path / "imgs"], out, fake_text, progress=False)
    full = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(full[:2]) + full[2][:15])  # killed while writing the third line
    summary = ocr.ocr([tmp_path / "imgs"], out, fake_text, resume=True, progress=False)
    assert (summary.done, summary.skipped) == (2, 2)
    assert without_timing(records(out)) == without_timing([json.loads(x) for x in full])


def test_an_existing_output_needs_resume_or_overwrite(tmp_path):
    make_images(tmp_path / "imgs", n=1)
    parser = argparse.ArgumentParser()
    ocr.add_arguments(parser)
    argv = [str(tmp_path / "imgs"), "--out", str(tmp_path / "o.jsonl"), "--no-progress"]
    assert ocr.main(parser.parse_args(argv), describe=fake_text) == 0
    assert ocr.main(parser.parse_args(argv), describe=fake_text) == 2
    assert ocr.main(parser.parse_args(argv + ["--overwrite"]), describe=fake_text) == 0
    assert ocr.main(parser.parse_args(argv + ["--resume"]), describe=fake_text) == 0
    assert len(records(tmp_path / "o.jsonl")) == 1
    with pytest.raises(SystemExit) as e:
        parser.parse_args(argv + ["--shard", "3/3"])
    assert e.value.code == 2


def test_kill_mid_run_then_resume_gives_one_valid_line_per_item(tmp_path):
    n = 8
    make_images(tmp_path / "imgs", n=n)
    out = tmp_path / "out.jsonl"
    args = ["imgs", "--out", "out.jsonl", "--fake-model", "text:0.4", "--no-progress", "--batch-size", "1"]
    proc = subprocess.Popen([*FAKE_JOB, *args], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not out.exists() or out.read_bytes().count(b"\n") < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert 2 <= out.read_bytes().count(b"\n") < n, "the run should have been killed part-way"
    with open(out, "ab") as f:  # make sure a torn final line is present, as a kill mid-write leaves it
        f.write(b'{"id": "imgs/im')
    done = run_fake_job(*args[:4], "text", "--resume", "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    recs = records(out)  # every line parses
    expected = [f"imgs/{p.relative_to(tmp_path / 'imgs').as_posix()}" for p in (tmp_path / "imgs").rglob("im*.png")]
    assert sorted(r["id"] for r in recs) == sorted(expected) and len(recs) == n
    assert all(r["error"] is None and r["text"] for r in recs)


def test_shards_then_merge_equal_the_unsharded_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_images(tmp_path / "imgs", n=7, corrupt=True)
    ocr.ocr(["imgs"], "all.jsonl", fake_text, progress=False)
    for i in range(3):
        s = ocr.ocr(["imgs"], "part.jsonl", fake_text, shard=(i, 3), progress=False)
        assert s.out == Path(f"part.shard-{i}-of-3.jsonl")
    parts = batch.find_shards("part.jsonl")
    order = [it.id for it in batch.iter_items(["imgs"])]
    assert batch.merge(parts + parts[:1], "part.jsonl", order=order) == 8  # duplicates collapse
    assert without_timing(records(Path("part.jsonl"))) == without_timing(records(Path("all.jsonl")))


def test_cli_shards_from_torchrun_env_and_merge_flag(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_images(tmp_path / "imgs", n=5)
    parser = argparse.ArgumentParser()
    ocr.add_arguments(parser)
    base = ["imgs", "--out", "r.jsonl", "--no-progress"]
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert ocr.main(parser.parse_args(base), describe=fake_text) == 0
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert len(records(Path("r.shard-0-of-2.jsonl"))) == 3 and len(records(Path("r.shard-1-of-2.jsonl"))) == 2
    assert ocr.main(parser.parse_args(base + ["--merge"]), describe=fake_text) == 0
    assert [r["id"] for r in records(Path("r.jsonl"))] == [it.id for it in batch.iter_items(["imgs"])]
    assert batch.resolve_shard("1/4") == (1, 4) and batch.resolve_shard(None, env={}) == (0, 1)
    with pytest.raises(ValueError):
        batch.parse_shard("2/2")


# ------------------------------------------------------------------------------------------- scores

def test_summary_scores_answers_from_a_manifest(tmp_path):
    make_images(tmp_path / "imgs", n=2)
    man = tmp_path / "m.jsonl"
    man.write_text('{"id": "a", "image": "imgs/im0.png", "answer": "20x10 #ff0000"}\n'
                   '{"id": "b", "image": "imgs/sub/im1.png", "answer": "21x10 #00800x"}\n')
    s = ocr.ocr([man], tmp_path / "o.jsonl", fake_text, progress=False)
    assert s.scores["n"] == 2 and s.scores["exact_match"] == 0.5
    assert s.scores["cer"] == pytest.approx(1 / 13 / 2) and s.scores["anls"] == pytest.approx((1 + 12 / 13) / 2)
    assert "2 done, 0 errors, 0 skipped" in str(s) and "items/s" in str(s)


# ----------------------------------------------------------------------------------------- real model

def test_real_tiny_model_end_to_end_through_the_module(tmp_path):
    make_images(tmp_path / "imgs", n=2, corrupt=True)
    g = golden_dir()
    res = run_module("imgs", "--out", "out.jsonl", "--model", g / "vl2_tiny_mla_moe", "--tokenizer",
                     g / "vl2_tokenizer",
                     "--device", "cpu", "--max-new-tokens", "2", "--prompt", "Read.", "--no-progress", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    recs = records(tmp_path / "out.jsonl")
    assert [Path(r["id"]).name for r in recs] == ["broken.png", "im0.png", "im1.png"]
    assert recs[0]["error"].startswith("ImageError") and recs[0]["text"] is None
    assert all(isinstance(r["text"], str) and r["error"] is None and r["seconds"] > 0 for r in recs[1:])
    assert "2 done, 1 errors" in res.stdout

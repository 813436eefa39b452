"""Batch jobs at scale: items in flight at once (batched by the engine), PDFs inside folders, the model folder's
own prompts, answers capped to the context, an output lock, and exit codes that say when nothing worked."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from fake_model import fake_describe
from mmstack.apps import batch, chart, ocr
from mmstack.io.lock import exclusive_lock

FAKE_JOB = [sys.executable, str(Path(__file__).with_name("fake_job.py"))]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def without_timing(recs):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in recs]


def images(root: Path, n: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(n):
        p = root / f"im{k:02d}.png"
        Image.new("RGB", (20 + k, 10 + k), (10 * k, 200, 30)).save(p)
        out.append(p)
    return out


def test_items_in_flight_at_once_give_the_same_lines_in_input_order(tmp_path):
    images(tmp_path / "imgs", 12)
    one = ocr.ocr([tmp_path / "imgs"], tmp_path / "one.jsonl", fake_describe("text:0.02"), progress=False)
    many = ocr.ocr([tmp_path / "imgs"], tmp_path / "many.jsonl", fake_describe("text:0.02"), progress=False,
                   batch_size=6)
    assert (one.done, many.done) == (12, 12)
    assert without_timing(records(tmp_path / "many.jsonl")) == without_timing(records(tmp_path / "one.jsonl"))
    assert many.seconds < one.seconds  # the sleeps overlap (0.24 s of them in a row)


def test_a_folder_with_images_and_a_two_page_pdf_yields_every_page(tmp_path):
    pytest.importorskip("pypdfium2")
    images(tmp_path / "docs", 2)
    pages = [Image.new("RGB", (60, 40), c) for c in ("red", "blue")]
    pages[0].save(tmp_path / "docs" / "scan.pdf", "PDF", save_all=True, append_images=pages[1:], resolution=72)
    ids = [it.id.split("/", 1)[1] if "/" in it.id else it.id for it in batch.iter_items([tmp_path / "docs"])]
    assert [i.rsplit("/", 1)[-1] for i in ids] == ["im00.png", "im01.png", "scan.pdf#page=1", "scan.pdf#page=2"]
    summary = ocr.ocr([tmp_path / "docs"], tmp_path / "out.jsonl", fake_describe("text"), progress=False)
    assert (summary.done, summary.errors) == (4, 0)


def test_a_second_run_on_the_same_output_is_refused_with_the_holders_pid(tmp_path):
    images(tmp_path / "imgs", 2)
    out = tmp_path / "out.jsonl"
    with exclusive_lock(out.with_name(out.name + ".lock"), what=f"the output {out}"):
        r = subprocess.run([*FAKE_JOB, "ocr", tmp_path / "imgs", "--out", out, "--fake-model", "text",
                            "--no-progress", "--resume"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "in use by another process (PID" in r.stderr and str(__import__("os").getpid()) in r.stderr
    assert not out.exists() or out.read_text() == ""
    r = subprocess.run([*FAKE_JOB, "ocr", tmp_path / "imgs", "--out", out, "--fake-model", "text", "--no-progress"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and len(records(out)) == 2  # the lock went with its holder


def test_the_exit_code_is_1_when_every_item_failed(tmp_path):
    (tmp_path / "bad").mkdir()
    for k in range(3):
        (tmp_path / "bad" / f"x{k}.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    r = subprocess.run([*FAKE_JOB, "ocr", tmp_path / "bad", "--out", tmp_path / "o.jsonl", "--fake-model", "text",
                        "--no-progress"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "every item failed" in r.stderr
    assert all(rec["error"] for rec in records(tmp_path / "o.jsonl"))


def test_an_answer_without_a_table_is_an_error_that_keeps_the_answer(tmp_path):
    images(tmp_path / "charts", 2)
    summary = chart.chart([tmp_path / "charts"], tmp_path / "out", fake_describe("text"), progress=False)
    assert (summary.done, summary.errors) == (0, 2)
    recs = records(tmp_path / "out" / "results.jsonl")
    assert all(r["error"] == "the answer holds no table with values" and r["text"] for r in recs)
    summary = chart.chart([tmp_path / "charts"], tmp_path / "out2", fake_describe("table"), progress=False)
    assert (summary.done, summary.errors) == (2, 0)


def test_the_model_folders_tasks_give_the_default_prompt_and_length(tmp_path):
    (tmp_path / "demo.json").write_text(json.dumps({"tasks": {"ocr": {"prompt": "Read the text in the image.",
                                                                      "max_new_tokens": 24},
                                                              "chart": {"prompt": 3}}}))
    assert batch.task_defaults(tmp_path, "ocr") == {"prompt": "Read the text in the image.", "max_new_tokens": 24}
    assert batch.task_defaults(tmp_path, "chart") == {}  # malformed entries are ignored
    assert batch.task_defaults(tmp_path / "nowhere", "ocr") == {}


def test_torchrun_ranks_use_their_own_gpu(monkeypatch):
    import argparse

    import torch

    from mmstack.apps.batch_runner import job_device

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert job_device(argparse.Namespace(device=None)) == "cuda:1"
    assert job_device(argparse.Namespace(device="cpu")) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert job_device(argparse.Namespace(device=None)) is None

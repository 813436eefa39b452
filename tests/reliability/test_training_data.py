"""Training data validated as training loads it, and runs that survive their own damage: truncated or corrupt
images, over-long or over-illustrated examples, damaged checkpoints and metrics, interrupted saves, two runs on
one folder, and a CLI that lists every `file:line` problem."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from golden import golden_dir
from mmstack.apps.checkpointing import read_checkpoint, truncate_metrics
from mmstack.apps.data import DataError, load_examples
from mmstack.apps.train import TrainArgs, run
from mmstack.errors import CheckpointError
from mmstack.io.lock import LockedError, exclusive_lock

VL2 = golden_dir() / "vl2_tiny_mla_moe"
VL2_TOK = golden_dir() / "vl2_tokenizer"


def png_bytes(size=(40, 30), colour=(200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def dataset(d, bad: dict) -> None:
    """12 good examples, then one per entry of `bad` (name -> (image bytes, number of images, answer))."""
    d.mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(12):
        (d / f"ok{i}.png").write_bytes(png_bytes(colour=(20 * i, 100, 50)))
        recs.append({"id": f"ok{i}", "images": [f"ok{i}.png"],
                     "messages": [{"role": "user", "content": "<image>\nColour?"}, {"role": "assistant", "content": "red"}]})
    for name, (data, n, answer) in bad.items():
        (d / f"{name}.png").write_bytes(data)
        recs.append({"id": name, "images": [f"{name}.png"] * n,
                     "messages": [{"role": "user", "content": "<image>\n" * n + "Colour?"},
                                  {"role": "assistant", "content": answer}]})
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


BAD = {
    "truncated": (jpeg_bytes()[:200], 1, "red"),  # a JPEG cut short: PIL opens the header fine
    "corrupt": (png_bytes()[:60] + b"\x00" * 40 + png_bytes()[100:], 1, "red"),  # pixel data damaged
}


def test_validation_decodes_every_image_and_skip_bad_really_skips(tmp_path):
    dataset(tmp_path, BAD)
    with pytest.raises(DataError) as e:
        load_examples(tmp_path / "data.jsonl")
    msg = str(e.value)
    assert "data.jsonl:13: unreadable image" in msg and "data.jsonl:14: unreadable image" in msg
    good, skipped = load_examples(tmp_path / "data.jsonl", skip_bad=True)
    assert len(good) == 12 and len(skipped) == 2


def test_examples_too_long_or_with_too_many_images_are_problems_before_training(tmp_path):
    dataset(tmp_path, {"long": (png_bytes(), 1, "word " * 20000), "many": (png_bytes((8, 8)), 200, "red")})
    out = tmp_path / "run"
    args = TrainArgs(model=str(VL2), tokenizer=str(VL2_TOK), data=[str(tmp_path / "data.jsonl")], out=str(out),
                     steps=2, batch_size=4, device="cpu", save_every=2)
    with pytest.raises(DataError) as e:
        run(args)
    assert "data.jsonl:13:" in str(e.value) and "tokens with its images; the model context is" in str(e.value)
    assert "data.jsonl:14: 200 images; the limit is 16" in str(e.value)
    args.skip_bad = True
    assert (run(args) / "model" / "config.json").exists()  # the run trains on the 12 good ones


def test_a_damaged_checkpoint_or_metrics_file_is_a_clear_error_or_dropped(tmp_path):
    for bad in ({}, [1, 2], {"model": {}, "optimizer": {}, "scheduler": {}, "rng": {}, "state": "x"}):
        torch.save(bad, tmp_path / "state.pt")
        with pytest.raises(CheckpointError, match="cannot resume"):
            read_checkpoint(tmp_path / "state.pt")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2}\n[1, 2]\n"text"\n{"step": "2"}\n{"step": 2}\n{"st')
    truncate_metrics(metrics, 5)
    assert metrics.read_text() == '{"step": 1, "loss": 2}\n{"step": 2}\n'


def test_interrupted_saves_are_cleaned_and_a_second_run_on_the_folder_is_refused(tmp_path):
    dataset(tmp_path / "d", {})
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    stale = out / "checkpoint" / ".tmp-abc123.pt"
    stale.write_bytes(b"x" * 1000)  # what a kill during a save leaves
    args = TrainArgs(model=str(VL2), tokenizer=str(VL2_TOK), data=[str(tmp_path / "d" / "data.jsonl")], out=str(out),
                     steps=1, batch_size=4, device="cpu", save_every=1)
    with exclusive_lock(out / ".lock", what=f"the run folder {out}"):
        with pytest.raises(LockedError, match=rf"in use by another process \(PID {os.getpid()}\)"):
            run(args)
    run(args)
    assert not stale.exists() and (out / "checkpoint" / "state.pt").exists()


def test_the_cli_lists_every_data_problem_up_to_twenty(tmp_path):
    bad = {f"b{k}": (b"not an image", 1, "red") for k in range(25)}
    dataset(tmp_path, bad)
    r = subprocess.run([sys.executable, "-m", "mmstack.cli", "finetune", "--model", str(VL2), "--tokenizer", str(VL2_TOK),
                        "--data", str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "run"), "--steps", "1",
                        "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("mmstack finetune: error: DataError: 25 problem(s)")
    assert sum(": unreadable image" in line for line in lines) == 20 and lines[-1] == "... and 5 more"

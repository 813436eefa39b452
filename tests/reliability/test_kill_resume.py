"""SIGKILL at random points, then `--resume`: `mmstack ocr` and `mmstack chart` (with the test stand-in model,
through tests/apps/fake_job.py) end with exactly one valid line per item, equal to an uninterrupted run, and
every table they wrote intact; `mmstack finetune` keeps a checkpoint that `torch.load(weights_only=True)` always
reads, and its metrics end with each step exactly once, on the uninterrupted run's loss curve."""
from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from golden import golden_dir

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic in every process: resumed == uninterrupted
MMSTACK = [sys.executable, "-m", "mmstack.cli"]
# `mmstack ocr|chart ... --fake-model KIND[:SECONDS]`: the real job with the stand-in model
FAKE_JOB = [sys.executable, str(Path(__file__).resolve().parents[1] / "apps" / "fake_job.py")]


def _start(args: list, cwd: Path, command: list = MMSTACK) -> subprocess.Popen:
    return subprocess.Popen([*command, *map(str, args)], cwd=cwd, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _finish(args: list, cwd: Path, command: list = MMSTACK) -> None:
    proc = _start(args, cwd, command)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n") if path.exists() else []


def _done(path: Path) -> int:
    return max(len(_lines(path)) - 1, 0)  # complete lines


def _kill_after(proc: subprocess.Popen, output: Path, lines: int, delay: float) -> None:
    """SIGKILL once `output` holds `lines` complete lines, `delay` seconds later: a random point of the run
    whatever the machine's speed (lines=0 kills it while it starts up, or while it rewrites a resumed file)."""
    deadline = time.monotonic() + 240
    while _done(output) < lines and proc.poll() is None:
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.002)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


# ------------------------------------------------------------------------------------------ batch jobs


def _images(root: Path, n: int) -> None:
    for k in range(n):
        p = root / f"d{k % 3}" / f"im{k:02d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20 + k, 10 + k % 7), (10 * k, 255 - 10 * k, 3 * k)).save(p)


def _without_timing(records: list[dict]) -> list[dict]:
    return sorted(({k: v for k, v in r.items() if k != "seconds"} for r in records), key=lambda r: r["id"])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("job", ["ocr", "chart"])
def test_batch_job_killed_at_random_points_resumes_without_lost_duplicated_or_corrupt_lines(job, seed, tmp_path):
    rng, n = random.Random(seed), 24
    _images(tmp_path / "imgs", n)
    out = "out.jsonl" if job == "ocr" else "out"
    results = tmp_path / ("out.jsonl" if job == "ocr" else "out/results.jsonl")
    fake = "text" if job == "ocr" else "table"
    # seeds 0 and 1 run one item at a time; seed 2 keeps 4 in flight (slower items, so a kill still lands mid-run)
    batch_size, delay = (1, 0.05) if seed < 2 else (4, 0.2)
    args = [job, "imgs", "--out", out, "--fake-model", f"{fake}:{delay}", "--no-progress", "--batch-size", batch_size]
    _finish([job, "imgs", "--out", "reference" + (".jsonl" if job == "ocr" else ""), "--fake-model", fake,
             "--no-progress"], tmp_path, FAKE_JOB)
    reference = tmp_path / ("reference.jsonl" if job == "ocr" else "reference/results.jsonl")

    for kill in range(4):
        proc = _start(args + (["--resume"] if kill else []), tmp_path, FAKE_JOB)
        _kill_after(proc, results, rng.randrange(_done(results), n), rng.uniform(0, 0.05))
        *complete, torn = _lines(results) or [b""]
        assert all(json.loads(line)["error"] is None for line in complete)  # every finished line is whole
        ids = [json.loads(line)["id"] for line in complete]
        assert len(ids) == len(set(ids))
        if rng.random() < 0.5 and complete:  # as if the kill fell inside a write: a torn last line
            with open(results, "ab") as f:
                f.write(complete[-1][: rng.randrange(1, len(complete[-1]))])
    _finish(args + ["--resume"], tmp_path, FAKE_JOB)

    records = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines()]  # all parse
    expected = [json.loads(line) for line in reference.read_text(encoding="utf-8").splitlines()]
    assert len(records) == n and _without_timing(records) == _without_timing(expected)
    if job == "chart":  # each table file whole, one pair per record, nothing else visible
        tables = tmp_path / "out" / "tables"
        visible = {p.name for p in tables.iterdir() if not p.name.startswith(".")}
        assert visible == {Path(r[k]).name for r in records for k in ("csv", "json")}
        for r in records:
            assert json.loads((tmp_path / "out" / r["json"]).read_text(encoding="utf-8"))["rows"] == r["table"]["rows"]
            with open(tmp_path / "out" / r["csv"], newline="", encoding="utf-8") as f:
                assert list(csv.reader(f))[1:] == r["table"]["rows"]


# ------------------------------------------------------------------------------------------ fine-tuning

STEPS = 12


@pytest.fixture(scope="module")
def finetune_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ft")
    rng = np.random.default_rng(0)
    records = []
    for i, name in enumerate(["red", "green", "blue"] * 4):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"im{i}.png")
        records.append({"id": f"e{i}", "images": [f"im{i}.png"],
                        "messages": [{"role": "user", "content": "<image>\nWhat colour is it?"},
                                     {"role": "assistant", "content": f"It is {name}."}]})
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return d / "data.jsonl"


def _finetune_args(data: Path, out: Path) -> list:
    model = golden_dir() / "vl2_tiny_mla_moe"
    return ["finetune", "--model", model, "--tokenizer", golden_dir() / "vl2_tokenizer", "--data", data, "--out", out,
            "--steps", STEPS, "--batch-size", 2, "--save-every", 2, "--warmup", 1, "--lr", 1e-3,
            "--eval-fraction", 0, "--device", "cpu"]


@pytest.fixture(scope="module")
def reference_losses(finetune_data, tmp_path_factory) -> list[float]:
    out = tmp_path_factory.mktemp("ref") / "run"
    _finish(_finetune_args(finetune_data, out), out.parent)
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _checkpoint_step(ckpt: Path):
    """The step of the checkpoint, read the only way resume reads it; None before the first save."""
    if not ckpt.exists():
        return None
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state"]["step"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_finetune_killed_at_random_points_resumes_onto_the_same_curve(seed, finetune_data, reference_losses, tmp_path):
    rng = random.Random(seed)
    out = tmp_path / "run"
    args = _finetune_args(finetune_data, out)
    metrics, ckpt = out / "metrics.jsonl", out / "checkpoint" / "state.pt"
    for kill in range(1 + seed % 2):
        proc = _start(args + (["--resume"] if kill else []), tmp_path)
        target = rng.randint(min(_done(metrics) + 1, STEPS - 1), STEPS - 1)  # a step of this run, then a moment after
        _kill_after(proc, metrics, target, rng.uniform(0, 0.1))
        step = _checkpoint_step(ckpt)  # loadable at whatever point the kill fell
        assert step is None or (step % 2 == 0 and step <= STEPS)
    _finish(args + ["--resume"], tmp_path)

    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # none lost, none twice, every line whole
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    assert np.allclose(losses, reference_losses, rtol=1e-5, atol=1e-6), (losses, reference_losses)
    assert _checkpoint_step(ckpt) == STEPS
    assert (out / "model" / "model.safetensors").exists() and (out / "model" / "config.json").exists()

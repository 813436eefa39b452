"""`--loss-average sample`: each example's mean answer loss, then the mean over examples, so a batch mixing a
one-word answer with a long one does not learn mostly the long one (issue 15's per-token imbalance)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import mmstack
from golden import golden_dir
from mmstack.apps.train import TrainArgs, run
from mmstack.training import understanding_loss

VL2 = golden_dir() / "vl2_tiny_mla_moe"
VL2_TOK = golden_dir() / "vl2_tokenizer"


def _batch(pipe, answers, tmp_path):
    Image.fromarray(np.full((40, 40, 3), 120, dtype=np.uint8)).save(tmp_path / "im.png")
    msgs = [[{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": a}] for a in answers]
    batch, _ = pipe.understanding.prepare_tagged(msgs, [[str(tmp_path / "im.png")]] * len(answers))
    return batch


def test_sample_average_is_the_mean_of_each_examples_own_loss(tmp_path):
    pipe = mmstack.load(VL2, device="cpu", tokenizer=VL2_TOK)
    answers = ["Red.", "A long answer about a grey square that goes on for many more tokens than the first."]
    with torch.no_grad():
        alone = [understanding_loss(pipe.model, _batch(pipe, [a], tmp_path))[0] for a in answers]
        both = _batch(pipe, answers, tmp_path)
        sample, n_examples = understanding_loss(pipe.model, both, "sample")
        token, n_tokens = understanding_loss(pipe.model, both, "token")
    counts = both.assistant_mask[:, 1:].sum(1).float()
    assert n_examples == 2 and n_tokens == int(counts.sum()) and counts[1] > 3 * counts[0]
    torch.testing.assert_close(sample, torch.stack(alone).mean(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(token, (torch.stack(alone) * counts).sum() / counts.sum(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="loss average must be one of"):
        understanding_loss(pipe.model, both, "example")


def test_a_run_trains_with_the_sample_average(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    for i, c in enumerate([(220, 30, 30), (30, 30, 220)]):
        Image.fromarray(np.full((48, 64, 3), c, dtype=np.uint8)).save(d / f"im{i}.png")
    recs = [{"id": f"e{i}", "images": [f"im{i % 2}.png"],
             "messages": [{"role": "user", "content": "<image>\nWhat colour is it?"},
                          {"role": "assistant", "content": ["Red.", "It is a blue picture, all of it blue."][i % 2]}]}
            for i in range(8)]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = run(TrainArgs(model=str(VL2), tokenizer=str(VL2_TOK), data=[str(d / "data.jsonl")], out=str(tmp_path / "o"),
                        steps=12, batch_size=4, lr=3e-3, warmup=2, device="cpu", loss_average="sample"))
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.5 * losses[0]

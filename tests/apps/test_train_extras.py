"""The recipe's training extras (issue 15): a CTC auxiliary head on the vision columns (`--ctc-weight`), task weights
(`--task-weights`) and dead VQ code restarts (`--vq-restart-every`)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from golden import golden_dir, tokenizer_for
from mmstack.apps.train import TrainArgs, run
from mmstack.apps.train_loss import parse_task_weights
from mmstack.ctc import ColumnCTCHead
from mmstack.training import restart_dead_codes

VL2 = golden_dir() / "vl2_tiny_mla_moe"
VL2_TOK = golden_dir() / "vl2_tokenizer"
CHARSET = "ABC0123"


def _losses(out, key: str = "loss"):
    return [json.loads(line).get(key) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Images whose answers are charset lines (the CTC head reads them) or sentences (it does not)."""
    d = tmp_path_factory.mktemp("extras")
    rng = np.random.default_rng(0)
    recs, t2i = [], []
    for i in range(16):
        arr = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(arr).save(d / f"im{i}.png")
        answer = "".join(rng.choice(list(CHARSET), 3)) if i % 2 == 0 else "It is noise."
        recs.append({"id": f"e{i}", "images": [f"im{i}.png"],
                     "messages": [{"role": "user", "content": "<image>\nRead it."}, {"role": "assistant", "content": answer}]})
        t2i.append({"id": f"t{i}", "prompt": "a picture", "image": f"im{i}.png"})
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (d / "t2i.jsonl").write_text("".join(json.dumps(r) + "\n" for r in t2i))
    return d


def test_the_ctc_head_learns_to_read_columns_that_spell_the_text():
    """Features whose columns one-hot encode characters (blank columns between): the head reads them after training,
    and a text longer than its frames adds no loss instead of an infinite one."""
    torch.manual_seed(0)
    head = ColumnCTCHead(width=8, rows=2, charset=CHARSET, frames=2, hidden=64)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)

    def sample(n):
        texts, feats = [], torch.zeros(n, 2 * 8, 8)  # 2 rows x 8 columns of width 8
        for i in range(n):
            t = "".join(np.random.default_rng(i).choice(list(CHARSET), 3))
            texts.append(t)
            grid = feats[i].view(2, 8, 8)
            for j, c in enumerate(t):
                grid[:, 2 * j + 1, CHARSET.index(c)] = 1.0  # columns 1, 3, 5 hold the characters
        return feats, texts

    feats, texts = sample(64)
    for _ in range(300):
        loss = head.loss(feats, list(range(64)), texts)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert head.read(feats) == texts
    assert head.accepts("AB0") and not head.accepts("ab") and not head.accepts("") and not head.accepts("A B")
    too_long = head.loss(feats[:1], [0], ["A" * 40])
    assert torch.isfinite(too_long) and float(too_long.detach()) == 0.0
    with pytest.raises(ValueError, match="without repeats"):
        ColumnCTCHead(8, 2, "AA")


def test_a_run_with_the_ctc_head_logs_it_learns_it_and_resumes_it(data, tmp_path):
    common = dict(model=str(VL2), tokenizer=str(VL2_TOK), data=[str(data / "data.jsonl")], steps=6, batch_size=4,
                  lr=3e-3, warmup=1, device="cpu", save_every=2, eval_fraction=0.0, ctc_weight=1.0,
                  ctc_charset=CHARSET)
    a = run(TrainArgs(out=str(tmp_path / "a"), **common))
    ctc = [c for c in _losses(a, "ctc") if c is not None]  # a step whose batch has no charset answer logs none
    assert len(ctc) >= 4 and all(np.isfinite(ctc)) and ctc[-1] < ctc[0], ctc
    run(TrainArgs(out=str(tmp_path / "b"), stop_after=3, **common))  # checkpoint at 2 holds the head and its optimizer
    b = run(TrainArgs(out=str(tmp_path / "b"), resume=True, **common))
    np.testing.assert_allclose([c for c in _losses(b, "ctc") if c is not None], ctc, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_losses(b), _losses(a), rtol=1e-5, atol=1e-6)
    # a later stage starts from the head this run saved (the recipe carries it), so its first CTC loss is lower
    assert (a / "ctc_head.safetensors").exists()
    c = run(TrainArgs(out=str(tmp_path / "c"), **{**common, "steps": 1, "ctc_init": str(a / "ctc_head.safetensors")}))
    assert _losses(c, "ctc")[0] < ctc[0]
    with pytest.raises(ValueError, match="another shape"):
        run(TrainArgs(out=str(tmp_path / "d"), **{**common, "ctc_charset": "XY", "ctc_init": str(a / "ctc_head.safetensors")}))
    # the head is training-only: the saved model has exactly the keys of the model it started from
    from safetensors import safe_open

    with safe_open(str(a / "model" / "model.safetensors"), "pt") as f:
        assert not any("ctc" in k for k in f.keys())


def test_task_weights_scale_a_tasks_gradient(data, tmp_path):
    from safetensors.torch import load_file

    common = dict(model=str(VL2), tokenizer=str(VL2_TOK), data=[str(data / "data.jsonl")], steps=2, batch_size=4,
                  lr=3e-3, warmup=1, device="cpu", eval_fraction=0.0, train="projector")
    base = load_file(str(VL2 / "model.safetensors")) if (VL2 / "model.safetensors").exists() else None
    off = run(TrainArgs(out=str(tmp_path / "off"), task_weights="understanding=0", **common))
    on = run(TrainArgs(out=str(tmp_path / "on"), task_weights="understanding=1", **common))
    w_off, w_on = (load_file(str(o / "model" / "model.safetensors")) for o in (off, on))
    proj = [k for k in w_off if "projector" in k]
    assert proj and any(not torch.equal(w_off[k], w_on[k]) for k in proj)
    if base is not None:  # a zero weight: Adam's step of a zero gradient is zero
        assert all(torch.equal(w_off[k], base[k].to(w_off[k].dtype)) for k in proj if k in base)
    assert parse_task_weights("understanding=1, vq=0.5") == {"understanding": 1.0, "vq": 0.5}
    for bad, msg in [("understanding", "TASK=WEIGHT"), ("chat=1", "TASK=WEIGHT"), ("vq=x", "not a number"),
                     ("vq=-1", ">= 0"), ("vq=inf", "finite")]:
        with pytest.raises(ValueError, match=msg):
            parse_task_weights(bad)


def test_dead_codes_restart_on_the_encoders_outputs():
    q = torch.nn.Module()
    q.embedding = torch.nn.Embedding(6, 4)
    before = q.embedding.weight.detach().clone()
    counts = torch.tensor([3, 0, 1, 0, 0, 2])
    latents = torch.randn(10, 4)
    n = restart_dead_codes(q, counts, latents, torch.Generator().manual_seed(0))
    w = q.embedding.weight.detach()
    assert n == 3
    assert torch.equal(w[[0, 2, 5]], before[[0, 2, 5]])  # live codes untouched
    for row in w[[1, 3, 4]]:  # each dead code now sits (within the noise) on one of the latents
        assert (latents - row).norm(dim=1).min() < 0.1 * latents.norm(dim=1).mean()
    assert restart_dead_codes(q, torch.ones(6, dtype=torch.long), latents) == 0


def test_a_vq_tokenizer_run_restarts_dead_codes(data, tmp_path):
    janus = golden_dir() / "janus_pro_tiny"
    out = run(TrainArgs(model=str(janus), tokenizer=str(tokenizer_for(janus)), data=[str(data / "t2i.jsonl")],
                        out=str(tmp_path / "vq"), task="vq_tokenizer", train="vq", steps=4, batch_size=4, lr=1e-3,
                        warmup=1, device="cpu", eval_fraction=0.0, vq_restart_every=2))
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in recs if "codes_restarted" in r]
    assert [r["step"] for r in logged] == [2, 4]
    assert all(r["codes_used"] + r["codes_restarted"] <= 16384 for r in logged)
    assert logged[0]["codes_restarted"] > 0  # a tiny batch uses few of the codebook's rows

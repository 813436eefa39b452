"""Fine-tuning: data formats and validation, loss goes down per task, resume equals an uninterrupted
run step for step, 2-process gloo (torchrun) equals 1 process under DDP and FSDP2 (and an FSDP run resumes
step for step; LoRA under FSDP and resuming across world sizes: test_sharded_checkpoint.py), LoRA merge equals the
adapted forward."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import mmstack
from golden import golden_dir, tokenizer_for
from mmstack.apps.data import DataError, load_examples
from mmstack.apps.train import TrainArgs, run

VL2 = golden_dir() / "vl2_tiny_mla_moe"
VL2_TOK = golden_dir() / "vl2_tokenizer"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    recs, t2i = [], []
    for i in range(24):
        name = list(colours)[i % 3]
        arr = np.zeros((48 + i % 5, 64, 3), dtype=np.uint8) + np.array(colours[name], dtype=np.uint8)
        arr = (arr.astype(int) + rng.integers(-20, 20, arr.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(arr).save(d / f"im{i}.png")
        recs.append({"id": f"e{i}", "messages": [{"role": "user", "content": "<image>\nWhat colour is it?"},
                                                {"role": "assistant", "content": f"It is {name}."}], "images": [f"im{i}.png"]})
        t2i.append({"id": f"t{i}", "prompt": f"a {name} picture", "image": f"im{i}.png"})
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (d / "t2i.jsonl").write_text("".join(json.dumps(r) + "\n" for r in t2i))
    return d


def _losses(out, key: str = "loss"):
    return [json.loads(line)[key] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_formats_normalise_to_the_same_example(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    llava = [{"id": "x", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nHi"},
                                                             {"from": "gpt", "value": "Hello"}]}]
    share = {"conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello"}], "images": ["a.png"]}
    msgs = {"messages": [{"role": "user", "content": "<image>\nHi"}, {"role": "assistant", "content": "Hello"}], "images": ["a.png"]}
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    (tmp_path / "share.jsonl").write_text(json.dumps(share) + "\n")
    (tmp_path / "msgs.jsonl").write_text(json.dumps(msgs) + "\n")
    got = [load_examples(tmp_path / f)[0][0] for f in ("llava.json", "share.jsonl", "msgs.jsonl")]
    assert all(e.messages == got[0].messages and e.images == got[0].images for e in got)
    assert got[0].images == [str(tmp_path / "a.png")]


def test_validation_reports_file_and_line_and_skip_bad_counts(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    lines = [
        {"messages": [{"role": "user", "content": "<image>\nHi"}, {"role": "assistant", "content": "ok"}], "images": ["ok.png"]},
        {"messages": [{"role": "user", "content": "<image>\nHi"}, {"role": "assistant", "content": "x"}], "images": ["missing.png"]},
        {"messages": [{"role": "user", "content": "<image><image>\nHi"}, {"role": "assistant", "content": "x"}], "images": ["ok.png"]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]},
        {"messages": [{"role": "user", "content": "<image>\nHi"}, {"role": "assistant", "content": "x"}], "images": ["bad.png"]},
    ]
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in lines) + "{broken\n")
    with pytest.raises(DataError) as e:
        load_examples(f)
    msg = str(e.value)
    for line, text in ((2, "missing image"), (3, "2 <image> tag(s) but 1 image"), (4, "empty assistant turn"),
                       (5, "unreadable image"), (6, "not valid UTF-8 JSON")):
        assert f"{f}:{line}: " in msg and text in msg
    good, bad = load_examples(f, skip_bad=True)
    assert len(good) == 1 and len(bad) == 5


def test_understanding_loss_goes_down_and_output_loads(data, tmp_path):
    out = run(TrainArgs(model=str(VL2), tokenizer=str(VL2_TOK), data=[str(data / "data.jsonl")], out=str(tmp_path / "o"),
                        steps=20, batch_size=4, lr=3e-3, warmup=2, device="cpu", eval_every=10))
    losses = _losses(out)
    assert losses[-1] < 0.5 * losses[0]
    evals = [json.loads(line).get("eval_loss") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert evals[9] is not None and evals[-1] < evals[9] * 1.5
    pipe = mmstack.load(out / "model", device="cpu")
    assert isinstance(pipe.describe(str(data / "im0.png"), "What colour is it?", max_new_tokens=4), str)


def test_resume_after_a_stop_matches_the_uninterrupted_curve(data, tmp_path):
    common = dict(model=str(VL2), tokenizer=str(VL2_TOK), data=[str(data / "data.jsonl")], steps=8, batch_size=4,
                  lr=2e-3, warmup=2, device="cpu", save_every=3)
    a = run(TrainArgs(out=str(tmp_path / "a"), **common))
    run(TrainArgs(out=str(tmp_path / "b"), stop_after=5, **common))  # "killed" after step 5, checkpoint at 3
    assert len(_losses(tmp_path / "b")) == 5
    b = run(TrainArgs(out=str(tmp_path / "b"), resume=True, **common))
    assert np.allclose(_losses(a), _losses(b), rtol=1e-6, atol=1e-5), (_losses(a), _losses(b))


def test_flow_resume_with_condition_dropout_matches_the_uninterrupted_curve(data, tmp_path):
    """The task generator (condition dropout, flow noise and times) is checkpointed too."""
    flow = golden_dir() / "janusflow_tiny"
    common = dict(model=str(flow), tokenizer=str(tokenizer_for(flow)), data=[str(data / "t2i.jsonl")], task="flow",
                  steps=6, batch_size=4, lr=2e-3, warmup=1, device="cpu", save_every=2, prompt_dropout=0.5)
    a = run(TrainArgs(out=str(tmp_path / "a"), **common))
    run(TrainArgs(out=str(tmp_path / "b"), stop_after=3, **common))  # checkpoint at 2, step 3 is redone
    b = run(TrainArgs(out=str(tmp_path / "b"), resume=True, **common))
    assert np.allclose(_losses(a), _losses(b), rtol=1e-6, atol=1e-6), (_losses(a), _losses(b))


def test_generation_tasks_train(data, tmp_path):
    janus = golden_dir() / "janus_pro_tiny"
    for task in ("vq", "vq_tokenizer"):
        out = run(TrainArgs(model=str(janus), tokenizer=str(tokenizer_for(janus)), data=[str(data / "t2i.jsonl")],
                            out=str(tmp_path / task), task=task, steps=12, batch_size=4, lr=3e-3, warmup=1, device="cpu",
                            train="vq_head,language" if task == "vq" else "vq"))
        losses = _losses(out)
        assert losses[-1] < losses[0], (task, losses)
    flow = golden_dir() / "janusflow_tiny"
    out = run(TrainArgs(model=str(flow), tokenizer=str(tokenizer_for(flow)), data=[str(data / "t2i.jsonl")],
                        out=str(tmp_path / "flow"), task="flow", steps=12, batch_size=4, lr=2e-3, warmup=1, device="cpu"))
    losses = _losses(out)
    assert all(np.isfinite(losses)) and np.mean(losses[-4:]) < np.mean(losses[:4])


def test_lora_merge_equals_adapted_forward():
    from mmstack.apps.lora import add_lora, merge_lora

    pipe = mmstack.load(VL2, device="cpu", tokenizer=VL2_TOK)
    model = pipe.model
    add_lora(model, r=4, alpha=8, targets=["q_proj", "o_proj", "gate_proj"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)  # B starts at zero: make the adapters do something
    ids = torch.tensor([[1, 5, 9, 33, 2, 7]])
    before = pipe.logits(ids)
    merge_lora(model)
    assert not any("lora" in n for n, _ in model.named_parameters())
    after = pipe.logits(ids)
    assert (before - after).abs().max().item() <= 1e-4
    plain = mmstack.load(VL2, device="cpu", tokenizer=VL2_TOK).logits(ids)
    assert (plain - after).abs().max().item() > 1e-3  # the adapters changed the model


TWO_PROC = ["--model", str(VL2), "--tokenizer", str(VL2_TOK), "--steps", "4", "--batch-size", "4", "--lr", "2e-3",
            "--warmup", "1", "--device", "cpu", "--save-every", "2"]


def _finetune(out, *extra, procs: int = 1, port: int = 29517) -> None:
    """`python -m mmstack.apps.finetune` in a subprocess, under torchrun when procs > 1 (gloo on CPU)."""
    launch = ["-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-port", str(port)] if procs > 1 else []
    r = subprocess.run([sys.executable, *launch, "-m", "mmstack.apps.finetune", *TWO_PROC, *extra, "--out", str(out)],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def _checkpoint(out, scratch) -> dict:
    """A run's checkpoint with its DCP shards read whole (`model`, `optim`), through DCP's own (pickle) reader: for
    checkpoints this test wrote. `scratch`: a file to convert through."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    dcp_to_torch_save(out / "checkpoint" / state["shards"], scratch)
    return {**state, **torch.load(scratch, weights_only=False)}


@pytest.fixture(scope="module")
def one_process_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "out"
    _finetune(out, "--data", str(data / "data.jsonl"))
    return out


@pytest.fixture(scope="module")
def fsdp_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "out"
    _finetune(out, "--data", str(data / "data.jsonl"), "--parallel", "fsdp", procs=2, port=29518)
    return out


@pytest.mark.slow
def test_two_process_gloo_equals_one_process(data, one_process_run, tmp_path):
    _finetune(tmp_path / "two", "--data", str(data / "data.jsonl"), procs=2)
    assert np.allclose(_losses(one_process_run), _losses(tmp_path / "two"), atol=1e-5)


@pytest.mark.slow
def test_two_process_fsdp_equals_one_process_and_saves_the_same_files(one_process_run, fsdp_run, tmp_path):
    # fp32 on both sides; only the reduction order of the gradient average differs (rtol 1e-4 allows it)
    assert np.allclose(_losses(one_process_run), _losses(fsdp_run), rtol=1e-4, atol=1e-6), \
        (_losses(one_process_run), _losses(fsdp_run))
    norms = _losses(fsdp_run, "grad_norm")  # clip_grad_norm_ on sharded (DTensor) gradients
    assert min(norms) > 1.0 and np.allclose(_losses(one_process_run, "grad_norm"), norms, rtol=1e-4), norms
    init = mmstack.load(VL2, device="cpu", tokenizer=VL2_TOK).model.state_dict()
    ref = mmstack.load(one_process_run / "model", device="cpu").model.state_dict()
    got = mmstack.load(fsdp_run / "model", device="cpu").model.state_dict()
    assert ref.keys() == got.keys()
    # Adam turns a gradient of pure round-off (the key bias, which softmax ignores) into a step of up to
    # lr * |g| / eps, of either sign: per weight allow lr / 2; over all weights the two runs differ by
    # ~1e-4 of how far training moved them, allow 1e-3
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-3, msg=k)
    diff = sum(float((got[k] - ref[k]).square().sum()) for k in ref) ** 0.5
    moved = sum(float((ref[k] - init[k]).square().sum()) for k in ref) ** 0.5
    assert diff < 1e-3 * moved, (diff, moved)
    from safetensors import safe_open

    names = [sorted(safe_open(str(o / "model" / "model.safetensors"), "pt").keys()) for o in (one_process_run, fsdp_run)]
    assert names[0] == names[1]
    # the two checkpoints hold the same weights and optimizer state by name (so either resumes the other)
    a, b = (_checkpoint(o, tmp_path / n) for o, n in ((one_process_run, "a.pt"), (fsdp_run, "b.pt")))
    assert a["state"] == b["state"] and a["scheduler"] == b["scheduler"]
    assert a["model"].keys() == b["model"].keys()
    assert a["optim"]["param_groups"] == b["optim"]["param_groups"]
    assert a["optim"]["state"].keys() == b["optim"]["state"].keys()
    for i, s in a["optim"]["state"].items():
        for k, v in s.items():
            torch.testing.assert_close(b["optim"]["state"][i][k], v, rtol=1e-3, atol=1e-6, msg=f"{i}.{k}")


@pytest.mark.slow
def test_fsdp_resume_after_a_stop_matches_the_uninterrupted_fsdp_run(data, fsdp_run, tmp_path):
    common = ["--data", str(data / "data.jsonl"), "--parallel", "fsdp"]
    _finetune(tmp_path / "b", *common, "--stop-after", "3", procs=2, port=29519)  # "killed" after 3, saved at 2
    assert len(_losses(tmp_path / "b")) == 3
    _finetune(tmp_path / "b", *common, "--resume", procs=2, port=29519)
    assert np.allclose(_losses(fsdp_run), _losses(tmp_path / "b"), rtol=1e-6, atol=1e-5), \
        (_losses(fsdp_run), _losses(tmp_path / "b"))
    a, b = (_checkpoint(o, tmp_path / n)["optim"] for o, n in ((fsdp_run, "a.pt"), (tmp_path / "b", "b.pt")))
    assert a["state"].keys() == b["state"].keys()  # no state appears for weights that never had a gradient


@pytest.mark.slow
def test_fsdp_with_image_free_shares_of_a_batch_equals_one_process(data, tmp_path):
    # two examples in three without an image: some steps give a process no image, so the vision tower runs
    # on one rank only (it must then stay in the root FSDP group, or the ranks' collectives diverge)
    recs = [json.loads(line) for line in (data / "data.jsonl").read_text().splitlines()]
    for i in range(len(recs)):
        recs[i]["images"] = [str(data / f) for f in recs[i]["images"]]
        if i % 3:
            recs[i] = {"id": f"text{i}", "messages": [{"role": "user", "content": "Say a colour."},
                                                       {"role": "assistant", "content": "Blue."}]}
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    common = dict(model=str(VL2), tokenizer=str(VL2_TOK), data=[str(tmp_path / "mixed.jsonl")], steps=3, batch_size=4,
                  lr=2e-3, warmup=1, device="cpu")
    run(TrainArgs(out=str(tmp_path / "one"), **common))
    _finetune(tmp_path / "two", "--data", str(tmp_path / "mixed.jsonl"), "--steps", "3", "--parallel", "fsdp", procs=2,
              port=29520)
    assert np.allclose(_losses(tmp_path / "one"), _losses(tmp_path / "two"), rtol=1e-4, atol=1e-6)

"""Sharded (DCP) fine-tuning checkpoints: each FSDP rank writes its own shards, a checkpoint saved by two processes
resumes on one and one saved by one resumes on two (LoRA, routed experts included, under FSDP2), and the resumed
runs equal the uninterrupted ones (`--save adapter` under FSDP gathers the adapters alone); an interrupted save never
leaves a checkpoint that looks complete; checkpoints of earlier versions still resume; tampered
metadata is refused without running code."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mmstack
from golden import golden_dir
from mmstack.apps import sharded_checkpoint
from mmstack.apps.train import TrainArgs, run
from mmstack.errors import CheckpointError

VL2 = golden_dir() / "vl2_tiny_mla_moe"
VL2_TOK = golden_dir() / "vl2_tokenizer"
COMMON = dict(model=str(VL2), tokenizer=str(VL2_TOK), steps=4, batch_size=4, lr=2e-3, warmup=1, device="cpu",
              save_every=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    recs = []
    for i, (name, rgb) in enumerate([("red", (220, 30, 30)), ("green", (30, 200, 30)), ("blue", (30, 30, 220))] * 4):
        arr = (np.zeros((40 + i % 5, 56, 3)) + rgb + rng.integers(-20, 20, (40 + i % 5, 56, 3))).clip(0, 255)
        Image.fromarray(arr.astype(np.uint8)).save(d / f"im{i}.png")
        recs.append({"messages": [{"role": "user", "content": "<image>\nWhat colour is it?"},
                                  {"role": "assistant", "content": f"It is {name}."}], "images": [f"im{i}.png"]})
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d / "data.jsonl"


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _cli(kw: dict) -> list[str]:
    """TrainArgs keywords as `mmstack finetune` flags."""
    flags = []
    for k, v in kw.items():
        flag = f"--{k.replace('_', '-')}"
        if isinstance(v, bool):
            flags += [flag] if v else []
        else:
            flags += [flag, *([str(x) for x in v] if isinstance(v, list) else [str(v)])]
    return flags


def _two_processes(port: int, **kw) -> None:
    """`torchrun --nproc-per-node 2 -m mmstack.apps.finetune ... --parallel fsdp` (gloo on CPU)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "mmstack.apps.finetune", *_cli(kw), "--parallel", "fsdp"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def _assert_same_training(ref, got, init) -> None:
    """Equal state dicts up to the reduction order of a 2-process gradient average: Adam turns a gradient of pure
    round-off into a step of up to lr * |g| / eps of either sign, so per weight lr / 2, and over all weights 1e-3 of
    how far training moved them (what test_finetune's FSDP-equals-one-process check allows)."""
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-3, msg=k)
    diff = sum(float((got[k] - ref[k]).square().sum()) for k in ref) ** 0.5
    moved = sum(float((ref[k] - init[k]).square().sum()) for k in ref) ** 0.5
    assert moved > 0 and diff < 1e-3 * moved, (diff, moved)


@pytest.mark.slow
def test_fsdp_checkpoint_saved_by_two_processes_resumes_on_one_like_the_uninterrupted_run(data, tmp_path):
    common = dict(COMMON, data=[str(data)])
    ref = run(TrainArgs(out=str(tmp_path / "ref"), **common))
    out = tmp_path / "b"
    _two_processes(29531, out=str(out), stop_after=3, **common)  # "killed" after step 3, checkpoint at 2
    ckpt = out / "checkpoint"
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert state["shards"] == "shards-000002" and "model" not in state and "optimizer" not in state
    files = {p.name: p.stat().st_size for p in (ckpt / "shards-000002").iterdir()}
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= files.keys()
    # no gather: each rank wrote about half of the weights and optimizer state
    assert max(files["__0_0.distcp"], files["__1_0.distcp"]) < 0.7 * (files["__0_0.distcp"] + files["__1_0.distcp"])
    run(TrainArgs(out=str(out), resume=True, **common))  # one process: DCP reshards the two ranks' shards
    assert np.allclose(_losses(ref), _losses(out), rtol=1e-4, atol=1e-6), (_losses(ref), _losses(out))
    init = mmstack.load(VL2, device="cpu", tokenizer=VL2_TOK).model.state_dict()
    _assert_same_training(*(mmstack.load(o / "model", device="cpu").model.state_dict() for o in (ref, out)), init)


@pytest.mark.slow
def test_lora_on_stacked_experts_under_fsdp_resumes_across_world_sizes_and_saves_adapter_and_merged(data, tmp_path):
    from safetensors.torch import load_file

    common = dict(COMMON, data=[str(data)], lora_r=4, lora_alpha=8, save="both")  # default targets: routed experts too
    ref = run(TrainArgs(out=str(tmp_path / "ref"), **common))
    out = tmp_path / "b"
    run(TrainArgs(out=str(out), stop_after=3, **common))  # one process, checkpoint at 2
    assert not (out / "model").exists()
    _two_processes(29532, out=str(out), resume=True, **common)  # resumed on two processes, finished under FSDP2
    assert np.allclose(_losses(ref), _losses(out), rtol=1e-4, atol=1e-6), (_losses(ref), _losses(out))
    a, b = (load_file(str(o / "adapter" / "adapter_model.safetensors")) for o in (ref, out))
    assert any("experts" in k for k in a)  # the stacked experts were adapted
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-3, msg=k)
    b_only = [k for k in a if "lora_B" in k]  # B starts at zero: how far training moved the adapters
    _assert_same_training({k: a[k] for k in b_only}, {k: b[k] for k in b_only}, {k: 0 * a[k] for k in b_only})
    init = mmstack.load(VL2, device="cpu", tokenizer=VL2_TOK).model.state_dict()
    _assert_same_training(*(mmstack.load(o / "model", device="cpu").model.state_dict() for o in (ref, out)), init)
    ids = torch.tensor([[1, 5, 9, 33, 2, 7]])  # the adapter on the base equals the merged model
    via_adapter = mmstack.load(VL2, device="cpu", tokenizer=VL2_TOK, adapter=out / "adapter").logits(ids)
    torch.testing.assert_close(via_adapter, mmstack.load(out / "model", device="cpu").logits(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_fsdp_lora_from_scratch_equals_one_process_and_save_adapter_gathers_only_the_adapters(data, tmp_path):
    """From the first step under FSDP: A's gradient is exactly zero while B is zero, and A must still take that AdamW
    step as one process does (three steps: the first Adam step is sign-like, the difference shows from the third
    loss on); with gradient checkpointing, which re-runs the experts' LoRA parametrization in backward."""
    from safetensors.torch import load_file

    common = dict(COMMON, data=[str(data)], steps=3, lora_r=4, lora_alpha=8, save="adapter", gradient_checkpointing=True)
    ref = run(TrainArgs(out=str(tmp_path / "ref"), **common))
    _two_processes(29533, out=str(tmp_path / "two"), **common)
    assert np.allclose(_losses(ref), _losses(tmp_path / "two"), rtol=1e-4, atol=1e-6), \
        (_losses(ref), _losses(tmp_path / "two"))
    assert not (tmp_path / "two" / "model").exists()  # the adapter folder alone
    a, b = (load_file(str(o / "adapter" / "adapter_model.safetensors")) for o in (ref, tmp_path / "two"))
    assert a.keys() == b.keys() and any("experts" in k for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-3, msg=k)
    b_only = [k for k in a if "lora_B" in k]
    _assert_same_training({k: a[k] for k in b_only}, {k: b[k] for k in b_only}, {k: 0 * a[k] for k in b_only})


# ------------------------------------------------------------------------------------------ single process


def _trainer(step: int) -> dict:
    return {"scheduler": {}, "rng": {}, "state": {"step": step, "pos": {}}}


def _tiny():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    model[1].requires_grad_(False)  # frozen weights are not saved
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def _step(model, opt):
    opt.zero_grad()
    model(torch.ones(3, 4)).square().sum().backward()
    opt.step()


def _dies(*args, **kwargs):
    raise KeyboardInterrupt  # a kill


def test_an_interrupted_save_leaves_the_previous_checkpoint_and_nothing_that_looks_complete(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    model, opt = _tiny()
    _step(model, opt)
    sharded_checkpoint.save(tmp_path, model, opt, _trainer(2), 2)
    at_two = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, opt)

    def dies_while_writing(state, storage_writer, **kw):
        folder = Path(storage_writer.path)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "__0_0.distcp").write_bytes(b"half a shard")
        _dies()

    monkeypatch.setattr(dcp, "save", dies_while_writing)
    with pytest.raises(KeyboardInterrupt):
        sharded_checkpoint.save(tmp_path, model, opt, _trainer(4), 4)
    monkeypatch.undo()
    monkeypatch.setattr(sharded_checkpoint, "atomic_torch_save", _dies)
    with pytest.raises(KeyboardInterrupt):  # killed after the shard folder was renamed, before state.pt
        sharded_checkpoint.save(tmp_path, model, opt, _trainer(5), 5)
    monkeypatch.undo()
    assert {p.name for p in tmp_path.iterdir()} == {"state.pt", "shards-000002", ".tmp-shards-000004", "shards-000005"}

    fresh, fresh_opt = _tiny()
    saved = sharded_checkpoint.load(tmp_path, fresh, fresh, fresh_opt)
    assert saved["state"]["step"] == 2
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, at_two[k], rtol=0, atol=0)
    assert fresh_opt.state_dict()["state"][0]["step"] == 1  # the optimizer state of step 2 (one AdamW step)
    assert sharded_checkpoint.clean_stale_folders(tmp_path) == 1
    sharded_checkpoint.save(tmp_path, model, opt, _trainer(6), 6)
    assert {p.name for p in tmp_path.iterdir()} == {"state.pt", "shards-000006"}


def test_a_resumed_single_process_run_equals_the_uninterrupted_one_bitwise(tmp_path):
    model, opt = _tiny()
    ref, ref_opt = _tiny()
    for _ in range(2):
        _step(model, opt)
        _step(ref, ref_opt)
    sharded_checkpoint.save(tmp_path, model, opt, _trainer(2), 2)
    model, opt = _tiny()  # a new process: initial weights, no optimizer state
    sharded_checkpoint.load(tmp_path, model, model, opt)
    for _ in range(3):
        _step(model, opt)
        _step(ref, ref_opt)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_tampered_shard_metadata_is_refused_without_running_code(tmp_path):
    model, opt = _tiny()
    _step(model, opt)
    sharded_checkpoint.save(tmp_path, model, opt, _trainer(1), 1)
    marker = tmp_path / "executed"
    (tmp_path / "shards-000001" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match=r"\.metadata: cannot resume from it.*open is not allowed"):
        sharded_checkpoint.load(tmp_path, model, model, opt)
    assert not marker.exists()


def test_a_checkpoint_of_other_trainable_weights_is_refused_by_name(tmp_path):
    model, opt = _tiny()
    _step(model, opt)
    sharded_checkpoint.save(tmp_path, model, opt, _trainer(1), 1)
    other, _ = _tiny()
    other.requires_grad_(True)  # now trains the second layer too, which the checkpoint lacks
    with pytest.raises(CheckpointError, match=r"lacks 2 weight\(s\) this run trains \(1\.weight, 1\.bias\)"):
        sharded_checkpoint.load(tmp_path, other, other, torch.optim.AdamW(other.parameters()))


def test_a_checkpoint_of_an_earlier_version_with_full_tensors_still_resumes(tmp_path):
    model, opt = _tiny()
    _step(model, opt)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), **_trainer(1)}, tmp_path / "state.pt")
    fresh, fresh_opt = _tiny()
    assert sharded_checkpoint.load(tmp_path, fresh, fresh, fresh_opt)["state"]["step"] == 1
    for k, v in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v, rtol=0, atol=0)
    torch.testing.assert_close(fresh_opt.state_dict()["state"], opt.state_dict()["state"], rtol=0, atol=0)

"""`mmstack finetune --plan` against measurement: one real training step of each golden tiny model on CPU (the
trainer's own `LossModule`, trainable selection / LoRA and AdamW), its parameters, gradients and optimizer state
summed over storages after the step, and what autograd saved for the backward (`tests/apps/step_memory.py`)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from golden import golden_dir
from mmstack.apps.finetune_plan import memory_plan, model_config
from mmstack.loading import load_model
from step_memory import measure_step, understanding_batch

# The issue asks for 15%; the formula counts the same storages the measurement does, and what it leaves out (a few
# small index tensors, packed-weight gradient views) stays under 2% on every fixture: 5% still fails when a real
# term (an expert's copies, the attention probabilities, a norm's input) is wrong.
TOLERANCE = 0.05
FIXTURES = ["vl2_tiny_mla_moe", "vl2_tiny_mha_moe", "janus_pro_tiny"]
SEQ, IMAGES, TILES = 256, 2, (2, 1)


def _within(planned: int, measured: int, tol: float = TOLERANCE) -> bool:
    return abs(planned - measured) <= tol * measured


def _plan(folder, **kw):
    return memory_plan(folder, seq_len=SEQ, batch=1, images=IMAGES, tiles=TILES, device="cpu", autocast=False, **kw)


def _measure(folder, **kw):
    model = load_model(folder, device="cpu", dtype=torch.float32)
    batch = understanding_batch(model, SEQ, tiles=TILES, images=IMAGES)
    return measure_step(model, batch, **kw)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize("lora_r", [0, 8], ids=["full", "lora"])
@pytest.mark.parametrize("fixture", FIXTURES)
def test_plan_matches_a_measured_training_step(fixture, lora_r, checkpointing):
    folder = golden_dir() / fixture
    plan = _plan(folder, lora_r=lora_r, checkpointing=checkpointing)
    got = _measure(folder, lora_r=lora_r, checkpointing=checkpointing)
    rows = plan.bytes
    pairs = {"parameters": got.parameters, "gradients": got.gradients,
             "optimizer (AdamW: 2 fp32 states)": got.optimizer, "activations (saved for backward)": got.activations}
    for row, measured in pairs.items():
        assert _within(rows[row], measured), (row, rows[row], measured)
    measured_total = got.total
    if checkpointing:  # the backward recomputes one layer at a time: the largest one adds to the peak
        layer = _measure(folder, lora_r=lora_r, checkpointing=False).largest_layer
        assert _within(rows["one layer recomputed in backward"], layer), (rows["one layer recomputed in backward"], layer)
        measured_total += layer
    assert _within(plan.total, measured_total), (plan.total, measured_total)
    assert "bf16 weight copies (autocast)" not in rows  # fp32 on CPU: no copies


@pytest.mark.parametrize("lora_r", [0, 8], ids=["full", "lora"])
@pytest.mark.parametrize("fixture", FIXTURES)
def test_plan_under_bf16_autocast_matches_a_measured_step(fixture, lora_r):
    """The trainer's CUDA default, here as its `--dtype bf16` on the CPU: fp32 weights and residual stream, a bf16
    cast of each weight and of each Linear's input kept for the backward (measured as saved storages too)."""
    folder = golden_dir() / fixture
    plan = memory_plan(folder, seq_len=SEQ, batch=1, images=IMAGES, tiles=TILES, device="cpu", autocast=True,
                       lora_r=lora_r)
    got = _measure(folder, lora_r=lora_r, autocast=True)
    planned = plan.bytes["activations (saved for backward)"] + plan.bytes["bf16 weight copies (autocast)"]
    assert _within(planned, got.activations), (planned, got.activations)


@pytest.mark.parametrize("targets", ["attention", "attention,mlp,shared_experts"])
def test_plan_follows_the_lora_targets(targets):
    """Frozen routed experts keep less than adapted ones (no input copy, no W + BA): the plan knows which."""
    folder = golden_dir() / "vl2_tiny_mha_moe"
    plan = _plan(folder, lora_r=4, lora_targets=targets)
    got = _measure(folder, lora_r=4, targets=targets)
    assert _within(plan.bytes["activations (saved for backward)"], got.activations)
    assert _within(plan.bytes["gradients"], got.gradients, 0.01)


def test_longer_sequences_grow_the_plan_as_the_measurement_does():
    folder = golden_dir() / "vl2_tiny_mla_moe"
    short, long = (memory_plan(folder, seq_len=t, images=1, tiles=(1, 1), device="cpu", autocast=False) for t in (96, 384))
    measured = []
    for t in (96, 384):
        model = load_model(folder, device="cpu", dtype=torch.float32)
        measured.append(measure_step(model, understanding_batch(model, t, tiles=(1, 1))).activations)
    key = "activations (saved for backward)"
    growth_plan, growth_measured = long.bytes[key] - short.bytes[key], measured[1] - measured[0]
    assert _within(growth_plan, growth_measured)


def test_sharding_divides_the_state_and_real_variants_plan_on_the_meta_device():
    one = memory_plan("deepseek-vl2-small", lora_r=16, checkpointing=True, seq_len=4096)
    four = memory_plan("deepseek-vl2-small", lora_r=16, checkpointing=True, seq_len=4096, gpus=4, batch=4)
    assert four.bytes["parameters"] * 4 == pytest.approx(one.bytes["parameters"], rel=1e-6)
    assert four.bytes["optimizer (AdamW: 2 fp32 states)"] * 4 == pytest.approx(
        one.bytes["optimizer (AdamW: 2 fp32 states)"], rel=1e-6)
    assert four.bytes["FSDP gathered: root group + 2 layers"] > 0 and "FSDP gathered: root group + 2 layers" not in one.bytes
    # the released config: 2048 wide, 27 layers, 64 routed experts of 1408 (`mmstack.variants`)
    cfg = model_config("deepseek-vl2-small")
    assert one.parameters > 15e9 and cfg.language.num_layers == 27
    assert one.largest_layer["name"].endswith("(MoE)")
    assert one.setup["image_tokens"] == 1023  # a global view (14 x 15) + separator + 2x2 tiles (28 x 29)


def test_cli_plan_needs_no_data_and_prints_a_table_or_json(tmp_path):
    cmd = [sys.executable, "-m", "mmstack.apps.cli", "finetune", "--plan", "--model", "janus-pro-1b", "--lora-r", "8",
           "--seq-len", "1024", "--batch-size", "2"]
    table = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert "total" in table.stdout and "largest layer: language." in table.stdout
    js = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    data = json.loads(js.stdout)
    assert data["total"] == sum(data["bytes"].values()) and data["setup"]["image_tokens"] == 2 * 576
    bad = subprocess.run([sys.executable, "-m", "mmstack.apps.cli", "finetune", "--model", "x"], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert bad.returncode != 0 and "--data" in bad.stderr


@pytest.mark.parametrize("manifest", ["deepseek-vl2-tiny", "Janus-Pro-1B"])
def test_a_manifest_plans_as_its_variant_name(manifest):
    path = golden_dir() / "manifests" / f"{manifest}.json"
    assert memory_plan(path, seq_len=2048).bytes == memory_plan(manifest, seq_len=2048).bytes


@pytest.mark.gpu
@pytest.mark.parametrize("lora_r", [0, 8], ids=["full", "lora"])
def test_plan_on_cuda_matches_a_measured_step_and_the_allocator_peak(lora_r):
    """The CUDA path (fused attention, bf16 autocast) on a random-weight shrink of DeepSeek-VL2-small: the saved
    storages as on the CPU, and the allocator's peak, which adds transient buffers the plan does not list."""
    from mmstack import variants
    from mmstack.formats import read_config
    from mmstack.model import build_model

    cfg = read_config(variants.variant_config("deepseek-vl2-small", debug=True))
    model = build_model(cfg, "cuda", torch.float32)
    batch = understanding_batch(model.cpu(), 1024, tiles=(2, 2))
    model.cuda()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    got = measure_step(model, batch, lora_r=lora_r, autocast=True)
    peak = torch.cuda.max_memory_allocated() - base + got.parameters
    plan = memory_plan(cfg, lora_r=lora_r, seq_len=1024, batch=1, images=1, tiles=(2, 2), device="cuda")
    planned = plan.bytes["activations (saved for backward)"] + plan.bytes["bf16 weight copies (autocast)"]
    assert _within(planned, got.activations, TOLERANCE), (planned, got.activations)
    assert _within(plan.total, peak, 0.25), (plan.total, peak)

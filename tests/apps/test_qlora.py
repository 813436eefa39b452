"""QLoRA (`mmstack finetune --qlora`): the language model's weights in 4-bit NF4 (bitsandbytes), LoRA on top.

The 4-bit paths run on bitsandbytes' CPU backend here (>= 0.45; the trainer itself refuses --qlora off CUDA, so the
CPU runs below lift that one check); the CUDA run is a `gpu` test.

Tolerances. NF4 stores each weight as one of 16 levels scaled by its block of 64's largest |w|: the RMS error is
about 9% of the weights' RMS (0.089-0.093 measured on these uniform and on Gaussian weights), and one matmul's
output inherits it (bound 0.15), a SwiGLU expert's three matmuls in a row about twice that (0.20 measured, bound
0.3). A whole random tiny model amplifies it through its layers: with every weight exactly NF4 the fixture's logits
move by 0.41 relative to the bf16 base (int4 moves them 0.34, tests/test_quantize.py); on the CPU, where the Linear
layers 48 or 96 wide stay bf16 (bitsandbytes 0.50's CPU kernel dequantizes those wrong, see `apps.qlora`), by 0.26.
So comparisons across the 4-bit rounding get 0.5; comparisons on the same 4-bit weights (the 4-bit forward vs its
dequantized weights, the QLoRA model vs the adapter on its dequantized base, vs its merged model: 0.012-0.014
measured) are bf16 rounding, 0.03. The 4-bit weights take 0.258 of their bf16 bytes (codes, absmax, nested absmax).
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmstack
from colour_data import write_colour_data
from golden import golden_dir
from mmstack.adapters import WEIGHTS_FILE
from mmstack.apps import lora as lora_mod
from mmstack.apps.lora import add_lora, check_qlora, merge_lora, save_adapter
from mmstack.apps.qlora import NF4Experts, dequantize_base_nf4, is_nf4, quantize_base_nf4
from mmstack.apps.train import TrainArgs, run
from mmstack.llm.moe import Experts

VL2 = golden_dir() / "vl2_tiny_mla_moe"
VL2_TOK = golden_dir() / "vl2_tokenizer"
IDS = torch.tensor([[1, 5, 9, 33, 2, 7, 40, 12]])
TARGETS = ["attention", "mlp", "shared_experts", "routed_experts"]
ACROSS_NF4, SAME_WEIGHTS, ONE_MATMUL, SWIGLU = 0.5, 0.03, 0.15, 0.3


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def _bnb():
    return pytest.importorskip("bitsandbytes")


def _nf4_pipe():
    pipe = mmstack.load(VL2, device="cpu", dtype=torch.bfloat16, tokenizer=VL2_TOK)
    quantize_base_nf4(pipe.model)
    return pipe


def _loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model.language.logits(model.language(ids))  # [B,T,V]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@torch.no_grad()
def test_nf4_base_keeps_logits_within_nf4_error_and_holds_packed_4bit_weights():
    bnb = _bnb()
    pipe = mmstack.load(VL2, device="cpu", dtype=torch.bfloat16, tokenizer=VL2_TOK)
    base = pipe.logits(IDS)
    plain = {n: m for n, m in pipe.model.named_modules() if type(m) in (nn.Linear, Experts)}
    originals = {n: [t.detach().clone() for t in m.parameters()] for n, m in plain.items()}
    counts = quantize_base_nf4(pipe.model)
    # on the CPU the 6 Linear layers 48 or 96 wide stay bf16 (bitsandbytes' CPU kernel, see apps.qlora)
    assert counts == {"linear": 12, "experts": 2, "kept_on_cpu": 6} and is_nf4(pipe.model)
    assert not any(p.requires_grad for p in pipe.model.parameters())

    x = torch.randn(5, 64, dtype=torch.bfloat16)
    four_bit, bf16 = 0, 0
    for name, module in pipe.model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = originals[name][0]
            assert module.weight.dtype == torch.uint8 and module.weight.numel() == w.numel() // 2
            state = module.weight.quant_state
            four_bit += module.weight.numel() + state.absmax.numel() + 4 * state.state2.absmax.numel()
            bf16 += 2 * w.numel()
            xi = torch.randn(5, module.in_features, dtype=torch.bfloat16)
            assert _rel(module(xi), F.linear(xi, w)) < ONE_MATMUL, name
        elif isinstance(module, NF4Experts):
            for got, want in zip((module.dequantize("gate_up_proj"), module.dequantize("down_proj")), originals[name]):
                assert _rel(got, want) < 0.12, name  # ~0.09: NF4's rounding
            assert module.gate_up_proj_nf4.dtype == torch.uint8
            four_bit += sum(module.get_parameter(f"{n}_nf4").numel() + module.states[n].absmax.numel()
                            + 4 * module.states[n].state2.absmax.numel() for n in ("gate_up_proj", "down_proj"))
            bf16 += 2 * sum(t.numel() for t in originals[name])
            idx, weight = torch.randint(0, 8, (5, 3)), torch.rand(5, 3)
            ref = Experts(8, 64, 24, dtype=torch.bfloat16)
            ref.load_state_dict(dict(zip(("gate_up_proj", "down_proj"), originals[name])))
            err = _rel(module(x, idx, weight), ref(x, idx, weight))
            print(f"{name}: output relative error {err:.3f}")
            assert err < SWIGLU  # three NF4 matmuls in a row
    ratio = four_bit / bf16
    print(f"4-bit bytes / bf16 bytes of the quantized weights: {ratio:.3f}")
    assert 0.25 <= ratio < 0.27  # 0.5 byte codes + 1/64 absmax byte + 4/(64*256) nested fp32, over 2 bytes: 0.258

    nf4 = pipe.logits(IDS)
    err = _rel(nf4, base)
    print(f"NF4 logits relative error vs the bf16 base: {err:.3f}")
    assert err < ACROSS_NF4
    assert F.cosine_similarity(nf4.flatten(1).float(), base.flatten(1).float()).min() > 0.6
    dequantize_base_nf4(pipe.model)  # the 4-bit forward is the plain forward on the dequantized weights
    assert not is_nf4(pipe.model) and not any(isinstance(m, (bnb.nn.Linear4bit, NF4Experts))
                                              for m in pipe.model.modules())
    assert _rel(pipe.logits(IDS), nf4) < 1e-3


def test_lora_on_the_4bit_base_trains_every_adapter_and_no_base_weight():
    _bnb()
    pipe = _nf4_pipe()
    model = pipe.model.train()
    plan = add_lora(model, r=4, alpha=8, targets=TARGETS)
    bf16_total = sum(p.numel() for p in mmstack.load(VL2, device="cpu", tokenizer=VL2_TOK).model.parameters())
    assert plan.targets.parameters and plan.trainable > 0 and plan.total == bf16_total  # counted unquantized
    adapters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n and p.dtype == torch.float32 for n, p in adapters.items())  # fp32 masters
    ids = torch.randint(3, 400, (2, 12))
    opt = torch.optim.AdamW(adapters.values(), lr=3e-3)
    losses = []
    for step in range(5):
        opt.zero_grad()
        loss = _loss(model, ids)
        loss.backward()
        if step == 1:  # A's first gradient needs a B moved off zero by step 0
            zero = [n for n, p in adapters.items() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not zero, zero
            assert sum(".mlp.experts." in n for n in adapters) == 8  # A and B, two stacks, two MoE layers
            assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.5, losses


def test_zero_adapters_leave_the_4bit_base_and_the_saved_adapter_loads_on_the_base(tmp_path):
    _bnb()
    pipe = _nf4_pipe()
    nf4 = pipe.logits(IDS)
    plan = add_lora(pipe.model, r=4, alpha=8, targets=TARGETS)
    assert torch.equal(pipe.logits(IDS), nf4)  # B = 0
    with torch.no_grad():
        for n, p in pipe.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    qlora = pipe.logits(IDS)
    folder = save_adapter(pipe.model, plan, tmp_path / "adapter", base=str(VL2))

    # the same peft folder as LoRA on the bf16 base writes: the same keys and shapes, the same config
    ref = mmstack.load(VL2, device="cpu", tokenizer=VL2_TOK).model
    ref_plan = add_lora(ref, r=4, alpha=8, targets=TARGETS)
    ref_folder = save_adapter(ref, ref_plan, tmp_path / "ref", base=str(VL2))
    from safetensors.torch import load_file

    got, want = load_file(str(folder / WEIGHTS_FILE)), load_file(str(ref_folder / WEIGHTS_FILE))
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
    assert json.loads((folder / "adapter_config.json").read_text()) == \
        json.loads((ref_folder / "adapter_config.json").read_text())

    full = mmstack.load(VL2, device="cpu", tokenizer=VL2_TOK, adapter=folder).logits(IDS)
    base = mmstack.load(VL2, device="cpu", tokenizer=VL2_TOK).logits(IDS)
    print(f"adapter on the full-precision base vs the QLoRA model: {_rel(full, qlora):.3f} (its effect: "
          f"{_rel(full, base):.3f})")
    assert _rel(full, qlora) < ACROSS_NF4 and _rel(full, base) > 0.05  # loaded, and the adapter is there

    # on the very weights it trained against (the dequantized 4-bit base) the adapter gives the QLoRA model's logits
    from mmstack.loading import save_pretrained

    deq = _nf4_pipe()
    save_pretrained(dequantize_base_nf4(deq.model).eval(), tmp_path / "deq", tokenizer_dir=VL2_TOK)
    on_deq = mmstack.load(tmp_path / "deq", device="cpu", adapter=folder).logits(IDS)
    print(f"adapter on the dequantized base vs the QLoRA model: {_rel(on_deq, qlora):.4f}")
    assert _rel(on_deq, qlora) < SAME_WEIGHTS

    merge_lora(pipe.model)  # --save merged: a plain bf16 model, the adapters folded into the dequantized base
    assert not is_nf4(pipe.model) and not any("lora_" in n for n, _ in pipe.model.named_parameters())
    assert type(pipe.model.language.layers[1].mlp.experts) is Experts
    assert type(pipe.model.language.layers[1].self_attn.q_proj) is nn.Linear
    print(f"merged vs the QLoRA model: {_rel(pipe.logits(IDS), qlora):.4f}")
    assert _rel(pipe.logits(IDS), qlora) < SAME_WEIGHTS


def test_qlora_is_refused_on_cpu_without_lora_r_under_torchrun_and_without_bitsandbytes(data, tmp_path, monkeypatch):
    common = dict(model=str(VL2), tokenizer=str(VL2_TOK), data=[str(data / "data.jsonl")], device="cpu", steps=1)
    with pytest.raises(ValueError, match=r"^--qlora needs a CUDA device .* this run is on cpu: drop --qlora"):
        run(TrainArgs(out=str(tmp_path / "q"), qlora=True, lora_r=4, **common))
    with pytest.raises(ValueError, match="give --lora-r too"):
        check_qlora(torch.device("cuda"), 0)
    with pytest.raises(ValueError, match=r"--qlora runs in one process .* this run has 2"):
        check_qlora(torch.device("cuda"), 4, world=2)
    cli = [sys.executable, "-m", "mmstack.cli", "finetune", "--model", str(VL2), "--tokenizer", str(VL2_TOK),
           "--data", str(data / "data.jsonl"), "--out", str(tmp_path / "cli"), "--device", "cpu", "--qlora"]
    for extra in (["--lora-r", "4"], []):
        r = subprocess.run(cli + extra, capture_output=True, text=True)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().count("\n") == 0 and "--qlora needs a CUDA device" in r.stderr, r.stderr
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed, also where it is
    with pytest.raises(ImportError, match=r"^--qlora needs bitsandbytes: pip install bitsandbytes$"):
        check_qlora(torch.device("cuda"), 4)
    with pytest.raises(ImportError, match=r"^--qlora needs bitsandbytes: pip install bitsandbytes$"):
        quantize_base_nf4(nn.Linear(2, 2))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_colour_data(tmp_path_factory.mktemp("qlora_data"))


def _qlora_args(data, out, device: str, **kw) -> TrainArgs:
    return TrainArgs(model=str(VL2), tokenizer=str(VL2_TOK), data=[str(data / "data.jsonl")], out=str(out), steps=3,
                     batch_size=4, lr=1e-2, warmup=1, device=device, lora_r=4, lora_alpha=8, qlora=True, **kw)


def _metrics(out) -> list:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_qlora_run_on_the_cpu_backend_resumes_and_saves_adapter_and_merged_model(data, tmp_path, monkeypatch):
    """The trainer's QLoRA path end to end on bitsandbytes' CPU backend (only the CLI's CUDA check lifted)."""
    _bnb()
    check = lora_mod.check_qlora
    monkeypatch.setattr(lora_mod, "check_qlora", lambda device, r, world=1: check(torch.device("cuda"), r, world))
    whole = run(_qlora_args(data, tmp_path / "whole", "cpu", save="both"))
    run(_qlora_args(data, tmp_path / "cut", "cpu", save="both", stop_after=2))
    cut = run(_qlora_args(data, tmp_path / "cut", "cpu", save="both", resume=True))
    losses = [r["loss"] for r in _metrics(whole)]
    assert losses == [r["loss"] for r in _metrics(cut)]  # the 4-bit base is rebuilt the same on resume
    assert losses[-1] < losses[0]
    merged = mmstack.load(whole / "model", device="cpu").logits(IDS)
    on_base = mmstack.load(VL2, device="cpu", tokenizer=VL2_TOK, adapter=whole / "adapter").logits(IDS)
    print(f"run: adapter on the full-precision base vs the merged model: {_rel(on_base, merged):.3f}")
    assert _rel(on_base, merged) < ACROSS_NF4  # merged into the dequantized 4-bit base, the adapter on the original


@pytest.mark.gpu
def test_a_qlora_run_on_cuda_trains_and_its_adapter_loads(data, tmp_path):
    _bnb()
    out = run(_qlora_args(data, tmp_path / "o", "cuda", save="adapter"))
    assert len(_metrics(out)) == 3 and all(np.isfinite(r["loss"]) for r in _metrics(out))
    base = mmstack.load(VL2, device="cpu", tokenizer=VL2_TOK).logits(IDS)
    adapted = mmstack.load(VL2, device="cpu", tokenizer=VL2_TOK, adapter=out / "adapter").logits(IDS)
    assert _rel(adapted, base) > 1e-4  # three steps moved the adapters

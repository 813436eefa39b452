"""LoRA on every kind of weight (attention, dense and shared MLPs, the stacked routed experts), adapters as standard
peft folders loaded onto the base (`mmstack.load(base, adapter=...)`, `--adapter`), and QLoRA refused clearly.

Tolerances: fp32 throughout; a merged weight is W + scale * B @ A computed in another order than the adapted
forward, so logits agree to ~1e-6 (assert_close's fp32 defaults: rtol 1.3e-6, atol 1e-5)."""
from __future__ import annotations

import argparse
import json
import logging
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmstack
from colour_data import write_colour_data
from golden import golden_dir
from mmstack import AdapterError
from mmstack.adapters import WEIGHTS_FILE, read_adapter
from mmstack.apps.lora import add_lora, check_qlora, merge_lora, save_adapter
from mmstack.apps.train import TrainArgs, run
from mmstack.llm.moe import Experts

VL2 = golden_dir() / "vl2_tiny_mla_moe"
VL2_MHA = golden_dir() / "vl2_tiny_mha_moe"
VL2_TOK = golden_dir() / "vl2_tokenizer"
IDS = torch.tensor([[1, 5, 9, 33, 2, 7, 40, 12]])


class _Holder(nn.Module):  # peft cannot target parameters of the top-level module itself
    def __init__(self, experts: Experts):
        super().__init__()
        self.experts = experts


def _randomise_lora(model: nn.Module, std: float = 0.3) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, std)  # B starts at zero: make every adapter do something


def _unstacked_forward(x, idx, weight, gate_up: list, down: list) -> torch.Tensor:
    """The routed mixture with one plain matrix pair per expert, token by token (no stacking, no grouping)."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[n, k])
            g, u = F.linear(x[n], gate_up[e]).chunk(2)
            out[n] += weight[n, k] * F.linear(F.silu(g) * u, down[e])
    return out


def test_lora_on_stacked_experts_equals_the_same_update_on_unstacked_per_expert_matrices():
    E, H, I, N, K, r, alpha = 4, 16, 8, 12, 2, 3, 6
    holder = _Holder(Experts(E, H, I))
    base_gu, base_down = holder.experts.gate_up_proj.detach().clone(), holder.experts.down_proj.detach().clone()
    plan = add_lora(holder, r=r, alpha=alpha, targets=["experts.gate_up_proj", "experts.down_proj"])
    assert plan.targets.parameters == ["experts.gate_up_proj", "experts.down_proj"] and not plan.targets.modules
    _randomise_lora(holder)
    x = torch.randn(N, H)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(N)])
    weight = torch.rand(N, K)
    adapted = holder.experts(x, idx, weight)

    # the same update by hand, expert by expert: expert e owns rows e*r..(e+1)*r of A and columns e::E of B
    wrappers = {holder.experts.parameter_name: holder.experts, holder.experts.base_layer.parameter_name:
                holder.experts.base_layer}
    per_expert = {}
    for name, base in (("gate_up_proj", base_gu), ("down_proj", base_down)):
        w = wrappers[name]
        a, b = w.lora_A["default"].weight.detach(), w.lora_B["default"].weight.detach()
        assert a.shape == (E * r, base.shape[2]) and b.shape == (base.shape[1], r * E)
        per_expert[name] = [base[e] + alpha / r * b[:, e::E] @ a[e * r:(e + 1) * r] for e in range(E)]
    expected = _unstacked_forward(x, idx, weight, per_expert["gate_up_proj"], per_expert["down_proj"])
    torch.testing.assert_close(adapted, expected)
    assert (adapted - _unstacked_forward(x, idx, weight, list(base_gu), list(base_down))).abs().max() > 1e-2

    # one expert's pair touches that expert only: tokens routed elsewhere keep the base output
    with torch.no_grad():
        for w in wrappers.values():
            b = w.lora_B["default"].weight
            keep = b[:, 1::E].clone()
            b.zero_()
            b[:, 1::E] = keep
    only1 = holder.experts(x, idx, weight)
    plain = _unstacked_forward(x, idx, weight, list(base_gu), list(base_down))
    routed1 = (idx == 1).any(-1)
    torch.testing.assert_close(only1[~routed1], plain[~routed1])
    assert (only1[routed1] - plain[routed1]).abs().max() > 1e-3

    merge_lora(holder)
    assert type(holder.experts) is Experts and not any("lora" in n for n, _ in holder.named_parameters())
    torch.testing.assert_close(holder.experts(x, idx, weight), only1)


def test_default_targets_cover_attention_dense_and_shared_mlps_and_routed_experts():
    model = mmstack.load(VL2, device="cpu", tokenizer=VL2_TOK).model
    plan = add_lora(model, r=2, alpha=4, targets=TrainArgs.__dataclass_fields__["lora_targets"].default.split(","))
    m = plan.targets.matched
    assert set(m) == {"attention", "mlp", "shared_experts", "routed_experts"} and all(n > 0 for n in m.values()), m
    lora = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n in lora)
    for part in ("self_attn.kv_b_proj", "mlp.shared_experts.down_proj", "mlp.experts.lora_A", "mlp.experts.base_layer"):
        assert any(part in n for n in lora), part
    assert plan.trainable == sum(model.get_parameter(n).numel() for n in lora)
    assert f"trainable {plan.trainable:,} of" in plan.summary() and "routed_experts (" in plan.summary()


def test_lora_targets_matching_nothing_are_refused_and_a_typo_is_warned(caplog):
    model = mmstack.load(VL2, device="cpu", tokenizer=VL2_TOK).model
    with pytest.raises(ValueError, match=r"match no weight of this model: use the groups .*'routed_experts'"):
        add_lora(model, r=2, alpha=4, targets=["qproj", "experts.up"])
    with caplog.at_level(logging.INFO, logger="mmstack.apps.lora"):
        plan = add_lora(model, r=2, alpha=4, targets=["attention", "qproj"])
    assert plan.targets.matched["qproj"] == 0
    assert any(r.levelno == logging.WARNING and "'qproj' matches nothing" in r.getMessage() for r in caplog.records)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_colour_data(tmp_path_factory.mktemp("lora_data"))


@pytest.fixture(scope="module")
def lora_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_run") / "o"
    run(TrainArgs(model=str(VL2), tokenizer=str(VL2_TOK), data=[str(data / "data.jsonl")], out=str(out), steps=3,
                  batch_size=4, lr=1e-2, warmup=1, device="cpu", lora_r=4, lora_alpha=8, save="both"))
    return out


def test_routed_experts_receive_lora_updates_in_a_training_run(lora_run, capsys):
    from safetensors.torch import load_file

    tensors = load_file(str(lora_run / "adapter" / WEIGHTS_FILE))
    experts_b = {k: t for k, t in tensors.items() if ".mlp.experts." in k and k.endswith("lora_B.weight")}
    assert len(experts_b) == 4  # gate_up_proj and down_proj of both MoE layers
    for k, t in experts_b.items():  # B starts at zero: only a gradient step moves it
        assert t.abs().max() > 1e-4, k
    base = mmstack.load(VL2, device="cpu", tokenizer=VL2_TOK).model.state_dict()
    merged = mmstack.load(lora_run / "model", device="cpu").model.state_dict()
    for name in ("language.layers.1.mlp.experts.gate_up_proj", "language.layers.2.mlp.experts.down_proj"):
        delta = (merged[name] - base[name]).abs().amax(dim=(1, 2))  # per expert
        assert (delta > 1e-5).sum() >= 2, (name, delta)


def test_adapter_on_the_base_gives_the_merged_models_logits(lora_run):
    folder = lora_run / "adapter"
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["target_parameters"] and cfg["base_model_name_or_path"] == str(VL2)
    merged = mmstack.load(lora_run / "model", device="cpu").logits(IDS)
    on_base = mmstack.load(VL2, device="cpu", tokenizer=VL2_TOK, adapter=folder).logits(IDS)
    torch.testing.assert_close(on_base, merged)
    base = mmstack.load(VL2, device="cpu", tokenizer=VL2_TOK).logits(IDS)
    assert (base - merged).abs().max() > 1e-3  # the adapter changed the model

    from peft import PeftModel  # a standard folder: peft itself reads it onto the base too

    pipe = mmstack.load(VL2, device="cpu", tokenizer=VL2_TOK)
    PeftModel.from_pretrained(pipe.model, str(folder))
    torch.testing.assert_close(pipe.logits(IDS), merged)


def test_quantized_load_with_an_adapter_quantizes_the_merged_weights(lora_run):
    merged = mmstack.load(lora_run / "model", device="cpu", quantize="int8").logits(IDS)
    on_base = mmstack.load(VL2, device="cpu", tokenizer=VL2_TOK, adapter=lora_run / "adapter",
                           quantize="int8").logits(IDS)
    base = mmstack.load(VL2, device="cpu", tokenizer=VL2_TOK, quantize="int8").logits(IDS)
    # the same merged weights (to ~1e-7) quantized alike; atol allows a rare int8 rounding flip at a tie
    torch.testing.assert_close(on_base, merged, rtol=0, atol=1e-3)
    assert (base - merged).abs().max() > 0.1  # the adapter is there, not dropped


def test_finetune_flags_for_lora_targets_save_and_qlora():
    from mmstack.apps.train_args import add_arguments, from_namespace

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = from_namespace(p.parse_args(["--model", "m", "--data", "d", "--out", "o", "--lora-targets", "routed_experts",
                                        "--save", "both", "--qlora"]))
    assert (args.lora_targets, args.save, args.qlora) == ("routed_experts", "both", True)
    assert from_namespace(p.parse_args(["--model", "m", "--data", "d", "--out", "o"])).save == "merged"
    with pytest.raises(SystemExit):
        p.parse_args(["--model", "m", "--data", "d", "--out", "o", "--save", "lora"])


def test_wrong_or_damaged_adapters_are_refused_naming_the_file_and_key(lora_run, tmp_path):
    from safetensors.torch import load_file, save_file

    good = lora_run / "adapter"
    model = mmstack.load(VL2_MHA, device="cpu", tokenizer=VL2_TOK).model  # MHA: no MLA projections
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors: key '.*self_attn\.kv_\w+\.lora_A\.weight' names the "
                                           r"module .* which the base model lacks"):
        read_adapter(good, model)
    base = mmstack.load(VL2, device="cpu", tokenizer=VL2_TOK).model
    tensors = load_file(str(good / WEIGHTS_FILE))

    def variant(name: str, change, config=None):
        d = tmp_path / name
        d.mkdir()
        t = dict(tensors)
        change(t)
        save_file(t, str(d / WEIGHTS_FILE))
        cfg = json.loads((good / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
        return d

    key = next(k for k in tensors if "layers.1.mlp.experts.lora_A" in k)  # down_proj's A: [E*r, I]
    rows, cols = tensors[key].shape
    with pytest.raises(AdapterError, match=rf"{WEIGHTS_FILE}: '{key}' is \({rows}, {cols + 1}\) .*"
                                           rf"experts\.down_proj \(8, 64, 24\) needs \({rows}, {cols}\)"):
        read_adapter(variant("shape", lambda t: t.update({key: torch.zeros(rows, cols + 1)})), base)
    with pytest.raises(AdapterError, match=rf"'{key}' has no matching lora_B"):
        read_adapter(variant("half", lambda t: t.pop(key.replace("lora_A", "lora_B"))), base)
    with pytest.raises(AdapterError, match=r"key 'base_model.model.x.lora_magnitude_vector' is not a LoRA weight"):
        read_adapter(variant("dora", lambda t: t.update({"base_model.model.x.lora_magnitude_vector": torch.ones(2)})),
                     base)
    with pytest.raises(AdapterError, match=r"adapter_config.json: 'use_dora' = True is not supported"):
        read_adapter(variant("cfg", lambda t: None, {"use_dora": True}), base)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    (tmp_path / "bin" / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterError, match=r"no adapter_model.safetensors \(found \['adapter_model.bin'\]: only "
                                           r"safetensors adapters are read\)"):
        mmstack.load(VL2, device="cpu", tokenizer=VL2_TOK, adapter=tmp_path / "bin")
    with pytest.raises(AdapterError, match=rf"{VL2}: not a LoRA adapter folder \(no adapter_config.json\)"):
        read_adapter(VL2, base)


def test_adapter_flag_reaches_load_on_every_model_command():
    from mmstack.apps.model_args import add_model_arguments, load_kwargs

    p = argparse.ArgumentParser()
    add_model_arguments(p)
    assert load_kwargs(p.parse_args(["--adapter", "out/adapter"]))["adapter"] == "out/adapter"
    assert load_kwargs(p.parse_args([]))["adapter"] is None


def test_save_adapter_needs_lora_and_qlora_is_refused_clearly(data, tmp_path, monkeypatch):
    common = dict(model=str(VL2), tokenizer=str(VL2_TOK), data=[str(data / "data.jsonl")], device="cpu", steps=1)
    with pytest.raises(ValueError, match=r"--save adapter needs LoRA \(--lora-r\)"):
        run(TrainArgs(out=str(tmp_path / "a"), save="adapter", **common))
    with pytest.raises(ValueError, match=r"--qlora needs a CUDA device .* this run is on cpu"):
        run(TrainArgs(out=str(tmp_path / "q"), qlora=True, lora_r=4, **common))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed, also where it is
    with pytest.raises(ImportError, match=r"^--qlora needs bitsandbytes: pip install bitsandbytes$"):
        check_qlora(torch.device("cuda"), 4)
    with pytest.raises(ValueError, match="give --lora-r too"):
        check_qlora(torch.device("cuda"), 0)


def test_save_adapter_refuses_a_merged_model():
    model = mmstack.load(VL2, device="cpu", tokenizer=VL2_TOK).model
    plan = add_lora(model, r=2, alpha=4, targets=["attention"])
    merge_lora(model)
    with pytest.raises(ValueError, match="no LoRA adapters to save"):
        save_adapter(model, plan, "unused")


def test_an_adapter_nesting_the_expert_tensors_the_other_way_round_loads_the_same(lora_run, tmp_path):
    """peft versions differ in which stacked parameter's wrapper is outermost; the shapes decide where they can."""
    import shutil

    from safetensors.torch import load_file, save_file

    good = lora_run / "adapter"
    swapped = {}
    for k, t in load_file(str(good / WEIGHTS_FILE)).items():
        if ".experts.base_layer." in k:
            k = k.replace(".experts.base_layer.", ".experts.")
        elif ".experts." in k:
            k = k.replace(".experts.", ".experts.base_layer.")
        swapped[k] = t
    (tmp_path / "s").mkdir()
    save_file(swapped, str(tmp_path / "s" / WEIGHTS_FILE))
    shutil.copy(good / "adapter_config.json", tmp_path / "s")
    torch.testing.assert_close(mmstack.load(VL2, device="cpu", tokenizer=VL2_TOK, adapter=tmp_path / "s").logits(IDS),
                               mmstack.load(lora_run / "model", device="cpu").logits(IDS))

"""A LoRA adapter folder is data, like a model folder (round 3 of the adversarial cases, docs/limits.md): keys aimed at
parameters no LoRA matrix fits, tensor offsets safetensors itself refuses, and updates that overflow the merged
weights are each an `AdapterError` naming the file, and the model is left as it was."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mmstack.api import default_model_dir
from mmstack.adapters import CONFIG_FILE, WEIGHTS_FILE, merge_adapter, read_adapter
from mmstack.errors import AdapterError
from mmstack.loading import load_model

DEMO = default_model_dir()
O_PROJ = "language.layers.0.self_attn.o_proj"


@pytest.fixture(scope="module")
def base():
    return load_model(DEMO, device="cpu")


def _folder(path: Path, tensors: dict, **config) -> Path:
    path.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / WEIGHTS_FILE))
    (path / CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA", "lora_alpha": 4, "r": 2, **config}))
    return path


def _pair(module: str, a: torch.Tensor, b: torch.Tensor) -> dict:
    return {f"base_model.model.{module}.lora_A.weight": a, f"base_model.model.{module}.lora_B.weight": b}


def _o_proj_pair(base, scale: float = 0.1) -> dict:
    out_f, in_f = base.get_submodule(O_PROJ).weight.shape
    return _pair(O_PROJ, torch.randn(2, in_f) * scale, torch.randn(out_f, 2) * scale)


def test_targets_that_no_lora_matrix_fits_are_refused_by_name(base, tmp_path):
    norm = next(n for n, m in base.named_modules() if n.startswith("language.layers.0.") and n.endswith("norm")
                and len(list(m.parameters(recurse=False))) == 1)  # a 1-D weight
    width = base.get_submodule(norm).weight.shape[0]
    folder = _folder(tmp_path / "norm", _pair(norm, torch.zeros(2, width), torch.zeros(width, 2)),
                     target_parameters=["weight"])
    with pytest.raises(AdapterError, match=rf"{WEIGHTS_FILE}: .*{norm}\.weight \({width},\)"):
        read_adapter(folder, base)
    conv = next(n for n, m in base.named_modules() if isinstance(m, torch.nn.Conv2d))  # a 4-D weight
    folder = _folder(tmp_path / "conv", _pair(conv, torch.zeros(2, 3), torch.zeros(3, 2)), target_parameters=["weight"])
    with pytest.raises(AdapterError, match=rf"{WEIGHTS_FILE}: .*{conv}\.weight"):
        read_adapter(folder, base)


def test_offsets_that_safetensors_refuses_are_an_adapter_error(base, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA", "lora_alpha": 4}))
    n = 2 * 128 * 4
    key = f"base_model.model.{O_PROJ}.lora_%s.weight"
    header = json.dumps({key % "A": {"dtype": "F32", "shape": [2, 128], "data_offsets": [0, n]},
                         key % "B": {"dtype": "F32", "shape": [128, 2], "data_offsets": [0, n]}}).encode()  # overlapping
    (tmp_path / "a" / WEIGHTS_FILE).write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * n)
    with pytest.raises(AdapterError, match=rf"{WEIGHTS_FILE}: cannot read the tensors"):
        read_adapter(tmp_path / "a", base)


@pytest.mark.parametrize("dtype, alpha, scale", [(torch.float32, 1e308, 0.1), (torch.float32, 4, 1e30),
                                                 (torch.float16, 4, 1e4)])
def test_updates_that_overflow_the_merged_weights_are_refused_and_change_nothing(base, tmp_path, dtype, alpha, scale):
    model = load_model(DEMO, device="cpu", dtype=dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kv_out, kv_in = base.get_submodule("language.layers.0.self_attn.kv_b_proj").weight.shape
    small = _pair("language.layers.0.self_attn.kv_b_proj", torch.full((2, kv_in), 1e-3), torch.full((kv_out, 2), 1e-3))
    tensors = {**small, **{k: v * scale for k, v in _o_proj_pair(base).items()}}  # kv_b_proj sorts (and merges) first
    folder = _folder(tmp_path / "big", tensors, lora_alpha=alpha)
    with pytest.raises(AdapterError, match=r"overflows language\.layers\.0\.self_attn\.\w+\.weight in torch\.\w+ .*not be finite"):
        merge_adapter(model, folder)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing merged, not even kv_b_proj


def test_a_sound_adapter_still_merges(base, tmp_path):
    folder = _folder(tmp_path / "ok", _o_proj_pair(base))
    model = load_model(DEMO, device="cpu", adapter=folder)
    delta = model.get_submodule(O_PROJ).weight - base.get_submodule(O_PROJ).weight
    assert torch.isfinite(delta).all() and delta.abs().max() > 0


def test_float8_tensors_are_checked_for_nan_and_merge(base, tmp_path):
    folder = _folder(tmp_path / "f8", {k: v.to(torch.float8_e4m3fn) for k, v in _o_proj_pair(base).items()})
    (update,) = read_adapter(folder, base)  # torch has no isfinite for float8: checked in fp32
    assert torch.isfinite(update.delta()).all() and update.delta().abs().max() > 0

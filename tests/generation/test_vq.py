"""VQ-16 tokenizer against the official `gen_vision_model` goldens (decode of fixed codes, encode of a fixed
image) and the real Janus-Pro-7B parameter names/shapes. Tolerance: fp32 vs fp32 with different kernel order,
atol 1e-4 on outputs of scale ~1 (golden README); indices and uint8 pixels exactly."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from golden import golden_dir
from mmstack.generation.vq import VQ16, Upsample, VQConfig, VQModel, to_uint8

PREFIX = "gen_vision_model."
FIXTURES = sorted(p.parent for p in golden_dir().glob("*/vq.safetensors"))


def _golden_vq(folder) -> VQModel:
    cfg = json.loads((folder / "config.json").read_text())
    params = cfg["_golden_overrides"]["vq_model"][cfg["gen_vision_config"]["cls"]]
    model = VQModel(VQConfig.from_official(params))
    weights = load_file(folder / "model.safetensors")
    model.load_state_dict({k[len(PREFIX):]: v for k, v in weights.items() if k.startswith(PREFIX)}, strict=True)
    return model.eval()


def test_golden_vq_fixture_present():
    assert FIXTURES, f"no */vq.safetensors under {golden_dir()}"


@pytest.mark.parametrize("folder", FIXTURES, ids=[f"golden-{p.name}" for p in FIXTURES])
def test_decode_code_matches_golden(folder):
    g = load_file(folder / "vq.safetensors")
    vq = _golden_vq(folder)
    codes = g["codes"]  # [B, h*w]
    side = int(codes.shape[1] ** 0.5)
    with torch.no_grad():
        out = vq.decode_code(codes, shape=(codes.shape[0], vq.cfg.codebook_embed_dim, side, side))
        default = vq.decode_code(codes)
    torch.testing.assert_close(out, g["decoded"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(default, out, atol=0, rtol=0)
    assert torch.equal(to_uint8(g["decoded"]), g["decoded_uint8_hwc"])
    # our own pixels may only differ where a value sits within fp32 noise of an integer (truncation)
    assert (to_uint8(out).int() - g["decoded_uint8_hwc"].int()).abs().max() <= 1


@pytest.mark.parametrize("folder", FIXTURES, ids=[f"golden-{p.name}" for p in FIXTURES])
def test_encode_matches_golden(folder):
    g = load_file(folder / "vq.safetensors")
    vq = _golden_vq(folder)
    with torch.no_grad():
        pre = vq.pre_quant(g["encode_input"])
        quant, idx = vq.encode(g["encode_input"])
    torch.testing.assert_close(pre, g["encode_pre_quant"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(quant, g["encode_quant"], atol=1e-4, rtol=1e-4)
    assert torch.equal(idx, g["encode_indices"])


def test_to_uint8_truncates():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    # (0+1)/2*255 = 127.5 -> 127 and (0.999+1)/2*255 = 254.87 -> 254: truncation, not rounding
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 127, 254, 255, 255]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_upsample_keeps_half_precision_dtype(dtype):
    # the official Upsample returns bf16 for every non-fp32 input; ours returns the input dtype
    x = torch.randn(1, 4, 3, 3)
    up = Upsample(4)
    want = up(x)
    got = up.to(dtype)(x.to(dtype))
    assert got.dtype == dtype and got.shape == (1, 4, 6, 6)
    torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2)


def test_golden_manifest_vq16_names_and_shapes():
    manifest = json.loads((golden_dir() / "manifests" / "Janus-Pro-7B.json").read_text())
    want = {k[len(PREFIX):]: tuple(v["shape"]) for k, v in manifest["state_dict"].items() if k.startswith(PREFIX)}
    got = {k: tuple(v.shape) for k, v in VQModel(VQ16, device="meta").state_dict().items()}
    assert got == want
    assert manifest["state_dict"][PREFIX + "quantize.codebook_used"]["kind"] == "buffer"

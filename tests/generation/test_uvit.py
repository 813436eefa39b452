"""JanusFlow ShallowUViT encoder/decoder against the official goldens: t_emb, and one full velocity
evaluation (encoder -> aligner -> LLM -> aligner norm/linear -> decoder, with CFG) as the README/app
`generate()` step; plus the real JanusFlow-1.3B parameter names/shapes. Tolerance atol/rtol 1e-4: the
official fp32 run is within 1.4e-6 of fp64 on velocities of scale ~3 (golden meta.json)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from golden import golden_dir
from mmstack.generation.uvit import (JANUSFLOW_DECODER, JANUSFLOW_ENCODER, ShallowUViTDecoder, ShallowUViTEncoder,
                                     UViTDecoderConfig, UViTEncoderConfig)
from mmstack.llm.norm import RMSNorm
from mmstack.loading import load_model

ENC, DEC = "vision_gen_enc_model.", "vision_gen_dec_model."
FIXTURES = sorted(p.parent for p in golden_dir().glob("*/config.json")
                  if "vision_gen_enc_config" in json.loads(p.read_text()))
IDS = [f"golden-{p.name}" for p in FIXTURES]


def _sub(weights: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def _linear(weights: dict, prefix: str) -> nn.Linear:
    w = weights[prefix + "weight"]
    layer = nn.Linear(w.shape[1], w.shape[0])
    layer.load_state_dict(_sub(weights, prefix), strict=True)
    return layer


def _build(folder):
    cfg = json.loads((folder / "config.json").read_text())
    weights = load_file(folder / "model.safetensors")
    enc = ShallowUViTEncoder(UViTEncoderConfig.from_official(cfg["vision_gen_enc_config"]["params"]))
    dec = ShallowUViTDecoder(UViTDecoderConfig.from_official(cfg["vision_gen_dec_config"]["params"]))
    enc.load_state_dict(_sub(weights, ENC), strict=True)
    dec.load_state_dict(_sub(weights, DEC), strict=True)
    return cfg, weights, enc.eval(), dec.eval()


def test_golden_janusflow_fixture_present():
    assert FIXTURES, f"no JanusFlow config.json under {golden_dir()}"


@pytest.mark.parametrize("folder", FIXTURES, ids=IDS)
def test_encoder_t_emb_matches_golden(folder):
    _, _, enc, _ = _build(folder)
    io = load_file(folder / "io.safetensors")
    z = torch.cat([io["z_t"], io["z_t"]])
    with torch.no_grad():
        _, t_emb, _ = enc(z, io["t"].expand(z.shape[0]))
    torch.testing.assert_close(t_emb, io["t_emb"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("folder", FIXTURES, ids=IDS)
def test_velocity_with_cfg_matches_golden(folder):
    cfg, weights, enc, dec = _build(folder)
    io = load_file(folder / "io.safetensors")
    cfg_weight = json.loads((folder / "meta.json").read_text())["cfg_weight"]
    lm = load_model(folder, device="cpu", dtype=torch.float32, language_only=True).language
    enc_aligner = _linear(weights, "vision_gen_enc_aligner.")
    dec_aligner = _linear(weights, "vision_gen_dec_aligner.")
    norm = RMSNorm(lm.cfg.hidden_size, cfg["language_config"]["rms_norm_eps"])
    norm.load_state_dict(_sub(weights, "vision_gen_dec_aligner_norm."), strict=True)

    z = torch.cat([io["z_t"], io["z_t"]])  # [2B,4,H,W]: conditional rows first, then unconditional
    with torch.no_grad():
        x, t_emb, hs = enc(z, io["t"].expand(z.shape[0]))
        b, c, g, _ = x.shape
        z_emb = enc_aligner(x.flatten(2).transpose(1, 2))  # [2B,g*g,D]
        torch.testing.assert_close(z_emb, io["z_emb_aligned"], atol=1e-4, rtol=1e-4)
        seq = torch.cat([io["gen_inputs_embeds"], t_emb[:, None], z_emb], dim=1)  # [2B,L'+1+g*g,D]
        # the official loop calls the HF LlamaModel directly: positions 0..T-1 whatever the mask says
        positions = torch.arange(seq.shape[1])[None].expand(b, -1)
        h = lm(inputs_embeds=seq, attention_mask=io["gen_attention_mask"], positions=positions)[:, -g * g:]
        h = dec_aligner(norm(h)).reshape(b, g, g, c).permute(0, 3, 1, 2)  # [2B,C,g,g]
        v = dec(h, hs, t_emb)  # [2B,4,H,W]
    v_cond, v_uncond = v.chunk(2)
    torch.testing.assert_close(v_cond, io["v_cond"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(v_uncond, io["v_uncond"], atol=1e-4, rtol=1e-4)
    v_cfg = cfg_weight * v_cond - (cfg_weight - 1) * v_uncond
    torch.testing.assert_close(v_cfg, io["v_cfg"], atol=1e-4, rtol=1e-4)


def test_golden_manifest_janusflow_uvit_names_and_shapes():
    manifest = json.loads((golden_dir() / "manifests" / "JanusFlow-1.3B.json").read_text())
    cfg = manifest["config"]
    enc_cfg = UViTEncoderConfig.from_official(cfg["vision_gen_enc_config"]["params"])
    dec_cfg = UViTDecoderConfig.from_official(cfg["vision_gen_dec_config"]["params"])
    for prefix, module in ((ENC, ShallowUViTEncoder(enc_cfg, device="meta")),
                           (DEC, ShallowUViTDecoder(dec_cfg, device="meta"))):
        want = {k[len(prefix):]: tuple(v["shape"]) for k, v in manifest["state_dict"].items() if k.startswith(prefix)}
        assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == want


def test_golden_manifest_janusflow_presets_match_config():
    cfg = json.loads((golden_dir() / "manifests" / "JanusFlow-1.3B.json").read_text())["config"]
    assert UViTEncoderConfig.from_official(cfg["vision_gen_enc_config"]["params"]) == JANUSFLOW_ENCODER
    assert UViTDecoderConfig.from_official(cfg["vision_gen_dec_config"]["params"]) == JANUSFLOW_DECODER

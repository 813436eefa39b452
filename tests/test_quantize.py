"""Weight-only quantization (`mmstack.quantize`, `mmstack.load(quantize=...)`).

Exactness of the pieces (rounding bound, int4 packing, every kernel path against dequantize + matmul), the
drift of whole quantized models against the official golden logits (fp32 reference code), and what refuses a
quantized model. The drift bounds are the values measured on these fixtures when this was written (torch
2.14, CPU) with a margin; each test prints its measurement:

    fixture                 int8: rel err  top-1  min cos    int4: rel err  top-1  min cos
    janus_pro_tiny                  0.020  0.966  0.9993            0.355  0.517  0.808
    janusflow_tiny                  0.020  0.952  0.9994            0.288  0.618  0.888
    vl2_tiny_mha_moe                0.021  0.971  0.9962            0.266  0.614  0.929
    vl2_tiny_mla_moe                0.065  0.929  0.9251            0.344  0.543  0.779
    vl2_tiny_mla_moe_qlora          0.045  1.000  0.9762            0.322  0.743  0.877

Random tiny models have nearly tied logits, so top-1 flips more often than on trained weights (on the
embedded trained model int8 keeps every held-out score: `mmstack bench quant`).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import mmstack
from golden import lm_fixtures
from mmstack import kernels
from mmstack.decoding import SamplingParams, generate_ids
from mmstack.llm.moe import Experts
from mmstack.loading import load_model
from mmstack.quantize import (QuantExperts, QuantLinear, QuantWeight, dequantize_weight, quantize_model,
                              quantize_weight, weight_bytes)

FIXTURES = lm_fixtures()
BOUNDS = {"int8": dict(rel=0.10, top1=0.90, cos=0.90), "int4": dict(rel=0.45, top1=0.45, cos=0.70)}


def test_int8_rounding_is_within_half_a_step():
    w = torch.randn(32, 80) * torch.linspace(0.01, 3, 32)[:, None]
    q, scale = quantize_weight(w, "int8")
    assert q.dtype == torch.int8 and scale.shape == (32,)
    err = (dequantize_weight(q, scale, "int8", torch.float32) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-6).all()


def test_int4_values_on_the_grid_round_trip_exactly_and_pack_low_nibble_first():
    g = 16
    step = torch.rand(8, 64 // g) + 0.5  # one step per group
    levels = torch.randint(-7, 8, (8, 64))  # symmetric: a group's largest |w| is 7 steps
    levels[:, ::g] = 7  # each group reaches +7: its range is exactly 7 steps
    w = levels * step.repeat_interleave(g, 1)
    q, scale = quantize_weight(w, "int4", group=g)
    assert q.shape == (8, 32) and q.dtype == torch.uint8
    assert torch.equal(q[:, 0] & 0xF, (levels[:, 0] + 8).to(torch.uint8))
    assert torch.equal(q[:, 0] >> 4, (levels[:, 1] + 8).to(torch.uint8))
    torch.testing.assert_close(dequantize_weight(q, scale, "int4", torch.float32), w, rtol=1e-6, atol=1e-6)


def test_int4_clipping_never_increases_a_groups_error():
    w = torch.randn(16, 128)
    w[:, 3] = 40.0  # one outlier per row: clipping its group's range lowers that group's error
    q, scale = quantize_weight(w, "int4")
    err = (dequantize_weight(q, scale, "int4", torch.float32) - w).square().view(16, 2, 64).sum(-1)
    amax = w.abs().view(16, 2, 64).amax(-1)
    plain = ((torch.round(w.view(16, 2, 64) / (amax / 7)[..., None]).clamp(-8, 7) * (amax / 7)[..., None]
              - w.view(16, 2, 64)).square().sum(-1))
    assert (err <= plain + 1e-5).all()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("shape", [(64, 128), (48, 96), (10, 24)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rows", [1, 5, 70])
def test_every_matmul_path_equals_dequantize_then_matmul(scheme, shape, rows):
    """CPU fused kernels (bf16 inputs, chunked rows), and the dequantize path, against F.linear on the
    dequantized weight in fp64."""
    torch.manual_seed(0)
    lin = nn.Linear(shape[1], shape[0], bias=True)
    ql = QuantLinear(lin, scheme=scheme)
    x = torch.randn(rows, shape[1])
    want = F.linear(x.double(), ql.weight.double(), lin.bias.double())
    for grad in (False, True):  # no grad: the fused kernels where they apply; grad: dequantize + F.linear
        with torch.set_grad_enabled(grad):
            got = ql(x)
        tol = 2e-2 if ql.qweight.fused and not grad else 1e-5  # bf16 inputs on the fused kernels
        assert (got.double() - want).abs().max() <= tol * want.abs().max(), (ql.qweight, grad)


def test_int4_widths_the_cpu_kernel_cannot_take_fall_back():
    assert QuantWeight(torch.randn(64, 128), "int4").layout == "cpu_int4"
    assert QuantWeight(torch.randn(10, 128), "int4").layout == "portable"  # 10 rows: not a multiple of 16
    w = QuantWeight(torch.randn(16, 12), "int4")  # no int4 group divides 12: int8
    assert (w.scheme, w.fused) == ("int8", False)  # torch's int8 kernel needs widths divisible by 16


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_quantized_experts_equal_the_moe_kernel_on_their_dequantized_weights(scheme, tokens):
    torch.manual_seed(1)
    ex = Experts(8, 64, 32)
    qe = QuantExperts(ex, scheme)
    x = torch.randn(tokens, 64)
    idx = torch.stack([torch.randperm(8)[:2] for _ in range(tokens)])
    wt = torch.rand(tokens, 2)
    want = kernels.moe(x.double(), idx, wt, qe.gate_up_proj.double(), qe.down_proj.double())
    with torch.no_grad():
        got = qe(x, idx, wt)
    assert (got.double() - want).abs().max() <= 2e-2 * want.abs().max()
    got = qe(x, idx, wt)  # grad enabled: dequantize only the routed experts
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def _drift(fx, scheme):
    lm = load_model(fx.model_dir, device="cpu", dtype=torch.float32, language_only=True, quantize=scheme).language
    io, p = load_file(fx.file), fx.prefix
    with torch.no_grad():
        logits = lm.logits(lm(inputs_embeds=io[f"{p}inputs_embeds"], attention_mask=io[f"{p}attention_mask"]))
    keep = io[f"{p}attention_mask"].bool()
    a, b = logits[keep], io[f"{p}logits"][keep]
    m = dict(rel=((a - b).norm() / b.norm()).item(), top1=(a.argmax(-1) == b.argmax(-1)).float().mean().item(),
             cos=F.cosine_similarity(a, b, -1).min().item())
    if fx.has_greedy:
        want = io[f"{p}greedy_new_tokens"].flatten()
        got = torch.stack(list(generate_ids(lm, SamplingParams(max_new_tokens=len(want), temperature=0.0),
                                            inputs_embeds=io[f"{p}inputs_embeds"],
                                            attention_mask=io[f"{p}attention_mask"])))[:, 0]
        m["greedy"] = f"{int((got == want).sum())}/{len(want)}"
    return lm, m


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("fx", FIXTURES, ids=[f.id for f in FIXTURES])
def test_quantized_golden_models_stay_close_to_the_official_logits(fx, scheme):
    lm, m = _drift(fx, scheme)
    print(f"{fx.id} {scheme}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in m.items()))
    bound = BOUNDS[scheme]
    assert m["rel"] <= bound["rel"] and m["top1"] >= bound["top1"] and m["cos"] >= bound["cos"], m
    assert any(isinstance(x, QuantLinear) for x in lm.modules())


def test_only_decoder_linears_and_experts_are_quantized():
    fx = next(f for f in FIXTURES if f.model_type == "deepseek_vl_v2")
    full = load_model(fx.model_dir, device="cpu", dtype=torch.float32)
    model = load_model(fx.model_dir, device="cpu", dtype=torch.float32, quantize="int8")
    kept = {n: t for n, t in full.state_dict().items()
            if not n.startswith("language.layers.") or any(k in n for k in ("norm", "gate.weight", "kv_b_proj"))}
    have = model.state_dict()
    for n, t in kept.items():  # embeddings, heads, norms, routers, kv_b_proj, vision, projector: untouched
        assert n in have and torch.equal(have[n], t), n
    assert model.quantization == "int8"
    assert weight_bytes(model.language) < 0.6 * weight_bytes(full.language)
    assert sum(isinstance(m, QuantExperts) for m in model.modules()) == sum(
        isinstance(m, Experts) for m in full.modules())


def test_quantize_model_counts_and_refuses_unknown_schemes():
    fx = next(f for f in FIXTURES if f.model_type == "deepseek_vl_v2")
    model = load_model(fx.model_dir, device="cpu", dtype=torch.float32)
    counts = quantize_model(model, "int4")
    assert counts["linear"] > 0 and counts["experts"] > 0
    with pytest.raises(ValueError, match="quantize must be one of"):
        mmstack.load(fx.model_dir, device="cpu", quantize="fp8")


def test_training_lora_and_export_refuse_a_quantized_model(tmp_path):
    from mmstack.apps.lora import add_lora
    from mmstack.export import export_pretrained, save_pretrained
    from mmstack.training import vq_generation_loss

    fx = next(f for f in FIXTURES if f.model_type == "deepseek_vl_v2")
    model = load_model(fx.model_dir, device="cpu", dtype=torch.float32, quantize="int8")
    for call in (lambda: save_pretrained(model, tmp_path / "a"),
                 lambda: export_pretrained(model, tmp_path / "b", fmt="deepseek_vl_v2"),
                 lambda: add_lora(model, 4, 8, ["q_proj"]),
                 lambda: vq_generation_loss(model, None, None, None)):
        with pytest.raises(ValueError, match="loaded with quantize='int8': load it again without quantize"):
            call()
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_embedded_model_answers_the_same_in_int8(tmp_path):
    """The trained embedded model: int8 gives the full-precision model's greedy answer on in-domain images, but for
    near-ties. v6 is unsure of some shapes (caption score 0.58), and int8's rounding flips 2 of these 20 captions
    ("triangle" / "square"); a broken int8 path agrees on none."""
    from mmstack.api import default_model_dir
    from mmstack.apps import synth

    d = default_model_dir()
    synth.generate(tmp_path, 20, seed=5, kinds=("scene",), image_size=64, progress=False)
    images = sorted((tmp_path / "images").glob("*.png"))
    full, q8 = mmstack.load(d), mmstack.load(d, quantize="int8")
    a = [full.describe(im, max_new_tokens=24) for im in images]
    b = [q8.describe(im, max_new_tokens=24) for im in images]
    print([(x, y) for x, y in zip(a, b) if x != y])
    assert all(a) and all(b)
    assert sum(x == y for x, y in zip(a, b)) >= 0.8 * len(a), list(zip(a, b))

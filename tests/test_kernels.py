"""Every kernel backend against its plain reference (the seam's contract)."""
from __future__ import annotations

import pytest
import torch

from mmstack import kernels
from mmstack.kernels import KERNELS, use_backend
from mmstack.kernels.sampling import apply_repetition_penalty, cfg_combine, logits_to_probs


def _routing(n, e, k):
    scores = torch.rand(n, e)
    idx = torch.topk(scores, k, dim=-1).indices
    return idx, torch.rand(n, k)


@pytest.mark.parametrize("backend", ["grouped", "gather", "indexed"])
@pytest.mark.parametrize("n,e,k", [(1, 8, 2), (3, 8, 3), (37, 16, 4), (5, 64, 6)])
def test_moe_backend_matches_expert_loop(backend, n, e, k):
    h, i = 24, 16
    x = torch.randn(n, h)
    idx, w = _routing(n, e, k)
    wgu, wd = torch.randn(e, 2 * i, h) * 0.2, torch.randn(e, h, i) * 0.2
    ref = kernels.moe.get("reference")(x, idx, w, wgu, wd)
    out = kernels.moe.get(backend)(x, idx, w, wgu, wd)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_moe_grouped_segment_fallback_matches(monkeypatch):
    """Without torch's grouped_mm the grouped backend loops over active segments only."""
    from mmstack.kernels import torch_backends

    monkeypatch.setattr(torch_backends, "_GROUPED_MM", None)
    x = torch.randn(20, 12)
    idx, w = _routing(20, 8, 2)
    wgu, wd = torch.randn(8, 16, 12), torch.randn(8, 12, 8)
    torch.testing.assert_close(torch_backends.moe_grouped(x, idx, w, wgu, wd),
                               kernels.moe.get("reference")(x, idx, w, wgu, wd), atol=1e-5, rtol=1e-5)


def test_moe_dispatch_selects_by_size_and_device():
    """Decode-sized calls take the host-indexed path on CPU (gathering weights copies them: slower there)
    and the gathered, sync-free path on CUDA; larger calls sort into segments."""
    x = torch.randn(2, 8)
    assert kernels.moe.select(x, torch.zeros(2, 2, dtype=torch.long)) == "indexed"
    assert kernels.moe.select(x, torch.zeros(64, 6, dtype=torch.long)) == "grouped"
    with use_backend("moe", "reference"):
        assert kernels.moe.select(x, torch.zeros(2, 2, dtype=torch.long)) == "reference"


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("t,s", [(7, 7), (1, 9), (3, 10)])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_sdpa_matches_reference(heads, kv_heads, t, s, masked):
    b, d = 2, 16
    q, k, v = torch.randn(b, heads, t, d), torch.randn(b, kv_heads, s, d), torch.randn(b, kv_heads, s, d)
    mask = None
    keep = torch.ones(b, s, dtype=torch.bool)
    if masked:
        keep[1, :3] = False  # left padding of row 1
        mask = torch.zeros(b, 1, t, s).masked_fill(~keep[:, None, None, :], torch.finfo(torch.float32).min)
    for causal in (False, True):
        ref = kernels.attention.get("reference")(q, k, v, mask=mask, causal=causal, scale=0.3)
        out = kernels.attention.get("sdpa")(q, k, v, mask=mask, causal=causal, scale=0.3)
        assert torch.isfinite(out).all() and torch.isfinite(ref).all()
        # queries that see at least one key must agree; fully masked (padding) queries are unspecified
        sees = keep[:, None, :] & (torch.ones(t, s, dtype=torch.bool).tril(s - t) if causal else torch.ones(t, s, dtype=torch.bool))
        rows = sees.any(-1)  # [B,T]
        torch.testing.assert_close(out.transpose(1, 2)[rows], ref.transpose(1, 2)[rows], atol=1e-5, rtol=1e-5)


def test_mla_decode_equals_expanded_attention():
    """Absorbed attention on the latent equals softmax attention with keys/values expanded by W_UK/W_UV."""
    b, h, t, s, c, r, p, vd = 2, 4, 3, 9, 16, 8, 12, 10
    q_nope, q_pe = torch.randn(b, h, t, p), torch.randn(b, h, t, r)
    latent, k_pe = torch.randn(b, s, c), torch.randn(b, s, r)
    w_uk, w_uv = torch.randn(h, p, c) * 0.3, torch.randn(h, vd, c) * 0.3
    k = torch.cat([torch.einsum("bsc,hpc->bhsp", latent, w_uk), k_pe[:, None].expand(b, h, s, r)], -1)
    v = torch.einsum("bsc,hvc->bhsv", latent, w_uv)
    ref = kernels.attention.get("reference")(torch.cat([q_nope, q_pe], -1), k, v, scale=0.2)
    o_lat = kernels.mla_decode(torch.einsum("bhtp,hpc->bhtc", q_nope, w_uk), q_pe, latent, k_pe, None, 0.2)
    torch.testing.assert_close(torch.einsum("bhtc,hvc->bhtv", o_lat, w_uv), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t,masked", [(1, False), (1, True), (4, True)])
def test_mla_decode_bmm_backend_matches_reference(t, masked):
    b, h, s, c, r = 2, 4, 13, 16, 8
    q_lat, q_pe = torch.randn(b, h, t, c), torch.randn(b, h, t, r)
    latent, k_pe = torch.randn(b, s, c), torch.randn(b, s, r)
    mask = None
    if masked:
        keep = torch.ones(b, 1, t, s, dtype=torch.bool).tril(s - t)
        keep[1, ..., :4] = False
        mask = torch.zeros(b, 1, t, s).masked_fill(~keep, torch.finfo(torch.float32).min)
    ref = kernels.mla_decode.get("reference")(q_lat, q_pe, latent, k_pe, mask, 0.25)
    out = kernels.mla_decode.get("bmm")(q_lat, q_pe, latent, k_pe, mask, 0.25)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("style", ["neox", "interleaved"])
@pytest.mark.parametrize("tables", ["btd", "b1td", "fp32_tables_bf16_x"])
def test_rope_addcmul_backend_matches_reference(style, tables):
    x = torch.randn(2, 5, 3, 16)
    f = torch.randn(2, 3, 8)
    cos, sin = torch.cat((f, f), -1).cos(), torch.cat((f, f), -1).sin()
    if tables == "b1td":
        cos, sin = cos[:, None], sin[:, None]
    if tables == "fp32_tables_bf16_x":
        x = x.to(torch.bfloat16)
    ref = kernels.rope.get("reference")(x, cos, sin, style)
    out = kernels.rope.get("addcmul")(x, cos, sin, style)
    assert out.dtype == x.dtype
    tol = 1e-6 if x.dtype == torch.float32 else 1e-2  # a fused multiply-add rounds once instead of twice
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_rms_norm_fused_backend_is_exact_in_fp32():
    x, w = torch.randn(3, 5, 64) * 4, torch.rand(64)
    assert kernels.rms_norm.select(x, w, 1e-6) in ("fused", "reference")
    torch.testing.assert_close(kernels.rms_norm.get("fused")(x, w, 1e-6),
                               kernels.rms_norm.get("reference")(x, w, 1e-6), atol=0, rtol=0)
    xb = x.to(torch.bfloat16)
    assert kernels.rms_norm.select(xb, w.to(torch.bfloat16), 1e-6) == "reference"  # bf16 keeps the official rounding


def test_rms_norm_accumulates_in_fp32():
    x = (torch.randn(4, 64) * 300).to(torch.bfloat16)
    w = torch.rand(64).to(torch.bfloat16)
    out = kernels.rms_norm(x, w, 1e-6)
    xf = x.float()
    want = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, want, atol=0, rtol=0)


def test_rope_interleaved_is_pairwise_rotation():
    """The interleaved style rotates pairs (x0,x1),(x2,x3),... (complex multiplication), output de-interleaved."""
    b, h, t, d = 1, 2, 5, 8
    x = torch.randn(b, h, t, d)
    pos = torch.arange(t, dtype=torch.float32)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    f = pos[:, None] * inv[None]
    emb = torch.cat([f, f], -1)[None]
    out = kernels.rope(x, emb.cos(), emb.sin(), "interleaved")
    z = torch.view_as_complex(x.reshape(b, h, t, d // 2, 2)) * torch.polar(torch.ones_like(f), f)
    rot = torch.view_as_real(z)  # [..., d/2, 2] pairs
    torch.testing.assert_close(out, torch.cat([rot[..., 0], rot[..., 1]], -1), atol=1e-5, rtol=1e-5)


def test_sampling_filters():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    p = logits_to_probs(logits, temperature=1.0, top_k=2)
    assert (p[0, 2:] == 0).all() and abs(p.sum().item() - 1) < 1e-6
    full = torch.softmax(logits, -1)[0]
    # top_p=0.8: the smallest prefix of the sorted distribution whose mass reaches 0.8
    p = logits_to_probs(logits, temperature=1.0, top_p=0.8)
    keep = int((torch.cumsum(full, 0) - full < 0.8).sum())
    assert (p[0, :keep] > 0).all() and (p[0, keep:] == 0).all()
    assert kernels.sample(logits, temperature=0).item() == 0
    pen = apply_repetition_penalty(logits, torch.tensor([[True, False, False, True, False]]), 2.0)
    assert pen.tolist() == [[1.0, 1.0, 0.5, -2.0, -3.0]]
    torch.testing.assert_close(cfg_combine(torch.ones(2), torch.zeros(2), 5.0), torch.full((2,), 5.0))


def test_seeded_sampling_is_deterministic_and_seed_dependent():
    logits = torch.randn(4, 50)
    draw = lambda s: kernels.sample(logits, 1.0, None, None, torch.Generator().manual_seed(s))  # noqa: E731
    assert torch.equal(draw(1), draw(1))
    assert any(not torch.equal(draw(1), draw(s)) for s in range(2, 6))


def test_backend_registry_errors_are_specific(monkeypatch):
    with pytest.raises(KeyError, match="no backend 'nope'"):
        with use_backend("moe", "nope"):
            pass
    monkeypatch.setenv("MMSTACK_KERNELS", "attention=reference")
    assert kernels.attention.select(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4)) == "reference"
    assert set(KERNELS) >= {"attention", "rms_norm", "rope", "moe", "mla_decode", "sample"}

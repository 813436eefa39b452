"""Faster PyTorch backends registered behind the reference signatures (see tests/test_kernels.py)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import reference as ref
from .masks import causal_additive, combine

# ---------------------------------------------------------------------------------------------- attention


def _sdpa_ok(q, k, v, mask=None, causal=False, scale=None) -> bool:
    # SDPA needs equal q/k head dims; value dim may differ. Causal with a non-square block is handled
    # by an explicit mask below, so any shape is fine.
    return q.shape[-1] == k.shape[-1]


@ref.attention.register("sdpa", predicate=_sdpa_ok, priority=10)
def attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    causal: bool = False,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient / math by device)."""
    h, g = q.shape[1], k.shape[1]
    t, s = q.shape[-2], k.shape[-2]
    if causal and t == 1:
        causal = False  # one query aligned to the end sees every key: decode steps need no causal mask
    if causal and mask is None and t == s:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=h != g)
    if causal:
        mask = combine(mask, causal_additive(t, s, q.device, q.dtype), q.dtype)
    elif mask is not None:
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=h != g)


# ---------------------------------------------------------------------------------------------- MLA decode


@ref.mla_decode.register("bmm", priority=10)
def mla_decode_bmm(q_latent, q_pe, latent, k_pe, mask, scale):
    """The latent cache is one key/value head shared by all H query heads, so heads fold into the query
    rows: two [B, H*T, .] x [B, ., S] batched matmuls read the cache once, with no broadcast copy of
    the cache per head (what `matmul` on [B,H,T,C] x [B,1,C,S] does)."""
    b, h, t, c = q_latent.shape
    s = latent.shape[1]
    q_rows = q_latent.reshape(b, h * t, c)
    pe = torch.bmm(q_pe.reshape(b, h * t, -1), k_pe.transpose(1, 2))  # [B,HT,S]
    scores = torch.baddbmm(pe, q_rows, latent.transpose(1, 2)).float() * scale
    if mask is not None:
        scores = (scores.view(b, h, t, s) + mask.float()).clamp_min(torch.finfo(torch.float32).min).view(b, h * t, s)
    probs = torch.softmax(scores, dim=-1).to(latent.dtype)
    return torch.bmm(probs, latent).view(b, h, t, c)


# ---------------------------------------------------------------------------------------------- rms_norm

_HAS_RMS_NORM = hasattr(torch, "rms_norm")


def _rms_fused_ok(x, weight, eps) -> bool:
    return _HAS_RMS_NORM and x.dtype == torch.float32 and (weight is None or weight.dtype == torch.float32)


@ref.rms_norm.register("fused", predicate=_rms_fused_ok, priority=10)
def rms_norm_fused(x, weight, eps):
    """torch's RMSNorm in one call (fp32 only, where it is bit-identical to the reference's fp32 math)."""
    return torch.rms_norm(x, (x.shape[-1],), weight, eps)


# ---------------------------------------------------------------------------------------------- rope


@ref.rope.register("addcmul", priority=10)
def rope_addcmul(x, cos, sin, style="neox"):
    """The reference's rotation in fewer dispatches (casts only when needed, the multiply-add fused):
    a decode step calls it once per layer. Equal to the reference within an ulp (fused multiply-add)."""
    if style == "interleaved":
        b, h, t, d = x.shape
        x = x.view(b, h, t, d // 2, 2).transpose(-1, -2).reshape(b, h, t, d)
    if cos.dim() == x.dim() - 1:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.addcmul(x * cos, torch.cat((-x2, x1), dim=-1), sin)


# ---------------------------------------------------------------------------------------------- MoE

# Up to this many (token, expert) pairs per call a decode-sized path wins over sorting into segments
# (measured: one token with top-6 or top-8 on CPU; the GPU path has no per-pair cost, so it goes further).
INDEXED_MAX_PAIRS = 8
GATHER_MAX_PAIRS = 16


def _small_on(device_type: str, max_pairs: int):
    return lambda x, idx, *a, **k: x.device.type == device_type and idx.numel() <= max_pairs


@ref.moe.register("indexed", predicate=_small_on("cpu", INDEXED_MAX_PAIRS), priority=20)
def moe_indexed(x, topk_idx, topk_weight, w_gate_up, w_down):
    """Decode-sized MoE on the host: read the chosen experts' ids (free on CPU) and run each chosen
    expert on a view of its stacked weights; nothing is copied, nothing is sorted."""
    n, kk = topk_idx.shape
    ys = []
    for i, e in enumerate(topk_idx.reshape(-1).tolist()):
        r = i // kk
        gate, up = F.linear(x[r : r + 1], w_gate_up[e]).chunk(2, dim=-1)
        ys.append(F.linear(F.silu(gate) * up, w_down[e]))
    y = torch.cat(ys).float().view(n, kk, -1) * topk_weight.float().unsqueeze(-1)
    return y.sum(1).to(x.dtype)


@ref.moe.register("gather", predicate=_small_on("cuda", GATHER_MAX_PAIRS), priority=20)
def moe_gather(x, topk_idx, topk_weight, w_gate_up, w_down):
    """Decode-sized MoE on a GPU: gather the K chosen experts' weights per token and run one batched
    matmul. No host sync and fixed shapes, so a decode step stays capturable in a CUDA graph (on CPU the
    weight copy costs more than it saves: `indexed` runs there)."""
    n, kk = topk_idx.shape
    flat = topk_idx.reshape(-1)  # [N*K]
    xs = x.repeat_interleave(kk, dim=0).unsqueeze(-1)  # [N*K, H, 1]
    gu = torch.bmm(w_gate_up[flat], xs).squeeze(-1)  # [N*K, 2I]
    gate, up = gu.chunk(2, dim=-1)
    y = torch.bmm(w_down[flat], (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)  # [N*K, H]
    y = y.float().view(n, kk, -1) * topk_weight.float().unsqueeze(-1)
    return y.sum(1).to(x.dtype)


_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@ref.moe.register("grouped", priority=10)
def moe_grouped(x, topk_idx, topk_weight, w_gate_up, w_down):
    """Tokens sorted by expert into contiguous segments, then one grouped GEMM per projection.

    Uses torch's grouped_mm (CPU and CUDA, fp32/bf16/fp16). Where it is unavailable the segments run
    one matmul each, looping over the experts that received tokens only (never over all experts).
    """
    n, kk = topk_idx.shape
    num_experts = w_gate_up.shape[0]
    flat = topk_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)  # [N*K] sorted by expert
    token_of = order // kk
    xs = x[token_of]  # [N*K, H] grouped by expert
    # scatter_add rather than bincount: bincount reads the largest id back to size its output (a host sync,
    # which also breaks CUDA-graph capture of a decode step)
    counts = torch.zeros(num_experts, dtype=torch.long, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    if _GROUPED_MM is not None and x.dtype in _GROUPED_DTYPES and w_gate_up.dtype == x.dtype:
        offs = torch.cumsum(counts, 0).to(torch.int32)
        gate, up = _GROUPED_MM(xs, w_gate_up.transpose(-1, -2), offs=offs).chunk(2, dim=-1)  # [N*K, I] each
        ys = _GROUPED_MM((F.silu(gate) * up).contiguous(), w_down.transpose(-1, -2), offs=offs)  # [N*K, H]
    else:
        ys = torch.empty_like(xs)
        active = torch.nonzero(counts).flatten()
        starts = (torch.cumsum(counts, 0) - counts)[active]
        for e, s, c in zip(active.tolist(), starts.tolist(), counts[active].tolist()):
            ys[s : s + c] = ref.swiglu_expert(xs[s : s + c], w_gate_up[e], w_down[e])
    out = torch.zeros(n, x.shape[1], dtype=torch.float32, device=x.device)
    w = topk_weight.reshape(-1)[order].float().unsqueeze(-1)
    out.index_add_(0, token_of, ys.float() * w)
    return out.to(x.dtype)

"""Faster PyTorch backends registered behind the reference signatures (see tests/test_kernels.py)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import reference as ref

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
    if causal and mask is None and t == s:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=h != g)
    if causal:
        keep = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
        cm = torch.zeros(t, s, dtype=q.dtype, device=q.device).masked_fill(~keep, torch.finfo(q.dtype).min)
        mask = cm if mask is None else (mask.to(q.dtype) + cm).clamp_min(torch.finfo(q.dtype).min)
    elif mask is not None:
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=h != g)


# ---------------------------------------------------------------------------------------------- MoE

# Below this many (token, expert) pairs the gathered-weight path wins: no host sync, no loop, capturable
# in a CUDA graph. Above it the sorted-segment path reads each active expert's weights once.
GATHER_MAX_PAIRS = 16


@ref.moe.register("gather", predicate=lambda x, idx, *a, **k: idx.numel() <= GATHER_MAX_PAIRS, priority=20)
def moe_gather(x, topk_idx, topk_weight, w_gate_up, w_down):
    """Decode-sized MoE: gather the K chosen experts' weights per token and run one batched matmul."""
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
    counts = torch.bincount(flat, minlength=num_experts)
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

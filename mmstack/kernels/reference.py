"""Plain PyTorch references for every kernel. Slow where it does not matter, exact where it does.

Notation: B batch, H query heads, G kv heads, T query tokens, S key tokens, D head dim,
C kv_lora_rank (MLA latent), R rope dims, N tokens (flattened), E experts, K top-k, I expert width.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .masks import causal_keep
from .registry import kernel


@kernel("rms_norm")
def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """RMSNorm with fp32 accumulation, cast back to the input dtype, then scaled (LLaMA / DeepSeek order)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = y.to(x.dtype)
    return y if weight is None else weight * y


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@kernel("rope")
def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str = "neox") -> torch.Tensor:
    """Rotate `x` [B, H, T, D] by position tables `cos`/`sin` [B, T, D] or [B, 1, T, D] (already
    cat(freqs, freqs)); the tables are cast to x's dtype.

    style "neox": rotate-half over the two halves of D (LLaMA).
    style "interleaved": pairs (x0,x1),(x2,x3),... are rotated. As in DeepSeek's MLA code the pairs are
    first de-interleaved to [x0,x2,...,x1,x3,...] and then rotated half-wise, so the output is in
    de-interleaved order; q and k get the same permutation, so attention scores are unchanged.
    """
    if style == "interleaved":
        b, h, t, d = x.shape
        x = x.view(b, h, t, d // 2, 2).transpose(-1, -2).reshape(b, h, t, d)
    if cos.dim() == x.dim() - 1:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos.to(x.dtype) + _rotate_half(x) * sin.to(x.dtype)


def _expand_kv(k: torch.Tensor, n_heads: int) -> torch.Tensor:
    g = k.shape[1]
    if g == n_heads:
        return k
    return k.repeat_interleave(n_heads // g, dim=1)


@kernel("attention")
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    causal: bool = False,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Softmax attention. q [B,H,T,D], k [B,G,S,D], v [B,G,S,Dv] -> [B,H,T,Dv].

    `mask` is additive (0 or a large negative), broadcastable to [B,H,T,S]. `causal` aligns the query
    block to the end of the keys (query i sees keys <= S-T+i). Softmax in fp32 as the eager references.
    A query that sees no key (a left-padding row) gets a finite, unspecified output, never NaN.
    """
    h = q.shape[1]
    k, v = _expand_kv(k, h), _expand_kv(v, h)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # [B,H,T,S]
    if causal:
        scores = scores.masked_fill(~causal_keep(q.shape[-2], k.shape[-2], q.device), torch.finfo(torch.float32).min)
    if mask is not None:
        scores = (scores + mask.float()).clamp_min(torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


@kernel("mla_decode")
def mla_decode(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    latent: torch.Tensor,
    k_pe: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """Absorbed MLA attention on the latent cache (DeepSeek-V2 appendix, "absorb" path).

    q_latent [B,H,T,C] = q_nope @ W_UK (absorbed), q_pe [B,H,T,R] (rotated), latent [B,S,C] (normalised
    kv latent), k_pe [B,S,R] (rotated, shared by all heads), mask additive [B,1,T,S] or None.
    Returns the attention-weighted latent [B,H,T,C]; the caller applies W_UV and o_proj.
    """
    scores = torch.matmul(q_latent, latent.unsqueeze(1).transpose(-1, -2))  # [B,H,T,S]
    scores = scores + torch.matmul(q_pe, k_pe.unsqueeze(1).transpose(-1, -2))
    scores = scores.float() * scale
    if mask is not None:
        scores = (scores + mask.float()).clamp_min(torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).to(latent.dtype)
    return torch.matmul(probs, latent.unsqueeze(1))  # [B,H,T,C]


def swiglu_expert(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert: x [N,H], w_gate_up [2I,H] (gate rows first), w_down [H,I]."""
    gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w_down)


@kernel("moe")
def moe(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """Routed-expert mixture. x [N,H], topk_idx [N,K], topk_weight [N,K] (fp32),
    w_gate_up [E,2I,H], w_down [E,H,I] -> [N,H].

    Reference: a loop over every expert. Each expert output is weighted in fp32 and the sum is cast back
    to x's dtype, as the official inference path does.
    """
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for e in range(w_gate_up.shape[0]):
        rows, slot = torch.nonzero(topk_idx == e, as_tuple=True)
        if rows.numel() == 0:
            continue
        y = swiglu_expert(x[rows], w_gate_up[e], w_down[e]).float()
        out.index_add_(0, rows, y * topk_weight[rows, slot, None].float())
    return out.to(x.dtype)

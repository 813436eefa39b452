"""Multi-head Latent Attention (DeepSeek-V2, arXiv:2405.04434 §2.1).

Two equivalent computations: "naive" expands the latent into per-head keys/values with kv_b_proj (cheap
for prefill and training); "absorb" folds W_UK into the query and W_UV into the output, so attention
runs directly on the cached latent (cheap for decode: the cache holds C + R values per token).

Notation: B batch, T new tokens, S cached+new tokens, H heads, C kv_lora_rank, R rope dims,
P nope dims, V value dims.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import kernels
from ..kernels.masks import causal_additive, combine
from ..config import MLAConfig
from .cache import KVCache
from .fused import fused
from .norm import RMSNorm


class MLAttention(nn.Module):
    # DeepSeek's q_a_layernorm / kv_a_layernorm use a fixed eps of 1e-6, not rms_norm_eps.
    LATENT_NORM_EPS = 1e-6

    def __init__(self, hidden: int, heads: int, mla: MLAConfig, bias: bool = False, softmax_scale: float = None,
                 mode: str = "auto", rope_style: str = "interleaved", device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.heads = heads
        self.nope, self.rope_dim, self.v_dim = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
        self.kv_lora_rank = mla.kv_lora_rank
        q_dim = heads * (self.nope + self.rope_dim)
        if mla.q_lora_rank:
            self.q_a_proj = nn.Linear(hidden, mla.q_lora_rank, bias=bias, **kw)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, self.LATENT_NORM_EPS, **kw)
            self.q_b_proj = nn.Linear(mla.q_lora_rank, q_dim, bias=False, **kw)
        else:
            self.q_proj = nn.Linear(hidden, q_dim, bias=False, **kw)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, mla.kv_lora_rank + self.rope_dim, bias=bias, **kw)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, self.LATENT_NORM_EPS, **kw)
        self.kv_b_proj = nn.Linear(mla.kv_lora_rank, heads * (self.nope + self.v_dim), bias=False, **kw)
        self.o_proj = nn.Linear(heads * self.v_dim, hidden, bias=bias, **kw)
        self.scale = softmax_scale if softmax_scale is not None else (self.nope + self.rope_dim) ** -0.5
        self.mode = mode  # "auto" | "naive" | "absorb"
        # the query (or its low-rank A) and the kv latent read the same input: packed by `fuse_projections`
        self.input_projections = ("q_a_proj" if mla.q_lora_rank else "q_proj", "kv_a_proj_with_mqa")
        self.rope_style = rope_style

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(query [.., H*(P+R)], kv_a output [.., C+R])."""
        names = self.input_projections
        out = fused(self, names, x)
        q, kv = out if out is not None else (getattr(self, names[0])(x), self.kv_a_proj_with_mqa(x))
        if names[0] == "q_a_proj":
            q = self.q_b_proj(self.q_a_layernorm(q))
        return q, kv

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor],
                causal: bool, cache: Optional[KVCache] = None, layer: int = 0) -> torch.Tensor:
        b, t, _ = x.shape
        q, kv = self._project(x)
        q = q.view(b, t, self.heads, self.nope + self.rope_dim).transpose(1, 2)  # [B,H,T,P+R]
        q_nope, q_pe = q.split_with_sizes((self.nope, self.rope_dim), dim=-1)
        latent, k_pe = kv.split_with_sizes((self.kv_lora_rank, self.rope_dim), dim=-1)
        latent = self.kv_a_layernorm(latent)  # [B,T,C]
        # the shared rope key rotates with the query heads in one call
        pe = kernels.rope(torch.cat((q_pe, k_pe.unsqueeze(1)), 1), cos, sin, self.rope_style)  # [B,H+1,T,R]
        q_pe, k_pe = pe[:, : self.heads], pe[:, self.heads]  # [B,H,T,R], [B,T,R]
        if cache is not None:
            latent, k_pe = cache.update_mla(layer, latent, k_pe)  # [B,S,C], [B,S,R]
        mode = self.mode
        if mode == "auto":
            # expand when every key is new (prefill / training) or when a long chunk makes that cheaper
            # (chunked prefill over a long cache); attend on the latent otherwise (decode)
            mode = "naive" if latent.shape[1] == t or not self.absorb_pays(t, latent.shape[1]) else "absorb"
        if mode == "naive":
            o = self._naive(q_nope, q_pe, latent, k_pe, mask, causal)
        else:
            o = self._absorbed(q_nope, q_pe, latent, k_pe, mask, causal)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.heads * self.v_dim))

    def absorb_pays(self, t: int, s: int) -> bool:
        """Whether attending on the latent costs fewer multiply-adds than expanding it, for t queries over s
        cached tokens (per head and row). Absorbed: t*s*(2C + R) for scores and values, plus t*C*(P + V) to
        fold W_UK / W_UV. Naive: s*C*(P + V) to expand every cached latent through kv_b_proj, plus
        t*s*(P + R + V). Decode (t = 1) always absorbs; chunks longer than about C*(P+V) / (2C - P - V)
        queries expand (about 170 for DeepSeek-V2-Lite: C=512, P=V=128)."""
        c, p, r, v = self.kv_lora_rank, self.nope, self.rope_dim, self.v_dim
        absorbed = t * s * (2 * c + r) + t * c * (p + v)
        naive = s * c * (p + v) + t * s * (p + r + v)
        return absorbed <= naive

    def _naive(self, q_nope, q_pe, latent, k_pe, mask, causal):
        b, s, _ = latent.shape
        kv = self.kv_b_proj(latent).view(b, s, self.heads, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # [B,H,S,P], [B,H,S,V]
        k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(-1, self.heads, -1, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        return kernels.attention(q, k, v, mask=mask, causal=causal, scale=self.scale)  # [B,H,T,V]

    def _absorbed(self, q_nope, q_pe, latent, k_pe, mask, causal):
        w = self.kv_b_proj.weight.view(self.heads, self.nope + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope :]  # [H,P,C], [H,V,C]
        q_latent = torch.matmul(q_nope, w_uk)  # [B,H,T,P] @ [H,P,C] -> [B,H,T,C]
        if causal and q_nope.shape[2] > 1:  # a single query aligned to the end sees every key
            mask = combine(mask, causal_additive(q_nope.shape[2], latent.shape[1], latent.device))
        o_latent = kernels.mla_decode(q_latent, q_pe, latent, k_pe, mask, self.scale)  # [B,H,T,C]
        return torch.matmul(o_latent, w_uv.transpose(-1, -2))  # [B,H,T,C] @ [H,C,V] -> [B,H,T,V]

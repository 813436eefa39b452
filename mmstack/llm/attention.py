"""Multi-head / grouped-query attention with NeoX rotary embeddings (LLaMA, DeepSeek-VL2-tiny).

Notation: B batch, T tokens, H heads, G kv heads, D head dim.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import kernels
from .cache import KVCache


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, bias: bool = False,
                 rope_style: str = "neox", device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.rope_style = rope_style
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias, **kw)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=bias, **kw)
        self.scale = head_dim**-0.5

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor],
                causal: bool, cache: Optional[KVCache] = None, layer: int = 0) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)  # [B,H,T,D]
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)  # [B,G,T,D]
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q = kernels.rope(q, cos, sin, self.rope_style)
        k = kernels.rope(k, cos, sin, self.rope_style)
        if cache is not None:
            k, v = cache.update_mha(layer, k, v)  # [B,G,S,D]
        o = kernels.attention(q, k, v, mask=mask, causal=causal, scale=self.scale)  # [B,H,T,D]
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))

"""Multi-head / grouped-query attention with NeoX rotary embeddings (LLaMA, DeepSeek-VL2-tiny).

Notation: B batch, T tokens, H heads, G kv heads, D head dim.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import kernels
from .cache import KVCache
from .fused import fused


class Attention(nn.Module):
    input_projections = ("q_proj", "k_proj", "v_proj")  # read the same input: packed by `fuse_projections`

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
        qkv = fused(self, self.input_projections, x)
        q, k, v = qkv if qkv is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)  # [B,H,T,D]
        k = k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)  # [B,G,T,D]
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        # one rotation over the query and key heads together: half the kernel calls of a decode step
        qk = kernels.rope(torch.cat((q, k), 1), cos, sin, self.rope_style)  # [B,H+G,T,D]
        q, k = qk.split_with_sizes((self.heads, self.kv_heads), 1)
        if cache is not None:
            k, v = cache.update_mha(layer, k, v)  # [B,G,S,D]
        o = kernels.attention(q, k, v, mask=mask, causal=causal, scale=self.scale)  # [B,H,T,D]
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))

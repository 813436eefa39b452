"""Rotary position tables in fp32 (inv_freq and positions never leave fp32; cos/sin are cast at use).

Supports plain RoPE, linear position interpolation and YaRN as DeepSeek-V2/V3 define it
(arXiv:2309.00071; DeepSeek-V2 `DeepseekV2YarnRotaryEmbedding`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..config import ConfigError


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def _yarn_inv_freq(dim: int, base: float, s: dict) -> tuple[torch.Tensor, float]:
    factor = float(s["factor"])
    orig = int(s.get("original_max_position_embeddings", 4096))
    beta_fast, beta_slow = float(s.get("beta_fast", 32)), float(s.get("beta_slow", 1))
    exps = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    freq_extra = 1.0 / (base**exps)
    freq_inter = 1.0 / (factor * base**exps)
    low = max(math.floor(_yarn_correction_dim(beta_fast, dim, base, orig)), 0)
    high = min(math.ceil(_yarn_correction_dim(beta_slow, dim, base, orig)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extra_mask = 1.0 - ramp
    inv_freq = freq_inter * (1 - extra_mask) + freq_extra * extra_mask
    attn_factor = yarn_mscale(factor, float(s.get("mscale", 1))) / yarn_mscale(factor, float(s.get("mscale_all_dim", 0)))
    return inv_freq, attn_factor


def softmax_scale_factor(scaling: Optional[dict]) -> float:
    """Extra multiplier of the attention softmax scale (YaRN with mscale_all_dim, as DeepSeek)."""
    if scaling and scaling.get("type") == "yarn" and scaling.get("mscale_all_dim"):
        m = yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"]))
        return m * m
    return 1.0


class RotaryEmbedding(nn.Module):
    """cos/sin tables [B, T, D] for integer positions [B, T]; D is the rotated dimension."""

    def __init__(self, dim: int, theta: float = 10000.0, scaling: Optional[dict] = None, device=None):
        super().__init__()
        self.dim, self.theta, self.scaling = dim, theta, scaling
        self.attn_factor = 1.0
        self.reset_buffers(device)

    def reset_buffers(self, device=None) -> None:
        """(Re)compute the non-persistent fp32 tables; called again after a meta-device build is loaded."""
        dim, theta, scaling = self.dim, self.theta, self.scaling
        kind = (scaling or {}).get("type", "default")
        exps = torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim
        if kind == "default":
            inv_freq = 1.0 / (theta**exps)
        elif kind == "linear":
            inv_freq = 1.0 / (theta**exps) / float(scaling["factor"])
        elif kind == "yarn":
            inv_freq, self.attn_factor = _yarn_inv_freq(dim, theta, scaling)
            inv_freq = inv_freq.to(device)
        else:
            raise ConfigError(f"rope scaling type {kind!r} is not supported (default, linear, yarn)")
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.float()  # [B,T,D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attn_factor != 1.0:
            cos, sin = cos * self.attn_factor, sin * self.attn_factor
        return cos, sin

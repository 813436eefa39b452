"""The one causal-mask helper every attention path uses.

A block of T queries is aligned to the end of S keys: query i (absolute position S - T + i) sees keys
j <= S - T + i. Additive masks hold 0 where a key is seen and the dtype's most negative finite value where
it is not (never -inf, so a row that sees nothing stays finite).
"""
from __future__ import annotations

from typing import Optional

import torch


def causal_keep(t: int, s: int, device=None) -> torch.Tensor:
    """[T, S] bool: True where query i sees key j (j <= S - T + i)."""
    return torch.ones(t, s, dtype=torch.bool, device=device).tril(s - t)


def additive(keep: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A bool keep-mask (any shape) -> an additive mask of `dtype`: 0 kept, the most negative value masked."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)


def causal_additive(t: int, s: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[T, S] additive causal mask."""
    return additive(causal_keep(t, s, device), dtype)


def combine(mask: Optional[torch.Tensor], other: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The sum of two additive masks, clamped to the dtype's range (masked stays masked, never -inf)."""
    if mask is None:
        return other.to(dtype)
    return (mask.to(dtype) + other.to(dtype)).clamp_min(torch.finfo(dtype).min)

"""Preallocated KV cache. MHA layers keep K and V per kv-head; MLA layers keep only the normalised
latent and the rotated shared rope key: kv_lora_rank + qk_rope_head_dim values per token per layer.

Notation: B batch, G kv heads, S capacity, D head dim, C kv_lora_rank, R rope dims, T new tokens.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..config import LMConfig


class CacheFullError(RuntimeError):
    pass


class KVCache:
    def __init__(self, cfg: LMConfig, batch: int, capacity: int, device=None, dtype=torch.float32):
        self.cfg = cfg
        self.batch, self.capacity = batch, capacity
        self.length = 0  # tokens written (the same for every row: left padding keeps rows aligned)
        self.key_valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        for _ in range(cfg.num_layers):
            if cfg.attention == "mla":
                a = torch.zeros(batch, capacity, cfg.mla.kv_lora_rank, device=device, dtype=dtype)
                b = torch.zeros(batch, capacity, cfg.mla.qk_rope_head_dim, device=device, dtype=dtype)
            else:
                shape = (batch, cfg.num_kv_heads, capacity, cfg.head_dim)
                a = torch.zeros(shape, device=device, dtype=dtype)
                b = torch.zeros(shape, device=device, dtype=dtype)
            self.layers.append((a, b))

    # -- bookkeeping done once per forward by the model
    def reserve(self, t: int, valid: Optional[torch.Tensor]) -> None:
        if self.length + t > self.capacity:
            raise CacheFullError(
                f"KV cache holds {self.capacity} tokens; {self.length} used, {t} more requested"
            )
        seg = self.key_valid[:, self.length : self.length + t]
        seg.copy_(valid if valid is not None else torch.ones_like(seg))

    def advance(self, t: int, valid: Optional[torch.Tensor]) -> None:
        self.length += t
        self.next_pos += t if valid is None else valid.long().sum(-1)

    # -- per layer writes; return the full cached tensors up to the new length
    def update_mha(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ck, cv = self.layers[layer]
        end = self.length + k.shape[2]
        ck[:, :, self.length : end] = k
        cv[:, :, self.length : end] = v
        return ck[:, :, :end], cv[:, :, :end]

    def update_mla(self, layer: int, latent: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cl, cp = self.layers[layer]
        end = self.length + latent.shape[1]
        cl[:, self.length : end] = latent
        cp[:, self.length : end] = k_pe
        return cl[:, :end], cp[:, :end]

    def truncate(self, length: int) -> None:
        """Forget everything after the first `length` tokens (e.g. keep a prompt, redo the rest)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.key_valid[:, length:] = False
        self.next_pos = self.key_valid[:, :length].long().sum(-1)
        self.length = length

    def nbytes_per_token(self) -> int:
        """Bytes one token occupies in the cache across all layers (MLA: (C + R) * layers * itemsize)."""
        a, b = self.layers[0]
        per_layer = (a[0, ..., 0, :].numel() if a.dim() == 4 else a.shape[-1]) + (
            b[0, ..., 0, :].numel() if b.dim() == 4 else b.shape[-1]
        )
        return per_layer * a.element_size() * len(self.layers)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (beam/batch pruning)."""
        self.layers = [(a[index], b[index]) for a, b in self.layers]
        self.key_valid = self.key_valid[index]
        self.next_pos = self.next_pos[index]
        self.batch = int(index.numel())

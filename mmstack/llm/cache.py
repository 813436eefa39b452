"""Preallocated KV cache. MHA layers keep K and V per kv-head; MLA layers keep only the normalised
latent and the rotated shared rope key: kv_lora_rank + qk_rope_head_dim values per token per layer.

Two ways to write. Dynamic (default): tokens go to `[length, length + T)` and attention sees the filled
prefix only, so a decode step costs O(length). Static (`enter_static()`, one token per step): the write
index is a device tensor and attention runs over the whole capacity under a mask, so every step has the
same shapes and no host synchronisation: the form a CUDA graph or `torch.compile` can capture.

Notation: B batch, G kv heads, S capacity, D head dim, C kv_lora_rank, R rope dims, T new tokens.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..config import LMConfig
from ..kernels.masks import additive, causal_keep



class CacheFullError(RuntimeError):
    pass


class KVCache:
    def __init__(self, cfg: LMConfig, batch: int, capacity: int, device=None, dtype=torch.float32):
        self.cfg = cfg
        self.batch, self.capacity = batch, capacity
        self.length = 0  # tokens written (the same for every row: left padding keeps rows aligned)
        self.key_valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        # True while no written key is padding: the mask is then the causal flag alone (no tensor, no sync)
        self.all_valid = True
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.static = False
        self.rope_table: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # cos/sin per position, [S, D]
        self.pos: Optional[torch.Tensor] = None  # [1] write index in static mode
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
        if self.static:
            raise RuntimeError("a static cache takes one token per step through `static_step`; call leave_static() first")
        if self.length + t > self.capacity:
            raise CacheFullError(
                f"KV cache holds {self.capacity} tokens; {self.length} used, {t} more requested"
            )
        seg = self.key_valid.narrow(1, self.length, t)
        if valid is None:
            seg.fill_(True)
        else:
            seg.copy_(valid)
            if self.all_valid:
                self.all_valid = bool(valid.all())  # one sync per masked forward (prefill), never per step

    def mask(self, t: int) -> tuple[Optional[torch.Tensor], bool]:
        """(additive mask [B,1,T,S] or None, causal flag) for T new tokens after `reserve(t, ...)`."""
        if self.all_valid:
            return None, True
        s = self.length + t
        keep = self.key_valid[:, None, None, :s]  # [B,1,1,S]
        if t > 1:
            keep = keep & causal_keep(t, s, keep.device)
        return additive(keep), False

    def advance(self, t: int, valid: Optional[torch.Tensor]) -> None:
        self.length += t
        self.next_pos += t if valid is None else valid.long().sum(-1)

    # -- per layer writes; return the full cached tensors up to the new length (static: the whole buffer)
    def update_mha(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._write(layer, k, v, 2)  # [B, G, T, D] each

    def update_mla(self, layer: int, latent: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._write(layer, latent, k_pe, 1)  # [B, T, C], [B, T, R]

    def _write(self, layer: int, a: torch.Tensor, b: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        ca, cb = self.layers[layer]
        if self.static:
            ca.index_copy_(dim, self.pos, a)
            cb.index_copy_(dim, self.pos, b)
            return ca, cb
        t = a.shape[dim]
        ca.narrow(dim, self.length, t).copy_(a)
        cb.narrow(dim, self.length, t).copy_(b)
        return ca.narrow(dim, 0, self.length + t), cb.narrow(dim, 0, self.length + t)

    # -- static mode: fixed shapes, device-side write index (for CUDA graphs / torch.compile)
    def enter_static(self) -> None:
        """Switch to static one-token steps from the current length (e.g. after a dynamic prefill)."""
        if self.pos is None:
            self.pos = torch.zeros(1, dtype=torch.long, device=self.key_valid.device)
        self.pos.fill_(self.length)
        self.static = True

    def leave_static(self) -> None:
        self.static = False
        self.rope_table: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # cos/sin per position, [S, D]

    def static_reserve(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mark the slot at `pos` valid; returns (positions [B,1], additive mask [B,1,1,S]) over the
        whole capacity: key j is seen when it is valid and j <= pos. No host synchronisation and no
        host-side state read, so a captured step stays valid for every position (the caller checks
        the capacity)."""
        self.key_valid.index_fill_(1, self.pos, True)
        seen = torch.arange(self.capacity, device=self.pos.device) <= self.pos  # [S]
        keep = (self.key_valid & seen)[:, None, None, :]
        return self.next_pos[:, None], additive(keep)

    def static_advance(self) -> None:
        """Device-side advance (captured with the step); the host `length` is advanced by the caller."""
        self.next_pos.add_(1)
        self.pos.add_(1)

    def truncate(self, length: int) -> None:
        """Forget everything after the first `length` tokens (e.g. keep a prompt, redo the rest)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.key_valid[:, length:] = False
        self.next_pos = self.key_valid[:, :length].long().sum(-1)
        self.length = length
        if self.pos is not None:
            self.pos.fill_(length)
        if not self.all_valid:
            self.all_valid = bool(self.key_valid[:, :length].all())

    def nbytes_per_token(self) -> int:
        """Bytes one token occupies in the cache across all layers (MLA: (C + R) * layers * itemsize)."""
        a, b = self.layers[0]
        per_layer = (a[0, ..., 0, :].numel() if a.dim() == 4 else a.shape[-1]) + (
            b[0, ..., 0, :].numel() if b.dim() == 4 else b.shape[-1]
        )
        return per_layer * a.element_size() * len(self.layers)

    def nbytes(self) -> int:
        """Bytes the preallocated cache tensors occupy."""
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.layers)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (beam/batch pruning)."""
        self.layers = [(a[index], b[index]) for a, b in self.layers]
        self.key_valid = self.key_valid[index]
        self.next_pos = self.next_pos[index]
        self.batch = int(index.numel())
        self.all_valid = bool(self.key_valid[:, : self.length].all())

"""The engine's preallocated KV cache: one row ("slot") per sequence, each with its own length.

Rows hold what `mmstack.llm.cache.KVCache` holds per layer (MHA/GQA: K and V per kv-head; MLA: the latent
and the shared rope key), but every row grows on its own: a row's tokens sit at [0, lengths[row]), padding
and finished rows never leak into another row because attention sees key j of row r only where
`key_valid[r, j]` and j is before the query. The scheduler keeps the rows it runs contiguous (decoding rows
first, then the rows of the prefill in flight) by moving a row's filled prefix when another leaves.

`view(start, stop)` is the cache object `LanguageModel.forward` writes through for rows [start, stop).

Notation: N rows, S capacity per row, B rows in a view, T new tokens, G kv heads, D head dim,
C kv_lora_rank, R rope dims.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..config import LMConfig
from ..kernels.masks import additive

SCRATCH = 1  # one extra column per row: static steps of padding rows write there, never read


class SlotCache:
    """Args:
        cfg: the language model config (MHA or MLA shapes).
        rows: sequences held at once.
        capacity: tokens per row (prompt + generated).
    """

    def __init__(self, cfg: LMConfig, rows: int, capacity: int, device=None, dtype=torch.float32):
        self.cfg, self.rows, self.capacity = cfg, rows, capacity
        s = capacity + SCRATCH
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        for _ in range(cfg.num_layers):
            if cfg.attention == "mla":
                a = torch.zeros(rows, s, cfg.mla.kv_lora_rank, device=device, dtype=dtype)
                b = torch.zeros(rows, s, cfg.mla.qk_rope_head_dim, device=device, dtype=dtype)
            else:
                a = torch.zeros(rows, cfg.num_kv_heads, s, cfg.head_dim, device=device, dtype=dtype)
                b = torch.zeros(rows, cfg.num_kv_heads, s, cfg.head_dim, device=device, dtype=dtype)
            self.layers.append((a, b))
        self.key_valid = torch.zeros(rows, s, dtype=torch.bool, device=device)
        self.lengths = [0] * rows  # host copy: tokens written per row
        self.next_pos = torch.zeros(rows, dtype=torch.long, device=device)  # rotary position of the next token
        self.rope_table: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    @property
    def device(self) -> torch.device:
        return self.key_valid.device

    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.layers)

    def _seq_dim(self) -> int:
        return 1 if self.cfg.attention == "mla" else 2

    def reset(self, row: int) -> None:
        """Forget a row (it is free again)."""
        self.lengths[row] = 0
        self.next_pos[row] = 0
        self.key_valid[row] = False

    def truncate(self, row: int, length: int, next_pos: Optional[int] = None) -> None:
        """Keep the first `length` tokens of a row (JanusFlow re-feeds its image tokens every Euler step)."""
        if not 0 <= length <= self.lengths[row]:
            raise ValueError(f"cannot truncate row {row} of {self.lengths[row]} tokens to {length}")
        self.lengths[row] = length
        self.key_valid[row, length:] = False
        self.next_pos[row] = length if next_pos is None else next_pos

    def move(self, src: int, dst: int) -> None:
        """Copy row `src`'s filled prefix (and bookkeeping) to row `dst`; `src` becomes free."""
        if src == dst:
            return
        n, dim = self.lengths[src], self._seq_dim()
        for a, b in self.layers:
            for t in (a, b):
                t[dst].narrow(dim - 1, 0, n).copy_(t[src].narrow(dim - 1, 0, n))
        self.key_valid[dst] = self.key_valid[src]
        self.next_pos[dst] = self.next_pos[src]
        self.lengths[dst] = n
        self.reset(src)

    def view(self, start: int, stop: int) -> "SlotView":
        return SlotView(self, start, stop)


class SlotView:
    """The cache interface `LanguageModel.forward` uses (reserve / mask / update_* / advance), over rows
    [start, stop) of a `SlotCache`, each row appending at its own length."""

    static = False

    def __init__(self, cache: SlotCache, start: int, stop: int):
        self.c, self.start, self.stop = cache, start, stop
        self.capacity = cache.capacity
        self.next_pos = cache.next_pos[start:stop]
        self._lens = cache.lengths[start:stop]
        self._offsets: Optional[torch.Tensor] = None  # [B, T] write positions of the current forward
        self._uniform: Optional[int] = None  # the common length when every row has it (contiguous writes)
        self._s = 0

    @property
    def rope_table(self):
        return self.c.rope_table

    @rope_table.setter
    def rope_table(self, value) -> None:
        self.c.rope_table = value

    def reserve(self, t: int, valid: Optional[torch.Tensor]) -> None:
        from ..llm.cache import CacheFullError

        full = [r for r, n in enumerate(self._lens) if n + t > self.capacity]
        if full:
            raise CacheFullError(f"KV cache rows hold {self.capacity} tokens; row {self.start + full[0]} has "
                                 f"{self._lens[full[0]]}, {t} more requested")
        dev = self.c.device
        self._uniform = self._lens[0] if len(set(self._lens)) == 1 else None
        self._s = max(self._lens) + t
        rows = slice(self.start, self.stop)
        if self._uniform is not None:
            seg = self.c.key_valid[rows].narrow(1, self._uniform, t)
            seg.copy_(torch.ones_like(seg) if valid is None else valid)
            self._offsets = None
        else:
            lens = torch.tensor(self._lens, device=dev)
            self._offsets = lens[:, None] + torch.arange(t, device=dev)[None]  # [B, T]
            kv = self.c.key_valid[rows]
            kv.scatter_(1, self._offsets, True if valid is None else valid.bool())

    def mask(self, t: int) -> tuple[torch.Tensor, bool]:
        """Additive [B,1,T,S]: query i of row r sees key j when it is valid and j <= lengths[r] + i."""
        dev, s = self.c.device, self._s
        lens = torch.tensor(self._lens, device=dev)
        limit = lens[:, None] + torch.arange(t, device=dev)[None]  # [B, T] last visible key per query
        keep = self.c.key_valid[self.start:self.stop, None, :s] & (torch.arange(s, device=dev) <= limit[..., None])
        return additive(keep[:, None]), False

    def _write(self, layer: int, a: torch.Tensor, b: torch.Tensor, mla: bool):
        ca, cb = self.c.layers[layer]
        rows = slice(self.start, self.stop)
        if mla:  # a [B, T, C], b [B, T, R]
            if self._uniform is not None:
                ca[rows].narrow(1, self._uniform, a.shape[1]).copy_(a)
                cb[rows].narrow(1, self._uniform, b.shape[1]).copy_(b)
            else:
                idx = torch.arange(self.start, self.stop, device=a.device)[:, None]
                ca[idx, self._offsets] = a.to(ca.dtype)
                cb[idx, self._offsets] = b.to(cb.dtype)
            return ca[rows, : self._s], cb[rows, : self._s]
        if self._uniform is not None:  # a, b [B, G, T, D]
            ca[rows].narrow(2, self._uniform, a.shape[2]).copy_(a)
            cb[rows].narrow(2, self._uniform, b.shape[2]).copy_(b)
        else:
            idx = torch.arange(self.start, self.stop, device=a.device)[:, None]
            ca[idx, :, self._offsets] = a.transpose(1, 2).to(ca.dtype)  # [B, T, G, D]
            cb[idx, :, self._offsets] = b.transpose(1, 2).to(cb.dtype)
        return ca[rows, :, : self._s], cb[rows, :, : self._s]

    def update_mha(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        return self._write(layer, k, v, mla=False)

    def update_mla(self, layer: int, latent: torch.Tensor, k_pe: torch.Tensor):
        return self._write(layer, latent, k_pe, mla=True)

    def advance(self, t: int, valid: Optional[torch.Tensor]) -> None:
        # Every row of a forward grows by t (padding columns are written but invalid); after a batched
        # prefill the scheduler truncates each row to its own prompt (`SlotCache.truncate`).
        for r in range(self.stop - self.start):
            self.c.lengths[self.start + r] += t
        self.next_pos += t if valid is None else valid.long().sum(-1)

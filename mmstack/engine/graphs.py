"""Static decode steps for the engine: the decoding rows [0, B) run over the whole row capacity with fixed
shapes and device-side write positions, so a step can be captured once per batch-size bucket in a CUDA graph
and replayed (one launch per token instead of a dozen per layer). Without CUDA the same static step runs
eagerly ("static" mode), which tests compare with the dynamic step.

A bucket holds more rows than decode (B rounded up): the extra rows write to their scratch column
(`slots.SCRATCH`), which no mask ever shows, and their bookkeeping is left alone.

Notation: B rows in the bucket, S row capacity (+ scratch), D LLM width.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from ..kernels.masks import additive

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class StaticSlotView:
    """The static cache interface of `LanguageModel._static_step` over rows [0, B) of a `SlotCache`."""

    static = True

    def __init__(self, cache, rows: int):
        self.c, self.b = cache, rows
        dev = cache.device
        self.capacity = cache.capacity
        self.row_idx = torch.arange(rows, device=dev)
        self.lens = torch.zeros(rows, dtype=torch.long, device=dev)  # write position per row (scratch for padding)
        self.cols = torch.arange(cache.capacity + 1, device=dev)
        self.true = torch.ones(rows, dtype=torch.bool, device=dev)  # device-side values: nothing crosses from the host

    @property
    def rope_table(self):
        return self.c.rope_table

    @rope_table.setter
    def rope_table(self, value) -> None:
        self.c.rope_table = value

    def static_reserve(self):
        self.c.key_valid.index_put_((self.row_idx, self.lens), self.true)  # this step's key (padding: scratch)
        keep = self.c.key_valid[: self.b] & (self.cols[None] <= self.lens[:, None])  # [B, S+1]
        positions = self.c.next_pos[: self.b].clamp(max=self.capacity - 1)[:, None]
        return positions, additive(keep[:, None, None, :])

    def static_advance(self) -> None:
        pass  # the host side advances real rows after the step (padding rows must not move)

    def update_mha(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        ca, cb = self.c.layers[layer]
        ca[self.row_idx, :, self.lens] = k[:, :, 0].to(ca.dtype)  # k [B, G, 1, D]
        cb[self.row_idx, :, self.lens] = v[:, :, 0].to(cb.dtype)
        return ca[: self.b], cb[: self.b]

    def update_mla(self, layer: int, latent: torch.Tensor, k_pe: torch.Tensor):
        ca, cb = self.c.layers[layer]
        ca[self.row_idx, self.lens] = latent[:, 0].to(ca.dtype)  # [B, 1, C]
        cb[self.row_idx, self.lens] = k_pe[:, 0].to(cb.dtype)
        return ca[: self.b], cb[: self.b]


class StaticDecoder:
    """Runs decode steps on static views, one per bucket, captured in CUDA graphs when `mode` is "cuda_graph"
    (else eagerly: "static"). Any capture failure falls back to the dynamic step with a warning."""

    def __init__(self, model, cache, mode: str = "cuda_graph"):
        self.model, self.cache, self.mode = model, cache, mode
        self.views: dict[int, StaticSlotView] = {}
        self.inputs: dict[int, torch.Tensor] = {}
        self.graphs: dict[int, tuple] = {}
        self.failed = False

    @staticmethod
    def bucket(n: int) -> Optional[int]:
        return next((b for b in BUCKETS if b >= n), None)

    def _prepare(self, b: int, n: int) -> StaticSlotView:
        view = self.views.get(b)
        if view is None:
            view = self.views[b] = StaticSlotView(self.cache, b)
            lm = self.model.language
            self.inputs[b] = torch.zeros(b, 1, lm.cfg.hidden_size, dtype=lm.dtype, device=lm.device)
        lens = torch.tensor(self.cache.lengths[:b], device=view.lens.device)
        lens[n:] = self.cache.capacity  # padding rows: the scratch column
        view.lens.copy_(lens)
        return view

    def __call__(self, inputs: torch.Tensor, n: int) -> Optional[torch.Tensor]:
        """inputs [n, D] for rows [0, n) -> hidden [n, D]; None when the dynamic step must run instead."""
        b = self.bucket(n)
        if self.failed or b is None or b > self.cache.rows:
            return None
        view = self._prepare(b, n)
        buf = self.inputs[b]
        buf.zero_()
        buf[:n, 0] = inputs
        lm = self.model.language
        if self.mode != "cuda_graph":
            h = lm(inputs_embeds=buf, cache=view)
        else:
            try:
                h = self._replay(b, view, buf)
            except Exception as e:  # capture problems must never stop generation
                log.warning("CUDA graph decode failed (%s: %s); decoding without graphs", type(e).__name__, e)
                self.failed = True
                return None
        self._advance(view, n)
        return h[:n, -1].clone()

    def _advance(self, view: StaticSlotView, n: int) -> None:
        c = self.cache
        c.next_pos[:n] += 1
        for r in range(n):
            c.lengths[r] += 1

    def _replay(self, b: int, view: StaticSlotView, buf: torch.Tensor) -> torch.Tensor:
        if b not in self.graphs:
            lm = self.model.language
            stream = torch.cuda.Stream(device=lm.device)
            stream.wait_stream(torch.cuda.current_stream(lm.device))
            saved = [(a[:b].clone(), bb[:b].clone()) for a, bb in self.cache.layers]
            with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
                for _ in range(2):
                    lm(inputs_embeds=buf, cache=view)
            torch.cuda.current_stream(lm.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = lm(inputs_embeds=buf, cache=view)
            for (a, bb), (sa, sb) in zip(self.cache.layers, saved):  # the warm-ups wrote this step's slots
                a[:b].copy_(sa)
                bb[:b].copy_(sb)
            self.graphs[b] = (graph, out)
        graph, out = self.graphs[b]
        graph.replay()
        return out

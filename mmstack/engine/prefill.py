"""The engine's batched prefill: the prompts of the requests admitted together become one right-padded batch of
embeddings (images encoded and spliced in one `MultimodalModel.embed` call), run in chunks over their rows.

Every row's prompt starts at position 0 of a fresh row and has no left padding, so its rotary positions are
0..L-1 exactly as when it runs alone; padding after a shorter prompt is written but never attended to, and
is cut off (`SlotCache.truncate`) when the batch completes.

Notation: k rows in the batch, T longest prompt, D LLM width.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..batch import MultimodalBatch
from .requests import FlowImageRequest, TextRequest, VQImageRequest


class PrefillBatch:
    """Rows [start, start + k) in member order; `emb` [k, T, D], `valid` [k, T], `lengths` per row."""

    def __init__(self, members: list, start: int, emb: torch.Tensor, valid: torch.Tensor, lengths: list[int]):
        self.members, self.start = members, start
        self.emb, self.valid, self.lengths = emb, valid, lengths
        self.pos = 0
        self.last_hidden = torch.zeros(emb.shape[0], emb.shape[2], dtype=emb.dtype, device=emb.device)

    @property
    def rows(self) -> int:
        return self.emb.shape[0]

    @torch.no_grad()
    def run_chunk(self, model, cache, chunk: int) -> bool:
        """Run the next `chunk` prompt positions of every row; returns True when the prompts are done."""
        lm = model.language
        k, t = self.emb.shape[:2]
        s, e = self.pos, min(self.pos + chunk, t)
        dev = self.emb.device
        positions = torch.arange(s, e, device=dev).expand(k, -1)
        view = cache.view(self.start, self.start + k)
        h = lm(inputs_embeds=self.emb[:, s:e], attention_mask=self.valid[:, s:e], positions=positions, cache=view)
        for r, n in enumerate(self.lengths):  # each row's last prompt position gives its first token
            if s <= n - 1 < e:
                self.last_hidden[r] = h[r, n - 1 - s]
        self.pos = e
        return e >= t


def _row_inputs(model, a) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(embeddings [L, D], valid [L]) per row of one request, text prompts only (images: see build_prefill)."""
    lm = model.language
    dev = lm.device
    req = a.req
    if isinstance(req, TextRequest):
        ids = torch.tensor(req.prompt_ids, dtype=torch.long, device=dev)
        return [(lm.embed_tokens(ids), torch.ones(len(req.prompt_ids), dtype=torch.long, device=dev))]
    if isinstance(req, VQImageRequest):
        emb = lm.embed_tokens(req.rows_ids.to(dev))  # [2n, L, D]: pads are attended, as officially
        return [(emb[i], torch.ones(emb.shape[1], dtype=torch.long, device=dev)) for i in range(emb.shape[0])]
    if isinstance(req, FlowImageRequest):
        emb = lm.embed_tokens(req.rows_ids.to(dev))[:, :-1]  # the last token's slot is t_emb's
        mask = req.prompt_mask.to(dev).long()
        return [(emb[i], mask[i]) for i in range(emb.shape[0])]
    raise TypeError(type(req).__name__)


@torch.no_grad()
def build_prefill(model, members: list, start: int) -> Optional[PrefillBatch]:
    """Embed the prompts of `members` (holding rows start.. in order) into one right-padded batch."""
    lm = model.language
    rows: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = []
    mm_index, mm_batches = [], []
    for a in members:
        if isinstance(a.req, TextRequest) and a.req.batch is not None:
            mm_index.append(len(rows))
            mm_batches.append(a.req.batch)
            rows.append(None)
        else:
            rows.extend(_row_inputs(model, a))
    if mm_batches:  # every image of the admitted requests goes through the tower in one call
        batch = MultimodalBatch.collate(mm_batches, pad_id=0, side="right").to(lm.device)
        emb = model.embed(batch)
        for j, i in enumerate(mm_index):
            n = mm_batches[j].input_ids.shape[1]
            rows[i] = (emb[j, :n], batch.attention_mask[j, :n])
    t = max(e.shape[0] for e, _ in rows)
    k, d = len(rows), rows[0][0].shape[-1]
    emb = torch.zeros(k, t, d, dtype=lm.dtype, device=lm.device)
    valid = torch.zeros(k, t, dtype=torch.long, device=lm.device)
    for r, (e, v) in enumerate(rows):
        emb[r, : e.shape[0]] = e
        valid[r, : v.shape[0]] = v
    return PrefillBatch(members, start, emb, valid, [e.shape[0] for e, _ in rows])

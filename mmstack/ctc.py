"""A CTC auxiliary objective on the vision tower's columns, for training a small model to read text lines from
scratch (training only: the head is not part of the model and is never saved with it).

Why: a tiny VLM trained only through the language model's cross-entropy learns geometry but not glyphs (the
classic alignment plateau of from-scratch OCR: its answers are a language prior of the right length). A CTC loss
read straight off the encoder's patch columns gives the tower a direct, alignment-free signal per character
(../shared/reference/tiny-model-training-notes.md: 0 -> 0.56 exact on one-line OCR where cross-entropy alone
stayed at 0).

Notation: V views, P = R * W patches of a view (R rows, W columns), C tower width, F frames per column,
K characters (class 0 is CTC's blank).

    head = ColumnCTCHead(width=C, rows=R, charset="ABC...", frames=F)
    loss = head.loss(features [V, P, C], views [n], targets ["HELLO", ...])   # one text per chosen view
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ColumnCTCHead(nn.Module):
    """Each column of a view's patch grid (its R patch features, concatenated) -> F frames of K + 1 logits;
    the W * F frames, left to right, are the CTC sequence of the view's one line of text."""

    def __init__(self, width: int, rows: int, charset: str, frames: int = 4, hidden: int = 256):
        super().__init__()
        if len(set(charset)) != len(charset) or not charset:
            raise ValueError(f"the CTC charset must be non-empty characters without repeats, got {charset!r}")
        if rows < 1 or frames < 1:
            raise ValueError(f"rows and frames must be >= 1, got {rows}, {frames}")
        self.rows, self.frames, self.charset = rows, frames, charset
        self.index = {c: i + 1 for i, c in enumerate(charset)}  # 0 is the blank
        self.net = nn.Sequential(nn.LayerNorm(rows * width), nn.Linear(rows * width, hidden), nn.GELU(),
                                 nn.Linear(hidden, frames * (len(charset) + 1)))

    def accepts(self, text: str) -> bool:
        """Whether `text` is one line the head can be trained on: only charset characters."""
        return bool(text) and all(c in self.index for c in text)

    def log_probs(self, features: torch.Tensor) -> torch.Tensor:
        """features [N, P, C] -> log-probabilities [W * F, N, K + 1] (time first, as `F.ctc_loss` takes them)."""
        n, p, c = features.shape
        w = p // self.rows
        if w * self.rows != p:
            raise ValueError(f"{p} patches do not form {self.rows} rows")
        cols = features.float().view(n, self.rows, w, c).transpose(1, 2).reshape(n, w, self.rows * c)  # [N, W, R*C]
        logits = self.net(cols.to(self.net[1].weight.dtype)).float().view(n, w * self.frames, -1)
        return logits.log_softmax(-1).transpose(0, 1)

    def loss(self, features: torch.Tensor, views: Sequence[int], texts: Sequence[str]) -> torch.Tensor:
        """Mean per-character CTC loss of the views `views` of `features` [V, P, C] reading `texts`."""
        if not views:
            return features.sum() * 0.0
        lp = self.log_probs(features[list(views)])
        targets = torch.tensor([self.index[c] for t in texts for c in t], dtype=torch.long)
        lengths = torch.tensor([len(t) for t in texts], dtype=torch.long)
        frames = torch.full((len(texts),), lp.shape[0], dtype=torch.long)
        # zero_infinity: a line longer than the frames can hold (or with too many repeats) adds nothing
        return F.ctc_loss(lp, targets.to(lp.device), frames, lengths, blank=0, reduction="mean", zero_infinity=True)

    @torch.no_grad()
    def read(self, features: torch.Tensor) -> list[str]:
        """Greedy CTC decoding of every view of `features` [N, P, C] (for monitoring the head)."""
        best = self.log_probs(features).argmax(-1).transpose(0, 1).tolist()  # [N, W*F]
        out = []
        for seq in best:
            chars, prev = [], 0
            for k in seq:
                if k != prev and k != 0:
                    chars.append(self.charset[k - 1])
                prev = k
            out.append("".join(chars))
        return out


def grid_rows(num_patches: int) -> int:
    """The rows of a square patch grid of `num_patches` patches."""
    r = math.isqrt(num_patches)
    if r * r != num_patches:
        raise ValueError(f"{num_patches} patches are not a square grid")
    return r

"""Sampling as small pure functions (temperature, top-k, top-p, repetition penalty, CFG combine).

Order follows transformers' warpers: repetition penalty on raw logits, then temperature, top-k, top-p.
"""
from __future__ import annotations

from typing import Optional

import torch

from .registry import kernel


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty. logits [B,V]; seen [B,V] bool (token occurred in the context so far).

    Positive logits are divided by `penalty`, negative ones multiplied (transformers semantics).
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond)."""
    return uncond + scale * (cond - uncond)


def logits_to_probs(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
) -> torch.Tensor:
    """fp32 probabilities after temperature, top-k and top-p filtering. logits [B,V] -> [B,V]."""
    logits = logits.float() / max(temperature, 1e-5)
    neg = torch.finfo(logits.dtype).min
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, neg)
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, neg)
    return torch.softmax(logits, dim=-1)


@kernel("sample")
def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Next token ids [B] from logits [B,V]. temperature <= 0 means greedy (argmax)."""
    if temperature is None or temperature <= 0:
        return torch.argmax(logits, dim=-1)
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    if generator is not None and generator.device != probs.device:
        # Draw on the generator's device so a seed gives the same tokens wherever the model runs.
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

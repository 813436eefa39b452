"""Janus autoregressive image tokens with classifier-free guidance, on the shared LLM and KV cache.

Each step runs ONE batched forward over the conditional and unconditional rows, combines their head
logits (uncond + cfg * (cond - uncond)), samples a code per image and feeds its embedding to both rows.
Notation: n images, R = 2n rows, L prompt tokens, N image tokens (grid^2), K codebook size, D LLM width.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from mmstack import kernels
from mmstack.decoding import make_generator
from mmstack.kernels.sampling import cfg_combine
from mmstack.llm import DecodeStep


def uncond_row(prompt: list[int], pad_id: int, uncond: str = "official_slice") -> list[int]:
    """The unconditional prompt of Janus CFG (and its training-time condition dropout): BOS and the final
    `<begin_of_image>` kept, everything between pad ("official_slice", generation_inference.py
    `tokens[i, 1:-1] = pad_id`; "keep_bos_boi" is transformers' rule and gives the same row for a BOS ... BOI
    prompt). The pads are attended (no mask), as officially."""
    if len(prompt) <= 2:
        return list(prompt)
    return [prompt[0]] + [pad_id] * (len(prompt) - 2) + [prompt[-1]]


def cfg_rows(prompt: list[int], n: int, pad_id: int, layout: str = "interleaved",
             uncond: str = "official_slice") -> torch.Tensor:
    """[2n, L] prompt rows: the prompt and its unconditional row (`uncond_row`) for each of n images."""
    ids = torch.tensor(prompt, dtype=torch.long)
    un = torch.tensor(uncond_row(prompt, pad_id, uncond), dtype=torch.long)
    if layout == "interleaved":
        return torch.stack([ids, un] * n)
    return torch.stack([ids] * n + [un] * n)


def split_rows(x: torch.Tensor, n: int, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond [n, ...], uncond [n, ...]) from [2n, ...] rows."""
    return (x[0::2], x[1::2]) if layout == "interleaved" else (x[:n], x[n:])


def merge_rows(x: torch.Tensor, layout: str) -> torch.Tensor:
    """[n, ...] -> [2n, ...] (the same input for a cond and an uncond row)."""
    return x.repeat_interleave(2, 0) if layout == "interleaved" else torch.cat([x, x])


@torch.no_grad()
def generate_codes(model, prompt: list[int], n: int, num_tokens: int, pad_id: int, cfg_weight: float = 5.0,
                   temperature: float = 1.0, seed: Optional[int] = None, top_k: Optional[int] = None,
                   layout: str = "interleaved", uncond: str = "official_slice",
                   forced: Optional[torch.Tensor] = None, progress: Optional[Callable[[int, int], None]] = None,
                   record_logits: bool = False, decode_mode: str = "auto"):
    """Sample `num_tokens` codes for each of `n` images.

    Args:
        forced: [N] or [n, N] codes to feed instead of the sampled ones (teacher forcing, for tests).
        temperature: 0 picks the argmax; otherwise a plain multinomial over all codes (official) unless top_k.
        progress: called as progress(done, total) after every token.
        record_logits: also return (cond, uncond) head logits per step, [N, n, K] each.
        decode_mode: how each cached step runs (`mmstack.llm.DecodeStep`: CUDA graph on CUDA by default);
            every mode gives the same codes.
    Returns:
        codes [n, N] long (and the recorded logits).
    """
    lm, head = model.language, model.vq_head
    rows = cfg_rows(prompt, n, pad_id, layout, uncond).to(lm.device)
    cache = lm.new_cache(rows.shape[0], rows.shape[1] + num_tokens)
    gen = make_generator(seed)
    codes, conds, unconds = [], [], []
    h = lm(input_ids=rows, cache=cache)[:, -1]  # no attention mask: pads are attended, as official
    step = DecodeStep(lm, cache, mode=decode_mode)
    for i in range(num_tokens):
        logits = head.logits(h)  # [R, K] fp32
        cond, unc = split_rows(logits, n, layout)
        if record_logits:
            conds.append(cond)
            unconds.append(unc)
        tok = kernels.sample(cfg_combine(cond, unc, cfg_weight), temperature, top_k, None, gen)
        if forced is not None:
            tok = (forced[..., i] if forced.dim() > 1 else forced[i].expand(n)).to(tok.device)
        codes.append(tok)
        if progress is not None:
            progress(i + 1, num_tokens)
        if i + 1 < num_tokens:
            h = step(inputs_embeds=head.embed_codes(merge_rows(tok, layout))[:, None])
    codes = torch.stack(codes, 1).to(torch.long)  # [n, N]
    if record_logits:
        return codes, (torch.stack(conds), torch.stack(unconds))
    return codes

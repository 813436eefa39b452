"""Training-time batch pieces of the generation paths, next to the samplers they mirror: prompts with
condition dropout (the unconditional rows of CFG sampling), images as [-1, 1] pixels (the VQ tokenizer's and
the VAE's input range) and VAE latents (the inverse of `vae.decode_latents`).

Notation: B batch, L longest prompt, S image side.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .flow import uncond_prompt
from .sampler import uncond_row


def dropout_prompts(prompts: Sequence[list[int]], drop: Sequence[bool], pad_id: int, mode: str,
                    uncond: str = "official_slice") -> tuple[torch.Tensor, torch.Tensor]:
    """Generation prompts (ids each) -> left-padded ids [B, L] and mask [B, L]; a dropped prompt becomes its
    unconditional row: Janus VQ's (`sampler.uncond_row`, attended pads) or JanusFlow's (`flow.uncond_prompt`,
    only BOS seen), so training sees exactly what CFG sampling feeds."""
    seqs, masks = [], []
    for ids, d in zip(prompts, drop):
        ids, m = list(ids), [1] * len(ids)
        if d and mode == "vq":
            ids = uncond_row(ids, pad_id, uncond)
        elif d:
            ids, m = uncond_prompt(ids, pad_id)
        seqs.append(ids)
        masks.append(m)
    t = max(map(len, seqs))
    out = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), t, dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        out[i, t - len(s):] = torch.tensor(s)
        mask[i, t - len(s):] = torch.tensor(m)
    return out, mask


def generation_pixels(img: Image.Image, size: int) -> torch.Tensor:
    """An RGB image -> [3, size, size] float32 in [-1, 1] (bicubic resize), the range the VQ tokenizer and the
    VAE take (the inverse of `vq.to_uint8`)."""
    img = img.convert("RGB").resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


@torch.no_grad()
def vae_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """pixels [B, 3, S, S] in [-1, 1] -> latents [B, C, S/8, S/8] scaled as the flow model sees them (the mean
    of the posterior times the VAE's scaling factor; `vae.decode_latents` divides it back)."""
    p = next(vae.parameters())
    return vae.encode(pixels.to(p.device, p.dtype)).latent_dist.mean.float() * vae.config.scaling_factor

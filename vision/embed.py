"""Text + image embeddings for the LLM: run the vision tower and projector on the images, lay the
embeddings out (VL2 tiles with newline / separator; Janus as-is; JanusFlow after `begin_embed`) and
splice them into the token embeddings at the image-token positions.

Notation: B batch, T tokens, N tiles (or images), P patches, D LLM width.
"""
from __future__ import annotations

from typing import Optional

import torch

from .layout import splice


def _text_embeds(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model.language.embed_tokens(input_ids.clamp_min(0))


def image_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """pixels [N, 3, S, S] -> projected features [N, P', D]."""
    return model.projector(model.vision(pixels))


def embed_vl2(model, input_ids: torch.Tensor, images: torch.Tensor, images_seq_mask: torch.Tensor,
              images_spatial_crop: torch.Tensor) -> torch.Tensor:
    """DeepSeek-VL2: images [B, max_tiles, 3, S, S] (global tile then locals, per image in order),
    images_spatial_crop [B, max_images, 2] as (w_tiles, h_tiles), (0, 0) = padding."""
    emb = _text_embeds(model, input_ids)
    crops = images_spatial_crop.tolist()
    tiles, counts = [], []
    for b, rows in enumerate(crops):
        n = 0
        for tw, th in rows:
            if tw == 0 or th == 0:
                break
            n += 1 + tw * th
        tiles.append(images[b, :n])
        counts.append(n)
    if sum(counts) == 0:
        return emb
    feats = image_features(model, torch.cat(tiles).to(emb.dtype))  # [sum tiles, h*w, D]
    seqs, start = [], 0
    for b, rows in enumerate(crops):
        for tw, th in rows:
            if tw == 0 or th == 0:
                break
            seqs.append(model.layout.vl2_image(feats[start : start + 1 + tw * th], tw, th))
            start += 1 + tw * th
    return splice(emb, images_seq_mask, torch.cat(seqs))


def embed_janus(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, images_seq_mask: torch.Tensor,
                images_emb_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Janus / JanusFlow: pixel_values [B, n, 3, S, S]; images_emb_mask [B, n, K] selects which of each
    image's K embeddings are used (K = P, or P + 1 with JanusFlow's leading `begin_embed`)."""
    emb = _text_embeds(model, input_ids)
    b, n = pixel_values.shape[:2]
    if n == 0:
        return emb
    feats = image_features(model, pixel_values.flatten(0, 1).to(emb.dtype))  # [B*n, P, D]
    layout = getattr(model, "layout", None)
    if layout is not None and hasattr(layout, "begin_embed"):
        feats = torch.cat([layout.begin_embed.to(feats.dtype).expand(feats.shape[0], 1, -1), feats], 1)
    feats = feats.view(b, n, feats.shape[1], -1)
    if images_emb_mask is None:
        images_emb_mask = torch.ones(feats.shape[:3], dtype=torch.bool, device=feats.device)
    return splice(emb, images_seq_mask, feats[images_emb_mask.bool()])

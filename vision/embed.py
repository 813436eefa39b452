"""Kept for one release: text + image embeddings are `MultimodalModel.embed(batch)`. These wrappers take the
official processors' tensors (as the golden fixtures store them) and call it.

Notation: B batch, T tokens, N tiles (or images), P patches, D LLM width.
"""
from __future__ import annotations

from typing import Optional

import torch

from mmstack.batch import MultimodalBatch


def image_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """pixels [N, 3, S, S] -> projected features [N, P', D]."""
    return model.image_features(pixels)


def embed_vl2(model, input_ids: torch.Tensor, images: torch.Tensor, images_seq_mask: torch.Tensor,
              images_spatial_crop: torch.Tensor) -> torch.Tensor:
    """DeepSeek-VL2: images [B, max_tiles, 3, S, S] (global tile then locals, per image in order),
    images_spatial_crop [B, max_images, 2] as (w_tiles, h_tiles), (0, 0) = padding."""
    return model.embed(MultimodalBatch.from_vl2(input_ids, images, images_seq_mask, images_spatial_crop))


def embed_janus(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, images_seq_mask: torch.Tensor,
                images_emb_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Janus / JanusFlow: pixel_values [B, n, 3, S, S]; images_emb_mask [B, n, K] marks the real images."""
    return model.embed(MultimodalBatch.from_janus(input_ids, pixel_values, images_seq_mask, images_emb_mask))

"""SigLIP vision towers on timm's `VisionTransformer`, so parameter names match the official checkpoints
(`patch_embed`, `pos_embed`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`, and
the unused `attn_pool` head that the checkpoints carry).

- DeepSeek-VL2: SigLIP-SO400M/14 @384 (27x27 grid: the last 6 pixel rows/columns are dropped by the
  stride-14 patch conv, as officially), tanh-approximated GELU.
- Janus / JanusFlow: SigLIP-L/16 @384 (24x24 grid), exact GELU.
Features are the final-LayerNorm tokens of all kept blocks (`forward_features`).
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from mmstack.part_configs import VisionTowerConfig

__all__ = ["VisionTower", "VisionTowerConfig"]


class VisionTower(nn.Module):
    """pixels [N, 3, S, S] (normalised) -> features [N, grid*grid, width]."""

    def __init__(self, cfg: VisionTowerConfig, device=None, dtype=None):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        cfg.validate()
        self.cfg = cfg
        act = partial(nn.GELU, approximate="tanh") if cfg.act == "gelu_tanh" else nn.GELU
        self.tower = VisionTransformer(
            img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.layers,
            num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, class_token=False, global_pool=cfg.global_pool,
            num_classes=0, act_layer=act, norm_layer=partial(nn.LayerNorm, eps=cfg.ln_eps),
            device=device, dtype=dtype,
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.tower.forward_features(pixels.to(self.tower.pos_embed.dtype))

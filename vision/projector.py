"""Projectors from vision features to the LLM width.

- "downsample_mlp_gelu" (DeepSeek-VL2): features on a g x g grid are zero-padded bottom/right to a multiple
  of the ratio r, 2x2-unfolded channel-major (index c*r*r + di*r + dj, as F.unfold), then an MLP.
- "mlp_gelu" (Janus aligner): Linear -> GELU -> Linear.
- "linear" (JanusFlow `vision_und_enc_aligner`): one Linear.
Parameter names follow the official `layers.{0,2,...}` Sequential indices.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmstack.part_configs import ProjectorConfig

__all__ = ["Projector", "ProjectorConfig"]


class Projector(nn.Module):
    def __init__(self, cfg: ProjectorConfig, device=None, dtype=None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        kw = dict(device=device, dtype=dtype)
        if cfg.kind == "linear":
            layers = [nn.Linear(cfg.input_dim, cfg.n_embed, **kw)]
        else:
            r = cfg.downsample_ratio if cfg.kind == "downsample_mlp_gelu" else 1
            hidden = cfg.n_embed * cfg.mlp_ratio if cfg.kind == "downsample_mlp_gelu" else cfg.n_embed
            layers = [nn.Linear(cfg.input_dim * r * r, hidden, **kw)]
            for _ in range(1, cfg.depth - 1):
                layers += [nn.GELU(), nn.Linear(hidden, hidden, **kw)]
            if cfg.depth > 1:
                layers += [nn.GELU(), nn.Linear(hidden, cfg.n_embed, **kw)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, P, C] -> [N, P', D]; P' = ceil(g/r)^2 for the downsampling projector (P = g*g)."""
        if self.cfg.kind == "downsample_mlp_gelu":
            n, p, c = x.shape
            g = int(round(math.sqrt(p)))
            r = self.cfg.downsample_ratio
            x = x.transpose(1, 2).reshape(n, c, g, g)  # [N,C,g,g]
            pad = (-g) % r
            x = F.pad(x, (0, pad, 0, pad))  # zeros on the right and bottom
            x = F.unfold(x, kernel_size=r, stride=r).transpose(1, 2)  # [N, (g'/r)^2, C*r*r] channel-major
        return self.layers(x)

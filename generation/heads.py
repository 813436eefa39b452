"""The generation heads around the shared LLM: Janus `VQHead` (code embedding, aligner, code logits) and the
JanusFlow `FlowHead` adapters between the ShallowUViT and the LLM.

Internal names: `vq_head.{embed, aligner.layers.*, head.*}`, `flow_head.{enc_aligner, dec_norm, dec_aligner}`.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from mmstack.llm.norm import RMSNorm
from mmstack.part_configs import FlowGenerationConfig, ProjectorConfig, VQGenerationConfig
from mmstack.vision.projector import Projector


class VQHead(nn.Module):
    """`embed` (code -> vector), `aligner` (MLP to the LLM width) and `head` (LLM hidden -> code logits)."""

    def __init__(self, cfg: VQGenerationConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.codebook_size, cfg.embed_dim, **kw)
        self.aligner = Projector(ProjectorConfig("mlp_gelu", cfg.embed_dim, cfg.n_embed, cfg.aligner_depth), **kw)
        self.head = nn.Module()
        self.head.output_mlp_projector = nn.Linear(cfg.n_embed, cfg.head_embed, **kw)
        self.head.vision_head = nn.Linear(cfg.head_embed, cfg.codebook_size, **kw)

    def embed_codes(self, codes):
        """codes [...] -> LLM inputs [..., D]."""
        return self.aligner(self.embed(codes))

    def logits(self, hidden):
        """LLM hidden (after the final norm) [..., D] -> code logits [..., K] in fp32."""
        h = self.head.output_mlp_projector(hidden)
        return self.head.vision_head(F.gelu(h)).float()


class FlowHead(nn.Module):
    """The JanusFlow adapters between the ShallowUViT and the LLM."""

    def __init__(self, cfg: FlowGenerationConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.cfg = cfg
        self.enc_aligner = nn.Linear(cfg.width, cfg.n_embed, **kw)
        self.dec_norm = RMSNorm(cfg.n_embed, cfg.norm_eps, **kw)
        self.dec_aligner = nn.Linear(cfg.n_embed, cfg.width, **kw)

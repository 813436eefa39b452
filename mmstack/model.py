"""`MultimodalModel`: the one composite model. The language backbone is always present; every other part
is built when its config section is present and is `None` otherwise.

    model = MultimodalModel(cfg)                  # build_model(cfg, "meta") builds without allocating
    emb = model.embed(batch)                      # MultimodalBatch -> [B, T, D], one path for every family
    h = model.language(inputs_embeds=emb, attention_mask=batch.attention_mask)

| part | module | families |
|---|---|---|
| language | `mmstack.llm.LanguageModel` | all |
| vision, projector, layout | `mmstack.vision.towers/projector/layout` | VL2, Janus, JanusFlow |
| vq, vq_head | `mmstack.generation.vq`, `mmstack.generation.heads.VQHead` | Janus |
| flow_encoder, flow_decoder, flow_head | `mmstack.generation.uvit`, `mmstack.generation.heads.FlowHead` | JanusFlow |
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mmstack.generation.heads import FlowHead, VQHead
from mmstack.generation.uvit import ShallowUViTDecoder, ShallowUViTEncoder
from mmstack.generation.vq import VQModel
from mmstack.vision.layout import Layout, splice
from mmstack.vision.projector import Projector
from mmstack.vision.towers import VisionTower

from .batch import MultimodalBatch
from .config import ModelConfig
from .llm import LanguageModel

# section -> the module built for it (explicit: read top to bottom, nothing registers itself)
PART_MODULES = {
    "vision": VisionTower,
    "projector": Projector,
    "layout": Layout,
    "vq": VQModel,
    "vq_head": VQHead,
    "flow_encoder": ShallowUViTEncoder,
    "flow_decoder": ShallowUViTDecoder,
    "flow_head": FlowHead,
}


class MultimodalModel(nn.Module):
    """Args:
        cfg: the composite config; its sections say which parts exist.
        device / dtype: where and in which dtype to build (`build_model(cfg, "meta")` allocates nothing).
    """

    def __init__(self, cfg: ModelConfig, device=None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        kw = dict(device=device, dtype=dtype)
        self.language = LanguageModel(cfg.language, **kw)
        for name, module in PART_MODULES.items():
            section = getattr(cfg, name)
            setattr(self, name, None if section is None else module(section, **kw))

    def has_part(self, name: str) -> bool:
        return isinstance(getattr(self, name, None), nn.Module)

    @property
    def device(self) -> torch.device:
        return self.language.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language.dtype

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [V, 3, S, S] (normalised views) -> projected features [V, P, D]."""
        return self.projector(self.vision(pixels))

    def embed(self, batch: MultimodalBatch) -> torch.Tensor:
        """Token embeddings with every image's embeddings spliced into its slots: vision -> projector ->
        layout -> splice, the same for every family. Returns [B, T, D] in the model dtype."""
        emb = self.language.embed_tokens(batch.input_ids.clamp_min(0))
        if batch.pixel_values is None or batch.num_views == 0:
            if bool(batch.images_seq_mask.any()):
                raise ValueError("the batch has image slots but no pixels")
            return emb
        if self.vision is None:
            raise ValueError("this model has no vision tower: it cannot embed images")
        feats = self.image_features(batch.pixel_values.to(emb.device, emb.dtype))  # [V, P, D]
        return splice(emb, batch.images_seq_mask, self.layout.arrange(feats, batch.image_tiles))


def build_model(cfg: ModelConfig, device="meta", dtype: Optional[torch.dtype] = None) -> MultimodalModel:
    """Construct without allocating (device="meta", the default) or on a real device with random init
    (None means the CPU)."""
    with torch.device(device if device is not None else "cpu"):
        return MultimodalModel(cfg, device=None, dtype=dtype)

"""`MultimodalModel`: the one composite model. The language backbone is always present; optional parts
(vision tower, projector, VQ / flow generation heads, ...) are built by builders that the vision and
generation packages register for their config sections.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .config import ModelConfig
from .llm import LanguageModel

# section name -> builder(part_cfg, model_cfg, device=, dtype=) -> nn.Module | None
PART_BUILDERS: dict[str, Callable] = {}


def register_part_builder(section: str, builder: Callable) -> Callable:
    PART_BUILDERS[section] = builder
    return builder


class MultimodalModel(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        from .formats import _register_parts

        _register_parts()
        cfg.validate()
        self.cfg = cfg
        self.language = LanguageModel(cfg.language, device=device, dtype=dtype)
        for name in sorted(cfg.parts):
            builder = PART_BUILDERS.get(name)
            module = builder(cfg.parts[name], cfg, device=device, dtype=dtype) if builder else None
            if module is not None:
                self.add_module(name, module)

    def has_part(self, name: str) -> bool:
        return isinstance(getattr(self, name, None), nn.Module)

    @property
    def device(self) -> torch.device:
        return self.language.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language.dtype

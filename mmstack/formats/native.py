"""The native mmstack format: `config.json` is the `ModelConfig` tree (`model_type: "mmstack"`, a format
version, one object per section present) and `model.safetensors` holds the internal parameter names, so the
key table is the identity. `save_pretrained` then `load` gives equal configs and bitwise-equal tensors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..config import ModelConfig
from ..io.keymaps import KeyTable, Rule

SOURCE_FORMATS = ("mmstack",)
TABLE = KeyTable("mmstack", [Rule("{rest}", "{rest}")])


def read(raw: dict, where: str, folder: Optional[Path] = None) -> ModelConfig:
    """A native config dict -> ModelConfig (unknown sections and keys refused). Raises ConfigError."""
    return ModelConfig.from_json_dict(raw, where)


def write(cfg: ModelConfig) -> dict:
    """The native config.json dict of `cfg` (every section present, source format reset to native)."""
    return cfg.to_json_dict()


def key_table(source_format: str = "mmstack") -> KeyTable:
    return TABLE

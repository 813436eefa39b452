"""transformers 5 text-only causal LMs: `deepseek_v2` (`DeepseekV2ForCausalLM`), `deepseek_v3`
(`DeepseekV3ForCausalLM`) and `llama` (`LlamaForCausalLM`) folders: config reader and writer, key table.

Keys: `model.*` / `lm_head.weight`. `save_pretrained` writes per-expert keys (as the hub checkpoints); the
fused in-memory layout (`experts.gate_up_proj` / `down_proj`) loads too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..config import ModelConfig
from ..io.keymaps import KeyTable
from .common import ExportSpec
from .language import (HF_DEEPSEEK_V2_DEFAULTS, HF_DEEPSEEK_V3_DEFAULTS, lm_from_deepseek, lm_from_llama, lm_rules,
                       lm_to_hf_deepseek_v2, lm_to_hf_deepseek_v3, lm_to_hf_llama)

SOURCE_FORMATS = ("hf_deepseek_v2", "hf_deepseek_v3", "hf_llama")
TABLE = KeyTable("hf_causal_lm", lm_rules("model.", "lm_head.weight"))


def read(raw: dict, where: str, folder: Optional[Path] = None) -> ModelConfig:
    """A transformers deepseek_v2 / deepseek_v3 / llama config.json -> a text-only ModelConfig."""
    mt = raw.get("model_type")
    if mt == "deepseek_v2":
        return ModelConfig(language=lm_from_deepseek(raw, HF_DEEPSEEK_V2_DEFAULTS, where), source_format="hf_deepseek_v2")
    if mt == "deepseek_v3":
        style = "interleaved" if raw.get("rope_interleave", True) else "neox"
        lm = lm_from_deepseek(raw, HF_DEEPSEEK_V3_DEFAULTS, where, rope_style=style)
        return ModelConfig(language=lm, source_format="hf_deepseek_v3")
    return ModelConfig(language=lm_from_llama(raw, where), source_format="hf_llama")


EXPORTS = {
    "hf_deepseek_v2": ExportSpec("deepseek_v2", ("DeepseekV2ForCausalLM",), lm_to_hf_deepseek_v2, None, "dtype"),
    "hf_deepseek_v3": ExportSpec("deepseek_v3", ("DeepseekV3ForCausalLM",), lm_to_hf_deepseek_v3, None, "dtype"),
    "hf_llama": ExportSpec("llama", ("LlamaForCausalLM",), lm_to_hf_llama, None, "dtype"),
}


def key_table(source_format: str) -> KeyTable:
    return TABLE

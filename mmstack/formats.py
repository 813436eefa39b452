"""Readers of the official and transformers `config.json` formats -> `ModelConfig`.

Each reader fills missing fields with the defaults of the config class that format was written for
(DeepSeek-VL2's `DeepseekV2Config`, transformers 4.38 `LlamaConfig` for Janus, transformers 5 classes
for `deepseek_v2` / `deepseek_v3` / `llama` / `janus`). Family differences become explicit fields.
Later layers (vision, generation) register translators for their parts with `register_part_reader`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Union

from .config import ConfigError, LMConfig, MLAConfig, ModelConfig, MoEConfig, RopeConfig

# DeepSeek-VL2 deepseek_vl2/models/configuration_deepseek.py DeepseekV2Config.__init__ defaults.
OFFICIAL_DEEPSEEK_V2_DEFAULTS = dict(
    vocab_size=102400, hidden_size=4096, intermediate_size=11008, moe_intermediate_size=1407,
    num_hidden_layers=30, num_attention_heads=32, num_key_value_heads=32, n_shared_experts=None,
    n_routed_experts=None, routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=1536,
    qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, topk_method="gready", n_group=None,
    topk_group=None, num_experts_per_tok=None, moe_layer_freq=1, first_k_dense_replace=0,
    norm_topk_prob=False, scoring_func="softmax", hidden_act="silu", max_position_embeddings=2048,
    rms_norm_eps=1e-6, pad_token_id=None, bos_token_id=100000, eos_token_id=100001,
    tie_word_embeddings=False, rope_theta=10000.0, rope_scaling=None, attention_bias=False, use_mla=True,
)
# transformers 5 DeepseekV2Config defaults (MLA only; routing ignores norm_topk_prob there).
HF_DEEPSEEK_V2_DEFAULTS = dict(
    vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=None, hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6,
    pad_token_id=None, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, attention_bias=False,
    mlp_bias=False, first_k_dense_replace=0, kv_lora_rank=512, q_lora_rank=1536, n_group=None,
    n_routed_experts=64, n_shared_experts=2, qk_nope_head_dim=128, qk_rope_head_dim=64, routed_scaling_factor=1.0,
    topk_group=None, topk_method="greedy", norm_topk_prob=False, v_head_dim=128, num_experts_per_tok=None,
    moe_intermediate_size=1407, scoring_func="softmax", moe_layer_freq=1, use_mla=True,
)
# transformers 5 DeepseekV3Config defaults.
HF_DEEPSEEK_V3_DEFAULTS = dict(
    vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
    num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256,
    routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
    qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3,
    norm_topk_prob=True, hidden_act="silu", max_position_embeddings=4096, rms_norm_eps=1e-6, pad_token_id=None,
    bos_token_id=0, eos_token_id=1, tie_word_embeddings=False, rope_interleave=True, attention_bias=False,
    topk_method="noaux_tc", scoring_func="sigmoid", moe_layer_freq=1, use_mla=True,
)
# LlamaConfig defaults (identical in transformers 4.38 and 5 for the fields used here).
LLAMA_DEFAULTS = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=None, hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6,
    pad_token_id=None, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, rope_theta=10000.0,
    rope_scaling=None, attention_bias=False, mlp_bias=False, head_dim=None,
)


def _rope(c: dict, style: str) -> RopeConfig:
    """Read rope settings from legacy (`rope_theta`, `rope_scaling`) or v5 (`rope_parameters`) fields."""
    params = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or None
    theta = params.get("rope_theta", c.get("rope_theta", 10000.0))
    if scaling is None and params:
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "rope_type")}
            scaling["type"] = kind
    elif scaling is not None:
        scaling = dict(scaling)
        scaling.setdefault("type", scaling.pop("rope_type", None))
        scaling.pop("rope_type", None)
        if scaling["type"] == "default":
            scaling = None
    rope = RopeConfig(theta=float(theta or 10000.0), style=style, scaling=scaling)
    rope.validate()
    return rope


def _with_defaults(c: dict, defaults: dict, where: str) -> dict:
    if not isinstance(c, dict):
        raise ConfigError(f"{where}: expected an object, got {type(c).__name__}")
    out = dict(defaults)
    out.update({k: v for k, v in c.items()})
    return out


def lm_from_deepseek(c: dict, defaults: dict, where: str, rope_style: Optional[str] = None) -> LMConfig:
    """DeepSeek-V2/V3-style config dict (official VL2 or transformers) -> LMConfig."""
    c = _with_defaults(c, defaults, where)
    moe = None
    if c.get("n_routed_experts"):
        method = c.get("topk_method")
        if method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise ConfigError(
                f"{where}: topk_method {method!r} is not a routing method (greedy, group_limited_greedy, noaux_tc); "
                "the official DeepseekV2Config default 'gready' crashes the official gate too: set it explicitly"
            )
        if not c.get("num_experts_per_tok"):
            raise ConfigError(f"{where}: MoE config (n_routed_experts={c['n_routed_experts']}) lacks num_experts_per_tok")
        moe = MoEConfig(
            n_routed_experts=int(c["n_routed_experts"]),
            num_experts_per_tok=int(c["num_experts_per_tok"]),
            moe_intermediate_size=int(c["moe_intermediate_size"]),
            n_shared_experts=int(c.get("n_shared_experts") or 0),
            first_k_dense_replace=int(c.get("first_k_dense_replace") or 0),
            moe_layer_freq=int(c.get("moe_layer_freq") or 1),
            scoring_func=c.get("scoring_func", "softmax"),
            topk_method=method,
            n_group=int(c.get("n_group") or 1),
            topk_group=int(c.get("topk_group") or 1),
            norm_topk_prob=bool(c.get("norm_topk_prob")),
            routed_scaling_factor=float(c.get("routed_scaling_factor") or 1.0),
        )
    use_mla = c.get("use_mla", True)
    heads = int(c["num_attention_heads"])
    kw = dict(
        vocab_size=int(c["vocab_size"]), hidden_size=int(c["hidden_size"]), num_layers=int(c["num_hidden_layers"]),
        num_heads=heads, intermediate_size=int(c["intermediate_size"]),
        num_kv_heads=int(c.get("num_key_value_heads") or heads), moe=moe,
        rms_norm_eps=float(c["rms_norm_eps"]), attention_bias=bool(c.get("attention_bias")),
        mlp_bias=bool(c.get("mlp_bias", False)), hidden_act=c.get("hidden_act", "silu"),
        tie_word_embeddings=bool(c.get("tie_word_embeddings")),
        max_position_embeddings=int(c.get("max_position_embeddings") or 4096),
        bos_token_id=c.get("bos_token_id"), eos_token_id=c.get("eos_token_id"), pad_token_id=c.get("pad_token_id"),
    )
    if use_mla:
        kw.update(
            attention="mla",
            mla=MLAConfig(
                q_lora_rank=c.get("q_lora_rank") or None, kv_lora_rank=int(c["kv_lora_rank"]),
                qk_nope_head_dim=int(c["qk_nope_head_dim"]), qk_rope_head_dim=int(c["qk_rope_head_dim"]),
                v_head_dim=int(c["v_head_dim"]),
            ),
            rope=_rope(c, rope_style or "interleaved"),
        )
        kw["num_kv_heads"] = heads
    else:
        # DeepSeek-VL2-tiny: transformers' LlamaAttention driven by the DeepseekV2 config.
        kw.update(attention="mha", head_dim=int(c["hidden_size"]) // heads, rope=_rope(c, rope_style or "neox"))
    return LMConfig(**kw).validate()


def lm_from_llama(c: dict, where: str, tie_default: Optional[bool] = None) -> LMConfig:
    c = _with_defaults(c, LLAMA_DEFAULTS, where)
    heads = int(c["num_attention_heads"])
    tie = c.get("tie_word_embeddings") if tie_default is None else tie_default
    return LMConfig(
        vocab_size=int(c["vocab_size"]), hidden_size=int(c["hidden_size"]), num_layers=int(c["num_hidden_layers"]),
        num_heads=heads, intermediate_size=int(c["intermediate_size"]),
        num_kv_heads=int(c.get("num_key_value_heads") or heads),
        head_dim=int(c.get("head_dim") or int(c["hidden_size"]) // heads), attention="mha",
        rope=_rope(c, "neox"), rms_norm_eps=float(c["rms_norm_eps"]), attention_bias=bool(c.get("attention_bias")),
        mlp_bias=bool(c.get("mlp_bias")), hidden_act=c.get("hidden_act", "silu"), tie_word_embeddings=bool(tie),
        max_position_embeddings=int(c.get("max_position_embeddings") or 2048),
        bos_token_id=c.get("bos_token_id"), eos_token_id=c.get("eos_token_id"), pad_token_id=c.get("pad_token_id"),
    ).validate()


# Part translators added by mmstack.vision / mmstack.generation:
# source_format -> [fn(raw, cfg, where, folder)]; folder is the model folder (None for a dict source),
# where processor_config.json / preprocessor_config.json are read when present.
_PART_READERS: dict[str, list[Callable]] = {}


def register_part_reader(source_format: str, fn: Callable) -> Callable:
    _PART_READERS.setdefault(source_format, []).append(fn)
    return fn


def _lm_for(raw: dict, where: str) -> tuple[LMConfig, str]:
    mt = raw.get("model_type")
    if mt == "deepseek_vl_v2":
        if "language_config" not in raw:
            raise ConfigError(f"{where}: deepseek_vl_v2 config without language_config")
        return lm_from_deepseek(raw["language_config"], OFFICIAL_DEEPSEEK_V2_DEFAULTS, f"{where}:language_config"), "deepseek_vl_v2"
    if mt == "multi_modality":
        if "language_config" not in raw:
            raise ConfigError(f"{where}: multi_modality config without language_config")
        fmt = "janusflow" if "vision_gen_enc_config" in raw else "janus"
        return lm_from_llama(raw["language_config"], f"{where}:language_config"), fmt
    if mt == "deepseek_v2":
        return lm_from_deepseek(raw, HF_DEEPSEEK_V2_DEFAULTS, where), "hf_deepseek_v2"
    if mt == "deepseek_v3":
        style = "interleaved" if raw.get("rope_interleave", True) else "neox"
        return lm_from_deepseek(raw, HF_DEEPSEEK_V3_DEFAULTS, where, rope_style=style), "hf_deepseek_v3"
    if mt == "llama":
        return lm_from_llama(raw, where), "hf_llama"
    if mt == "janus":
        # transformers ties lm_head on the top-level flag (default True), not text_config's.
        tie = raw.get("tie_word_embeddings", True)
        return lm_from_llama(raw.get("text_config") or {}, f"{where}:text_config", tie_default=tie), "hf_janus"
    raise ConfigError(
        f"{where}: unknown model_type {mt!r} (supported: mmstack, deepseek_vl_v2, multi_modality, janus, "
        "deepseek_v2, deepseek_v3, llama)"
    )


def read_config(source: Union[str, Path, dict], where: Optional[str] = None) -> ModelConfig:
    """Translate a config.json (path, folder or dict) of any supported format into a `ModelConfig`.

    The file is data only: nothing in the model folder is imported or executed, whatever its fields say
    (`auto_map` and `trust_remote_code` are never acted on).

    Raises:
        ConfigError: a missing or unreadable file, invalid JSON, an unknown format, a field of the wrong
            type, or an impossible model; the message names the file.
    """
    _register_parts()
    folder = None
    if isinstance(source, dict):
        raw, where = source, where or "config"
    else:
        p = Path(source)
        p = p / "config.json" if p.is_dir() else p
        folder = p.parent
        where = where or str(p)
        if not p.exists():
            raise ConfigError(f"{where}: file not found")
        try:
            raw = json.loads(p.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: absurdly deep nesting
            raise ConfigError(f"{where}: not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    try:
        if raw.get("model_type") == "mmstack":
            return ModelConfig.from_json_dict(raw, where)
        lm, fmt = _lm_for(raw, where)
        cfg = ModelConfig(language=lm, source_format=fmt)
        for fn in _PART_READERS.get(fmt, []):
            fn(raw, cfg, where, folder)
        return cfg.validate()
    except ConfigError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, ArithmeticError, RecursionError) as e:
        # A field of the wrong type or shape (a list where a size belongs, a section that is not an object):
        # the readers index the dict directly, so report the malformed file here rather than crash.
        raise ConfigError(f"{where}: malformed config ({type(e).__name__}: {e})") from None


def _register_parts() -> None:
    """Import the packages that register config sections, part readers, builders and key rules."""
    import mmstack.generation.parts  # noqa: F401
    import mmstack.vision.parts  # noqa: F401
    import mmstack.vision.hf_janus  # noqa: F401


# The key table for each source format (`mmstack.io.keymaps`).
TABLE_FOR_FORMAT = {
    "mmstack": "mmstack",
    "deepseek_vl_v2": "deepseek_vl_v2",
    "janus": "janus",
    "janusflow": "janusflow",
    "hf_deepseek_v2": "hf_causal_lm",
    "hf_deepseek_v3": "hf_causal_lm",
    "hf_llama": "hf_causal_lm",
    "hf_janus": "hf_janus",
}

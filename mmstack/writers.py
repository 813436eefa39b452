"""Writers of the official and transformers `config.json` formats: `ModelConfig` -> config dicts.

The inverse of `mmstack.formats`. The language model is written here; every other part is written by
the package that reads it (`register_part_writer`, next to its `register_part_reader`). A writer writes
the fields the target's own code consumes, explicitly (never relying on a default that could differ
between that code and our reader) and nothing it would ignore: `mmstack.export` then reads the result
back with the readers, so a setting the format cannot hold shows up as a difference, never silently.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

from .config import ConfigError, LMConfig, ModelConfig, RopeConfig

log = logging.getLogger(__name__)


class ExportError(ConfigError):
    """A model that the requested format cannot hold (a missing part, an unsupported setting)."""


@dataclass
class Written:
    """What a format's writers produce: `config.json`, side files (processor configs), and the fields the
    format does not store (`not_stored`: "section" or "section.field"; a difference there is a warning)."""

    config: dict
    files: dict = field(default_factory=dict)  # file name -> JSON dict
    not_stored: set = field(default_factory=set)
    # token text -> id from the tokenizer being exported (None when unknown); transformers' Janus stores one
    token_id: Callable[[str], Optional[int]] = lambda text: None


@dataclass(frozen=True)
class FormatSpec:
    model_type: str
    architectures: tuple
    lm: Callable[[LMConfig], dict]
    lm_key: Optional[str]  # the language section (None: the language fields are the top level)
    dtype_key: str  # "torch_dtype" (transformers 4 era official code) or "dtype" (transformers 5)


@dataclass(frozen=True)
class PartWriter:
    fn: Callable[[ModelConfig, Written], None]
    needs: tuple = ()  # sections the format cannot do without
    not_stored: tuple = ()


_PART_WRITERS: dict[str, list[PartWriter]] = {}


def register_part_writer(target_format: str, fn: Callable, needs: tuple = (), not_stored: tuple = ()) -> Callable:
    """Add `fn(cfg, written)` to the writers of `target_format`; it fills `written.config` / `.files`."""
    _PART_WRITERS.setdefault(target_format, []).append(PartWriter(fn, tuple(needs), tuple(not_stored)))
    return fn


CUSTOM_NOTE = ("Architectures absent from the official look-up tables (SigLIP_MODEL_CONFIG, VQ_models), written by "
               "mmstack export: mmstack reads them here; the official code needs them registered at run time.")


def official_override(out: Written, table: str, name: str, entry: dict) -> str:
    """Record an architecture the official look-up tables cannot name as `_golden_overrides[table][name]`
    (the golden fixtures' convention, which the readers accept). Returns `name`."""
    extra = out.config.setdefault("_golden_overrides", {"note": CUSTOM_NOTE})
    extra.setdefault(table, {})[name] = entry
    log.warning("%s %r is not in the official look-up tables: written under _golden_overrides (the official code "
                "needs it registered at run time)", table, name)
    return name


# ------------------------------------------------------------------------------------------ language


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ExportError(msg)


def _legacy_rope(rope: RopeConfig) -> dict:
    """`rope_theta` + `rope_scaling` ({"type": ..., params}), as DeepSeek-VL2 and transformers 4.38 read them."""
    return dict(rope_theta=rope.theta, rope_scaling=dict(rope.scaling) if rope.scaling else None)


def _rope_parameters(rope: RopeConfig) -> dict:
    """transformers 5 `rope_parameters`."""
    out = {"rope_theta": rope.theta, "rope_type": "default"}
    if rope.scaling:
        out.update({k: v for k, v in rope.scaling.items() if k != "type"}, rope_type=rope.scaling["type"])
    return out


def _common(lm: LMConfig) -> dict:
    return dict(
        vocab_size=lm.vocab_size, hidden_size=lm.hidden_size, intermediate_size=lm.intermediate_size,
        num_hidden_layers=lm.num_layers, num_attention_heads=lm.num_heads, num_key_value_heads=lm.num_kv_heads,
        hidden_act=lm.hidden_act, max_position_embeddings=lm.max_position_embeddings, rms_norm_eps=lm.rms_norm_eps,
        bos_token_id=lm.bos_token_id, eos_token_id=lm.eos_token_id, pad_token_id=lm.pad_token_id,
        tie_word_embeddings=lm.tie_word_embeddings, attention_bias=lm.attention_bias, attention_dropout=0.0,
        use_cache=True,
    )


def _deepseek(lm: LMConfig, model_type: str) -> dict:
    d = dict(model_type=model_type, **_common(lm))
    if lm.attention == "mla":
        m = lm.mla
        d.update(use_mla=True, q_lora_rank=m.q_lora_rank, kv_lora_rank=m.kv_lora_rank,
                 qk_nope_head_dim=m.qk_nope_head_dim, qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim)
    else:  # as deepseek-vl2-tiny: LlamaAttention, the MLA dims unset
        d.update(use_mla=False, q_lora_rank=None, kv_lora_rank=None, qk_nope_head_dim=0, qk_rope_head_dim=0,
                 v_head_dim=0)
    moe = lm.moe
    if moe is None:
        d.update(n_routed_experts=None, n_shared_experts=None, num_experts_per_tok=None,
                 first_k_dense_replace=lm.num_layers, moe_layer_freq=1)
    else:
        d.update(n_routed_experts=moe.n_routed_experts, n_shared_experts=moe.n_shared_experts,
                 num_experts_per_tok=moe.num_experts_per_tok, moe_intermediate_size=moe.moe_intermediate_size,
                 first_k_dense_replace=moe.first_k_dense_replace, moe_layer_freq=moe.moe_layer_freq,
                 n_group=moe.n_group, topk_group=moe.topk_group, topk_method=moe.topk_method,
                 scoring_func=moe.scoring_func, norm_topk_prob=moe.norm_topk_prob,
                 routed_scaling_factor=moe.routed_scaling_factor)
    return d


def lm_to_official_deepseek(lm: LMConfig) -> dict:
    """DeepSeek-VL2's `language_config` (its own `DeepseekV2Config`: MLA or LlamaAttention, every router)."""
    _need(not lm.mlp_bias, "the official DeepseekV2MLP has no biases (language.mlp_bias is True)")
    return dict(_deepseek(lm, "deepseek_v2"), architectures=["DeepseekV2ForCausalLM"], ep_size=1,
                **_legacy_rope(lm.rope))


def _hf_mla(lm: LMConfig) -> None:
    _need(lm.attention == "mla", f"transformers' model is MLA only; this language model uses "
                                      f"{lm.attention!r} attention")
    if lm.moe is not None:
        # transformers builds an MoE block on every layer from first_k_dense_replace on
        _need(lm.moe.moe_layer_freq == 1, f"moe_layer_freq {lm.moe.moe_layer_freq} is not supported (only 1)")


def lm_to_hf_deepseek_v2(lm: LMConfig) -> dict:
    _hf_mla(lm)
    moe = lm.moe
    if moe is not None:  # transformers' DeepseekV2TopkRouter: softmax scores, no renormalisation
        _need(moe.scoring_func == "softmax", f"router scoring_func {moe.scoring_func!r} is not supported "
                                                  "(softmax only; sigmoid + noaux_tc is hf_deepseek_v3)")
        _need(moe.topk_method in ("greedy", "group_limited_greedy"),
              f"topk_method {moe.topk_method!r} is not supported (greedy, group_limited_greedy)")
        _need(not moe.norm_topk_prob, "norm_topk_prob=True is not supported (transformers ignores it)")
    return dict(_deepseek(lm, "deepseek_v2"), mlp_bias=lm.mlp_bias, rope_parameters=_rope_parameters(lm.rope))


def lm_to_hf_deepseek_v3(lm: LMConfig) -> dict:
    _hf_mla(lm)
    moe = lm.moe
    _need(moe is not None, "transformers' DeepseekV3 needs routed experts; this language model is dense")
    _need((moe.scoring_func, moe.topk_method) == ("sigmoid", "noaux_tc"),
          f"router {moe.scoring_func} + {moe.topk_method} is not supported (sigmoid + noaux_tc only; softmax "
          "routers are hf_deepseek_v2)")
    return dict(_deepseek(lm, "deepseek_v3"), rope_interleave=lm.rope.style == "interleaved",
                rope_parameters=_rope_parameters(lm.rope))


def _llama(lm: LMConfig) -> None:
    _need(lm.attention == "mha" and lm.moe is None, f"a LLaMA decoder has dense MLPs and multi-head "
          f"attention; this language model has {lm.attention!r} attention{' and routed experts' if lm.moe else ''}")


def lm_to_official_llama(lm: LMConfig) -> dict:
    """Janus / JanusFlow `language_config` (transformers 4.38 LlamaConfig: no head_dim, no mlp_bias)."""
    _llama(lm)
    return dict(model_type="llama", **_common(lm), **_legacy_rope(lm.rope))


def lm_to_hf_llama(lm: LMConfig) -> dict:
    _llama(lm)
    return dict(model_type="llama", **_common(lm), head_dim=lm.head_dim, mlp_bias=lm.mlp_bias,
                rope_parameters=_rope_parameters(lm.rope))


FORMATS: dict[str, FormatSpec] = {
    "deepseek_vl_v2": FormatSpec("deepseek_vl_v2", ("DeepseekVLV2ForCausalLM",), lm_to_official_deepseek,
                                 "language_config", "torch_dtype"),
    "janus": FormatSpec("multi_modality", ("MultiModalityCausalLM",), lm_to_official_llama, "language_config",
                        "torch_dtype"),
    "janusflow": FormatSpec("multi_modality", ("MultiModalityCausalLM",), lm_to_official_llama, "language_config",
                            "torch_dtype"),
    "hf_deepseek_v2": FormatSpec("deepseek_v2", ("DeepseekV2ForCausalLM",), lm_to_hf_deepseek_v2, None, "dtype"),
    "hf_deepseek_v3": FormatSpec("deepseek_v3", ("DeepseekV3ForCausalLM",), lm_to_hf_deepseek_v3, None, "dtype"),
    "hf_llama": FormatSpec("llama", ("LlamaForCausalLM",), lm_to_hf_llama, None, "dtype"),
    "hf_janus": FormatSpec("janus", ("JanusForConditionalGeneration",), lm_to_hf_llama, "text_config", "dtype"),
}
# Every format's chat roles and templates are chosen at load time (`chat_format=`), not stored.
NOT_STORED_ANYWHERE = ("chat.template", "chat.user_role", "chat.assistant_role", "chat.system_prompt", "chat.sep",
                       "chat.eos_text", "image_processing.policy")


def export_formats() -> list[str]:
    return ["mmstack", *FORMATS]


def write_config(cfg: ModelConfig, fmt: str, dtype: str = "float32",
                 token_id: Optional[Callable[[str], Optional[int]]] = None) -> Written:
    """`cfg` as format `fmt`: its config.json dict and side files (processor configs).

    Args:
        dtype: the weights' dtype name ("bfloat16", ...), recorded as the format records it.
        token_id: token text -> id in the tokenizer that goes with the export (transformers' Janus stores
            the image token's id).
    Raises:
        ExportError: an unknown format, a part the format needs that the model lacks, or a setting the
            format's code cannot run (named).
    """
    from .formats import _register_parts

    _register_parts()
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r} (choose from {', '.join(export_formats())})")
    spec = FORMATS[fmt]
    writers = _PART_WRITERS.get(fmt, [])
    needs = sorted({s for w in writers for s in w.needs})
    missing = [s for s in needs if s not in cfg.parts]
    if missing:
        has = f"has only {sorted(cfg.parts)}" if cfg.parts else "is a text-only model"
        raise ExportError(f"{fmt} needs the parts {needs}; this model {has} (missing: {', '.join(missing)})")
    out = Written(config={"architectures": list(spec.architectures), "model_type": spec.model_type,
                          spec.dtype_key: dtype},
                  not_stored=set(NOT_STORED_ANYWHERE) | {s for w in writers for s in w.not_stored})
    if token_id is not None:
        out.token_id = token_id
    for w in writers:
        w.fn(cfg, out)
    try:
        lm = spec.lm(cfg.language)
    except ExportError as e:
        raise ExportError(f"{fmt}: language model: {e}") from None
    if spec.lm_key is None:
        out.config.update(lm)
    else:
        out.config[spec.lm_key] = dict(lm, **{spec.dtype_key: dtype})
    if "_golden_overrides" in out.config:  # last, as in the fixtures
        out.config["_golden_overrides"] = out.config.pop("_golden_overrides")
    return out

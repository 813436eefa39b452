"""The language model in every checkpoint format: DeepSeek-V2/V3-style configs (official DeepSeek-VL2's own
`DeepseekV2Config`, transformers' `deepseek_v2` / `deepseek_v3`) and LLaMA configs (official Janus's
transformers 4.38 `LlamaConfig`, transformers 5 `llama` / `janus` text config), read into `LMConfig` and
written back.

Each reader fills missing fields with the defaults of the config class that format was written for, so a
field a checkpoint leaves out means what it means to that checkpoint's own code. Every field is read as
data: a size that is not an integer in range is a `ConfigError` naming the file and field.
"""
from __future__ import annotations

from typing import Optional

from ..config import LMConfig, MLAConfig, MoEConfig, RopeConfig
from ..errors import ConfigError
from ..io.keymaps import Rule
from .common import get_float, get_int, need

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


def _rope(c: dict, style: str, where: str) -> RopeConfig:
    """Read rope settings from legacy (`rope_theta`, `rope_scaling`) or v5 (`rope_parameters`) fields."""
    params = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or None
    if not isinstance(params, dict) or not (scaling is None or isinstance(scaling, dict)):
        raise ConfigError(f"{where}: rope_parameters / rope_scaling must be objects")
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
    theta = 10000.0 if theta is None else get_float({"rope_theta": theta}, "rope_theta", where)
    rope = RopeConfig(theta=theta, style=style, scaling=scaling)
    try:
        rope.validate()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return rope


def _with_defaults(c: dict, defaults: dict, where: str) -> dict:
    if not isinstance(c, dict):
        raise ConfigError(f"{where}: expected an object, got {type(c).__name__}")
    out = dict(defaults)
    out.update(c)
    return out


def _opt_int(c: dict, key: str, where: str, default: int = 0, lo: int = 0) -> int:
    """An integer field that may be null / 0 / absent (then `default`), as `int(c.get(key) or default)`."""
    return default if c.get(key) in (None, 0) else get_int(c, key, where, lo=lo)


def _common_kw(c: dict, where: str, heads: int) -> dict:
    eos = c.get("eos_token_id")
    return dict(
        vocab_size=get_int(c, "vocab_size", where), hidden_size=get_int(c, "hidden_size", where),
        num_layers=get_int(c, "num_hidden_layers", where, hi=1024), num_heads=heads,
        intermediate_size=get_int(c, "intermediate_size", where),
        num_kv_heads=_opt_int(c, "num_key_value_heads", where, heads, lo=1),
        rms_norm_eps=get_float(c, "rms_norm_eps", where), attention_bias=bool(c.get("attention_bias")),
        mlp_bias=bool(c.get("mlp_bias", False)), hidden_act=c.get("hidden_act", "silu"),
        tie_word_embeddings=bool(c.get("tie_word_embeddings")),
        max_position_embeddings=_opt_int(c, "max_position_embeddings", where, 4096, lo=1),
        bos_token_id=get_int(c, "bos_token_id", where, lo=0, optional=True),
        eos_token_id=eos if isinstance(eos, list) else get_int(c, "eos_token_id", where, lo=0, optional=True),
        pad_token_id=get_int(c, "pad_token_id", where, lo=0, optional=True),
    )


def _moe(c: dict, where: str) -> Optional[MoEConfig]:
    if not c.get("n_routed_experts"):
        return None
    method = c.get("topk_method")
    if method not in ("greedy", "group_limited_greedy", "noaux_tc"):
        raise ConfigError(
            f"{where}: topk_method {method!r} is not a routing method (greedy, group_limited_greedy, noaux_tc); "
            "the official DeepseekV2Config default 'gready' crashes the official gate too: set it explicitly"
        )
    if not c.get("num_experts_per_tok"):
        raise ConfigError(f"{where}: MoE config (n_routed_experts={c['n_routed_experts']}) lacks num_experts_per_tok")
    return MoEConfig(
        n_routed_experts=get_int(c, "n_routed_experts", where, hi=4096),
        num_experts_per_tok=get_int(c, "num_experts_per_tok", where, hi=4096),
        moe_intermediate_size=get_int(c, "moe_intermediate_size", where),
        n_shared_experts=_opt_int(c, "n_shared_experts", where),
        first_k_dense_replace=_opt_int(c, "first_k_dense_replace", where),
        moe_layer_freq=_opt_int(c, "moe_layer_freq", where, 1, lo=1),
        scoring_func=c.get("scoring_func", "softmax"),
        topk_method=method,
        n_group=_opt_int(c, "n_group", where, 1, lo=1),
        topk_group=_opt_int(c, "topk_group", where, 1, lo=1),
        norm_topk_prob=bool(c.get("norm_topk_prob")),
        routed_scaling_factor=get_float(c, "routed_scaling_factor", where) if c.get("routed_scaling_factor") else 1.0,
    )


def lm_from_deepseek(c: dict, defaults: dict, where: str, rope_style: Optional[str] = None) -> LMConfig:
    """DeepSeek-V2/V3-style config dict (official VL2 or transformers) -> LMConfig."""
    c = _with_defaults(c, defaults, where)
    heads = get_int(c, "num_attention_heads", where, hi=4096)
    if c.get("moe_layer_freq") == 0:
        raise ConfigError(f"{where}: moe_layer_freq must be an integer >= 1, got 0")
    kw = dict(_common_kw(c, where, heads), moe=_moe(c, where))
    if c.get("use_mla", True):
        kw.update(
            attention="mla",
            mla=MLAConfig(
                q_lora_rank=get_int(c, "q_lora_rank", where, optional=True) if c.get("q_lora_rank") else None,
                kv_lora_rank=get_int(c, "kv_lora_rank", where), qk_nope_head_dim=get_int(c, "qk_nope_head_dim", where, lo=0),
                qk_rope_head_dim=get_int(c, "qk_rope_head_dim", where), v_head_dim=get_int(c, "v_head_dim", where),
            ),
            rope=_rope(c, rope_style or "interleaved", where),
        )
        kw["num_kv_heads"] = heads
    else:
        # DeepSeek-VL2-tiny: transformers' LlamaAttention driven by the DeepseekV2 config.
        kw.update(attention="mha", head_dim=kw["hidden_size"] // heads, rope=_rope(c, rope_style or "neox", where))
    return _validated(LMConfig(**kw), where)


def lm_from_llama(c: dict, where: str, tie_default: Optional[bool] = None) -> LMConfig:
    c = _with_defaults(c, LLAMA_DEFAULTS, where)
    heads = get_int(c, "num_attention_heads", where, hi=4096)
    kw = _common_kw(c, where, heads)
    kw.update(
        head_dim=_opt_int(c, "head_dim", where, kw["hidden_size"] // heads, lo=1), attention="mha",
        rope=_rope(c, "neox", where), mlp_bias=bool(c.get("mlp_bias")),
        max_position_embeddings=_opt_int(c, "max_position_embeddings", where, 2048, lo=1),
        tie_word_embeddings=bool(c.get("tie_word_embeddings") if tie_default is None else tie_default),
    )
    return _validated(LMConfig(**kw), where)


def _validated(lm: LMConfig, where: str) -> LMConfig:
    try:
        return lm.validate()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


# ------------------------------------------------------------------------------------------ writers


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
    need(not lm.mlp_bias, "the official DeepseekV2MLP has no biases (language.mlp_bias is True)")
    return dict(_deepseek(lm, "deepseek_v2"), architectures=["DeepseekV2ForCausalLM"], ep_size=1,
                **_legacy_rope(lm.rope))


def _hf_mla(lm: LMConfig) -> None:
    need(lm.attention == "mla", f"transformers' model is MLA only; this language model uses "
                                      f"{lm.attention!r} attention")
    if lm.moe is not None:
        # transformers builds an MoE block on every layer from first_k_dense_replace on
        need(lm.moe.moe_layer_freq == 1, f"moe_layer_freq {lm.moe.moe_layer_freq} is not supported (only 1)")


def lm_to_hf_deepseek_v2(lm: LMConfig) -> dict:
    _hf_mla(lm)
    moe = lm.moe
    if moe is not None:  # transformers' DeepseekV2TopkRouter: softmax scores, no renormalisation
        need(moe.scoring_func == "softmax", f"router scoring_func {moe.scoring_func!r} is not supported "
                                                  "(softmax only; sigmoid + noaux_tc is hf_deepseek_v3)")
        need(moe.topk_method in ("greedy", "group_limited_greedy"),
              f"topk_method {moe.topk_method!r} is not supported (greedy, group_limited_greedy)")
        need(not moe.norm_topk_prob, "norm_topk_prob=True is not supported (transformers ignores it)")
    return dict(_deepseek(lm, "deepseek_v2"), mlp_bias=lm.mlp_bias, rope_parameters=_rope_parameters(lm.rope))


def lm_to_hf_deepseek_v3(lm: LMConfig) -> dict:
    _hf_mla(lm)
    moe = lm.moe
    need(moe is not None, "transformers' DeepseekV3 needs routed experts; this language model is dense")
    need((moe.scoring_func, moe.topk_method) == ("sigmoid", "noaux_tc"),
          f"router {moe.scoring_func} + {moe.topk_method} is not supported (sigmoid + noaux_tc only; softmax "
          "routers are hf_deepseek_v2)")
    return dict(_deepseek(lm, "deepseek_v3"), rope_interleave=lm.rope.style == "interleaved",
                rope_parameters=_rope_parameters(lm.rope))


def _llama(lm: LMConfig) -> None:
    need(lm.attention == "mha" and lm.moe is None, f"a LLaMA decoder has dense MLPs and multi-head "
          f"attention; this language model has {lm.attention!r} attention{' and routed experts' if lm.moe else ''}")


def lm_to_official_llama(lm: LMConfig) -> dict:
    """Janus / JanusFlow `language_config` (transformers 4.38 LlamaConfig: no head_dim, no mlp_bias)."""
    _llama(lm)
    return dict(model_type="llama", **_common(lm), **_legacy_rope(lm.rope))


def lm_to_hf_llama(lm: LMConfig) -> dict:
    _llama(lm)
    return dict(model_type="llama", **_common(lm), head_dim=lm.head_dim, mlp_bias=lm.mlp_bias,
                rope_parameters=_rope_parameters(lm.rope))


# ------------------------------------------------------------------------------------------ key rules


def lm_rules(model_prefix: str, lm_head: str, prefix: str = "language.") -> list[Rule]:
    """Rules for a DeepSeek/LLaMA decoder under `model_prefix`.

    Per-expert source keys (`experts.{j}.gate_proj.weight`, ...) are stacked into the internal
    `experts.gate_up_proj` [E, 2I, H] (gate rows first) / `experts.down_proj` [E, H, I]; export writes
    them per expert again. Already-fused keys in that same layout (transformers 5's in-memory names,
    `experts.gate_up_proj` / `experts.down_proj`) load unchanged through the catch-all rule.
    """
    p, d = model_prefix, prefix
    experts = f"{p}layers.{{i}}.mlp.experts."
    dexp = f"{d}layers.{{i}}.mlp.experts."
    return [
        Rule(experts + "{j}.gate_proj.weight", dexp + "gate_up_proj", stack=True, part=(0, 2)),
        Rule(experts + "{j}.up_proj.weight", dexp + "gate_up_proj", stack=True, part=(1, 2)),
        Rule(experts + "{j}.down_proj.weight", dexp + "down_proj", stack=True),
        Rule(lm_head, d + "lm_head.weight"),
        Rule(p + "{rest}", d + "{rest}"),
    ]

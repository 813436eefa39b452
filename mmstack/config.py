"""Configuration dataclasses.

`LMConfig` describes the one language backbone (dense or MoE, MHA/GQA or MLA). `ModelConfig` is the
composite: a language model plus optional parts that later layers (vision, generation) describe with
their own dataclasses, registered in `SECTIONS` so that the native `config.json` round-trips exactly.

Family differences are explicit fields (attention kind, rope style, score function, ...), never names.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from typing import Any, Optional

FORMAT_VERSION = 1


class ConfigError(ValueError):
    """A config.json that cannot be read or describes an impossible model."""


@dataclass
class RopeConfig:
    """Rotary position embedding.

    style: "neox" (LLaMA rotate-half over the head) or "interleaved" (GPT-J pairs (x0,x1),(x2,x3)...;
    DeepSeek MLA's de-interleave + rotate-half computes the same rotation).
    scaling: None, or a dict with "type" in {"linear", "yarn", "dynamic"} and its parameters.
    """

    theta: float = 10000.0
    style: str = "neox"
    scaling: Optional[dict] = None

    def validate(self) -> None:
        if self.style not in ("neox", "interleaved"):
            raise ConfigError(f"rope.style must be 'neox' or 'interleaved', got {self.style!r}")
        if self.scaling is not None:
            kind = self.scaling.get("type")
            if kind not in ("linear", "yarn", "dynamic", "default"):
                raise ConfigError(f"unsupported rope scaling type {kind!r} (supported: linear, yarn, dynamic)")


@dataclass
class MLAConfig:
    """Multi-head Latent Attention dimensions (DeepSeek-V2 §2.1)."""

    q_lora_rank: Optional[int]  # None: q_proj directly; else q_a_proj -> RMSNorm -> q_b_proj
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


@dataclass
class MoEConfig:
    """DeepSeekMoE: routed experts + always-on shared experts, router in fp32."""

    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    n_shared_experts: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    scoring_func: str = "softmax"  # softmax | sigmoid
    topk_method: str = "greedy"  # greedy | group_limited_greedy | noaux_tc
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0

    def validate(self) -> None:
        if self.scoring_func not in ("softmax", "sigmoid"):
            raise ConfigError(f"moe.scoring_func must be softmax or sigmoid, got {self.scoring_func!r}")
        if self.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise ConfigError(f"moe.topk_method {self.topk_method!r} is not one of greedy, group_limited_greedy, noaux_tc")
        if self.n_routed_experts % max(self.n_group, 1):
            raise ConfigError(f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
        if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..{self.n_routed_experts}")
        if self.topk_group > self.n_group:
            raise ConfigError(f"topk_group={self.topk_group} > n_group={self.n_group}")

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0


@dataclass
class LMConfig:
    """The language backbone. `attention` is "mha" (covers GQA through num_kv_heads) or "mla"."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    attention: str = "mha"
    mla: Optional[MLAConfig] = None
    moe: Optional[MoEConfig] = None
    rope: RopeConfig = field(default_factory=RopeConfig)
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Any] = None  # int or list of ints
    pad_token_id: Optional[int] = None

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None and self.attention == "mha":
            self.head_dim = self.hidden_size // self.num_heads

    def validate(self) -> "LMConfig":
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
            if getattr(self, name) is None or getattr(self, name) <= 0:
                raise ConfigError(f"language.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.attention not in ("mha", "mla"):
            raise ConfigError(f"language.attention must be 'mha' or 'mla', got {self.attention!r}")
        if self.attention == "mla" and self.mla is None:
            raise ConfigError("language.attention is 'mla' but no mla dimensions are given")
        if self.attention == "mha" and self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (only silu / SwiGLU)")
        self.rope.validate()
        if self.moe is not None:
            self.moe.validate()
        return self

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def kv_values_per_token(self) -> int:
        """Cached values per token summed over layers (MLA: kv_lora_rank + rope dim; MHA: 2·kv_heads·head_dim)."""
        if self.attention == "mla":
            return (self.mla.kv_lora_rank + self.mla.qk_rope_head_dim) * self.num_layers
        return 2 * self.num_kv_heads * self.head_dim * self.num_layers


# ---------------------------------------------------------------------------------------------
# generic dataclass <-> dict (exact round trip, nested dataclasses and Optional sections)


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


_NESTED = {
    (LMConfig, "mla"): MLAConfig,
    (LMConfig, "moe"): MoEConfig,
    (LMConfig, "rope"): RopeConfig,
}


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass `cls` from `data`, refusing unknown keys (a typo must not pass silently)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected an object, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown keys {unknown}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        sub = _NESTED.get((cls, f.name)) or SECTION_NESTED.get((cls, f.name))
        if sub is not None and value is not None:
            value = from_dict(sub, value, f"{where}.{f.name}" if where else f.name)
        elif isinstance(value, list) and "tuple" in str(f.type).lower():
            value = tuple(value)  # JSON has no tuples; keep the dataclass equal after a round trip
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


# Later layers register their sections here: name -> dataclass (vision, projector, vq, flow, ...).
SECTIONS: dict[str, type] = {}
SECTION_NESTED: dict[tuple, type] = {}


def register_section(name: str, cls: type, nested: Optional[dict] = None) -> type:
    SECTIONS[name] = cls
    for attr, sub in (nested or {}).items():
        SECTION_NESTED[(cls, attr)] = sub
    return cls


@dataclass
class ModelConfig:
    """A composite mmstack model: the language model plus optional named parts.

    `source_format` records where the config was translated from ("mmstack", "deepseek_vl_v2",
    "multi_modality", "hf_deepseek_v2", ...) so the matching key table can be chosen.
    """

    language: LMConfig
    parts: dict = field(default_factory=dict)  # section name -> dataclass instance
    source_format: str = field(default="mmstack", compare=False)
    name: Optional[str] = None

    def validate(self) -> "ModelConfig":
        self.language.validate()
        for key, part in self.parts.items():
            if hasattr(part, "validate"):
                part.validate()
        return self

    def to_json_dict(self) -> dict:
        out = {"model_type": "mmstack", "format_version": FORMAT_VERSION}
        if self.name:
            out["name"] = self.name
        out["language"] = to_dict(self.language)
        for key in sorted(self.parts):
            out[key] = to_dict(self.parts[key])
        return out

    @classmethod
    def from_json_dict(cls, data: dict, where: str = "config.json") -> "ModelConfig":
        if data.get("model_type") != "mmstack":
            raise ConfigError(f"{where}: model_type is {data.get('model_type')!r}, expected 'mmstack'")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ConfigError(f"{where}: format_version {version!r} is not supported (this mmstack reads {FORMAT_VERSION})")
        if "language" not in data:
            raise ConfigError(f"{where}: missing the 'language' section")
        parts = {}
        for key, value in data.items():
            if key in ("model_type", "format_version", "name", "language"):
                continue
            if key not in SECTIONS:
                raise ConfigError(f"{where}: unknown section {key!r} (known: {sorted(SECTIONS)})")
            parts[key] = from_dict(SECTIONS[key], value, f"{where}:{key}")
        lm = from_dict(LMConfig, data["language"], f"{where}:language")
        return cls(language=lm, parts=parts, source_format="mmstack", name=data.get("name")).validate()

    def dumps(self) -> str:
        return json.dumps(self.to_json_dict(), indent=2, sort_keys=False) + "\n"

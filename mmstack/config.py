"""Configuration dataclasses.

`LMConfig` describes the one language backbone (dense or MoE, MHA/GQA or MLA). `ModelConfig` is the
composite: a language model plus optional typed sections (vision tower, projector, layout, image processing,
chat format, VQ tokenizer and head, flow encoder / decoder / head; `mmstack.part_configs`), each `None` when
the model lacks that part. The native `config.json` is this dataclass tree, one JSON object per section.

Family differences are explicit fields (attention kind, rope style, score function, ...), never names.
Every size is validated as data (an integer in a range, named by section and field) before anything is built.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Mapping, Optional

from .chat import ChatConfig
from .errors import ConfigError
from .part_configs import (FlowGenerationConfig, ImageProcessingConfig, LayoutConfig, ProjectorConfig,
                           UViTDecoderConfig, UViTEncoderConfig, VisionTowerConfig, VQConfig, VQGenerationConfig,
                           check_float, check_int)

__all__ = ["ConfigError", "RopeConfig", "MLAConfig", "MoEConfig", "LMConfig", "ModelConfig", "SECTIONS",
           "to_dict", "from_dict", "FORMAT_VERSION"]

FORMAT_VERSION = 1
MAX_LAYERS = 1024  # DeepSeek-V3 has 61; anything beyond this is a typo or an attack, refused before building
MAX_WIDTH = 1 << 17
MAX_VOCAB = 1 << 22
MAX_CONTEXT = 1 << 22


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
        check_float(self.theta, "rope.theta", 1.0)
        if self.scaling is not None:
            if not isinstance(self.scaling, dict):
                raise ConfigError(f"rope.scaling must be an object, got {self.scaling!r:.60}")
            kind = self.scaling.get("type")
            if kind not in ("linear", "yarn", "dynamic", "default"):
                raise ConfigError(f"unsupported rope scaling type {kind!r} (supported: linear, yarn, dynamic)")
            if kind in ("linear", "yarn", "dynamic"):
                check_float(self.scaling.get("factor"), "rope.scaling.factor", 0.0, 1e6)
            if kind == "yarn" and "original_max_position_embeddings" in self.scaling:
                check_int(self.scaling["original_max_position_embeddings"],
                          "rope.scaling.original_max_position_embeddings", 1, MAX_CONTEXT)


@dataclass
class MLAConfig:
    """Multi-head Latent Attention dimensions (DeepSeek-V2 §2.1)."""

    q_lora_rank: Optional[int]  # None: q_proj directly; else q_a_proj -> RMSNorm -> q_b_proj
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    def validate(self) -> None:
        if self.q_lora_rank is not None:
            check_int(self.q_lora_rank, "mla.q_lora_rank", 1, MAX_WIDTH)
        check_int(self.kv_lora_rank, "mla.kv_lora_rank", 1, MAX_WIDTH)
        check_int(self.qk_nope_head_dim, "mla.qk_nope_head_dim", 0, 4096)
        check_int(self.qk_rope_head_dim, "mla.qk_rope_head_dim", 2, 4096)
        check_int(self.v_head_dim, "mla.v_head_dim", 1, 4096)
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"mla.qk_rope_head_dim must be even (rotary pairs), got {self.qk_rope_head_dim}")


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
        check_int(self.n_routed_experts, "moe.n_routed_experts", 1, 4096)
        check_int(self.moe_intermediate_size, "moe.moe_intermediate_size", 1, MAX_WIDTH)
        check_int(self.n_shared_experts, "moe.n_shared_experts", 0, 64)
        check_int(self.first_k_dense_replace, "moe.first_k_dense_replace", 0, MAX_LAYERS)
        check_int(self.moe_layer_freq, "moe.moe_layer_freq", 1, MAX_LAYERS)
        check_int(self.n_group, "moe.n_group", 1, self.n_routed_experts)
        check_int(self.topk_group, "moe.topk_group", 1, 4096)
        check_float(self.routed_scaling_factor, "moe.routed_scaling_factor", 0.0, 1e4)
        if self.n_routed_experts % self.n_group:
            raise ConfigError(f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
        check_int(self.num_experts_per_tok, "moe.num_experts_per_tok", 1, self.n_routed_experts)
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
        if (self.head_dim is None and self.attention == "mha" and isinstance(self.hidden_size, int)
                and isinstance(self.num_heads, int) and self.num_heads > 0):
            self.head_dim = self.hidden_size // self.num_heads

    def validate(self) -> "LMConfig":
        for name, hi in (("vocab_size", MAX_VOCAB), ("hidden_size", MAX_WIDTH), ("num_layers", MAX_LAYERS),
                         ("num_heads", 4096), ("intermediate_size", MAX_WIDTH),
                         ("max_position_embeddings", MAX_CONTEXT)):
            check_int(getattr(self, name), f"language.{name}", 1, hi)
        check_int(self.num_kv_heads, "language.num_kv_heads", 1, 4096)
        check_float(self.rms_norm_eps, "language.rms_norm_eps", 0.0, 1.0)
        if self.attention not in ("mha", "mla"):
            raise ConfigError(f"language.attention must be 'mha' or 'mla', got {self.attention!r}")
        if self.attention == "mla":
            if self.mla is None:
                raise ConfigError("language.attention is 'mla' but no mla dimensions are given")
            self.mla.validate()
        else:
            check_int(self.head_dim, "language.head_dim", 1, 4096)
            if self.num_heads % self.num_kv_heads:
                raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
            if self.head_dim % 2:
                raise ConfigError(f"language.head_dim must be even (rotary pairs), got {self.head_dim}")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (only silu / SwiGLU)")
        for name in ("bos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is not None:
                check_int(v, f"language.{name}", 0, MAX_VOCAB)
        for v in self.eos_ids:
            check_int(v, "language.eos_token_id", 0, MAX_VOCAB)
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
# Keys older native files carry that no longer mean anything: dropped on read.
_RETIRED = {ChatConfig: ("template",)}


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass `cls` from `data`, refusing unknown keys (a typo must not pass silently)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected an object, got {type(data).__name__}")
    data = {k: v for k, v in data.items() if k not in _RETIRED.get(cls, ())}
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown keys {unknown}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        sub = _NESTED.get((cls, f.name))
        if sub is not None and value is not None:
            value = from_dict(sub, value, f"{where}.{f.name}" if where else f.name)
        elif isinstance(value, list) and "tuple" in str(f.type).lower():
            value = tuple(value)  # JSON has no tuples; keep the dataclass equal after a round trip
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, ArithmeticError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


# The optional sections of a composite model, in the order they are written: name -> dataclass.
SECTIONS: dict[str, type] = {
    "chat": ChatConfig,
    "flow_decoder": UViTDecoderConfig,
    "flow_encoder": UViTEncoderConfig,
    "flow_head": FlowGenerationConfig,
    "image_processing": ImageProcessingConfig,
    "layout": LayoutConfig,
    "projector": ProjectorConfig,
    "vision": VisionTowerConfig,
    "vq": VQConfig,
    "vq_head": VQGenerationConfig,
}


@dataclass
class ModelConfig:
    """A composite mmstack model: the language model plus the optional parts it has (`None` otherwise).

    `source_format` records where the config was translated from ("mmstack", "deepseek_vl_v2", "janus",
    "janusflow", "hf_deepseek_v2", ...) so the matching key table can be chosen (`mmstack.formats`).
    """

    language: LMConfig
    vision: Optional[VisionTowerConfig] = None
    projector: Optional[ProjectorConfig] = None
    layout: Optional[LayoutConfig] = None
    image_processing: Optional[ImageProcessingConfig] = None
    chat: Optional[ChatConfig] = None
    vq: Optional[VQConfig] = None
    vq_head: Optional[VQGenerationConfig] = None
    flow_encoder: Optional[UViTEncoderConfig] = None
    flow_decoder: Optional[UViTDecoderConfig] = None
    flow_head: Optional[FlowGenerationConfig] = None
    source_format: str = field(default="mmstack", compare=False)
    name: Optional[str] = None

    @property
    def parts(self) -> Mapping[str, Any]:
        """The sections present, name -> dataclass (read-only: change sections with `with_parts` / `only`)."""
        return MappingProxyType({k: getattr(self, k) for k in SECTIONS if getattr(self, k) is not None})

    def with_parts(self, **sections) -> "ModelConfig":
        """A copy with sections replaced (`None` removes one)."""
        unknown = set(sections) - set(SECTIONS)
        if unknown:
            raise ConfigError(f"unknown sections {sorted(unknown)} (known: {sorted(SECTIONS)})")
        return dataclasses.replace(self, **sections)

    def only(self, keep) -> "ModelConfig":
        """A copy keeping the language model and the named sections only."""
        return dataclasses.replace(self, **{k: None for k in SECTIONS if k not in set(keep)})

    def validate(self) -> "ModelConfig":
        self.language.validate()
        for name, part in self.parts.items():
            if not isinstance(part, SECTIONS[name]):
                raise ConfigError(f"section {name!r} must be a {SECTIONS[name].__name__}, got {type(part).__name__}")
            part.validate()
        return self

    def to_json_dict(self) -> dict:
        out = {"model_type": "mmstack", "format_version": FORMAT_VERSION}
        if self.name:
            out["name"] = self.name
        out["language"] = to_dict(self.language)
        for key, part in self.parts.items():
            out[key] = to_dict(part)
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
        name = data.get("name")
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"{where}: name must be a string, got {type(name).__name__}")
        return cls(language=lm, source_format="mmstack", name=name, **parts).validate()

    def dumps(self) -> str:
        return json.dumps(self.to_json_dict(), indent=2, sort_keys=False) + "\n"

"""`mmstack.llm`: the one language backbone (dense|MoE x MHA|MLA) used by every family."""
from .attention import Attention
from .cache import CacheFullError, KVCache
from .mla import MLAttention
from .mlp import SwiGLU
from .model import Block, LanguageModel
from .moe import Experts, Gate, MoE
from .norm import RMSNorm
from .rope import RotaryEmbedding
from .step import DecodeStep

__all__ = ["Attention", "Block", "CacheFullError", "DecodeStep", "Experts", "Gate", "KVCache", "LanguageModel", "MLAttention",
           "MoE", "RMSNorm", "RotaryEmbedding", "SwiGLU"]

"""The language backbone shared by every family: embeddings -> L x [norm, attention, norm, MLP|MoE] -> norm.

Notation: B batch, T new tokens, S keys (cached + new), H hidden, V vocab.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import LMConfig
from .attention import Attention
from .cache import KVCache
from .mla import MLAttention
from .mlp import SwiGLU
from .moe import MoE
from .norm import RMSNorm
from .rope import RotaryEmbedding, softmax_scale_factor


class Block(nn.Module):
    def __init__(self, cfg: LMConfig, index: int, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.index = index
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        if cfg.attention == "mla":
            scale = (cfg.mla.qk_nope_head_dim + cfg.mla.qk_rope_head_dim) ** -0.5 * softmax_scale_factor(cfg.rope.scaling)
            self.self_attn = MLAttention(cfg.hidden_size, cfg.num_heads, cfg.mla, cfg.attention_bias, scale,
                                         rope_style=cfg.rope.style, **kw)
        else:
            self.self_attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                       cfg.attention_bias, cfg.rope.style, **kw)
        if cfg.moe is not None and cfg.moe.is_moe_layer(index):
            self.mlp = MoE(cfg.hidden_size, cfg.moe, **kw)
        else:
            self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, **kw)

    def forward(self, h, cos, sin, mask, causal, cache=None):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, causal, cache, self.index)
        return h + self.mlp(self.post_attention_layernorm(h))


class LanguageModel(nn.Module):
    """Decoder-only LM. `forward` returns final-norm hidden states; `logits` applies lm_head in fp32."""

    def __init__(self, cfg: LMConfig, device=None, dtype=None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        kw = dict(device=device, dtype=dtype)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, **kw)
        self.layers = nn.ModuleList(Block(cfg, i, **kw) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, **kw)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        rope_dim = cfg.mla.qk_rope_head_dim if cfg.attention == "mla" else cfg.head_dim
        self.rotary = RotaryEmbedding(rope_dim, cfg.rope.theta, cfg.rope.scaling, device=device)
        self.gradient_checkpointing = False

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def new_cache(self, batch: int, capacity: int, dtype: Optional[torch.dtype] = None) -> KVCache:
        return KVCache(self.cfg, batch, capacity, device=self.device, dtype=dtype or self.dtype)

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        positions: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
    ) -> torch.Tensor:
        """Run the decoder on T new tokens.

        Args:
            input_ids: [B, T] token ids, or
            inputs_embeds: [B, T, H] (multimodal paths splice image embeddings before the LLM).
            attention_mask: [B, T] 1 for real tokens, 0 for (left) padding; None = all real.
            positions: [B, T] rotary positions; default counts real tokens only (left padding safe).
            cache: a `KVCache` continued in place (its length grows by T).
        Returns:
            hidden states after the final norm, [B, T, H].
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t, _ = h.shape
        valid = None if attention_mask is None else attention_mask.to(torch.bool)
        past = cache.length if cache is not None else 0
        if positions is None:
            start = cache.next_pos[:, None] if cache is not None else torch.zeros(b, 1, dtype=torch.long, device=h.device)
            if valid is None:
                positions = start + torch.arange(t, device=h.device)[None]
            else:
                positions = (start + valid.long().cumsum(-1) - 1).clamp_min(0)
        if cache is not None:
            cache.reserve(t, valid)
            key_valid = cache.key_valid[:, : past + t]
        else:
            key_valid = valid
        mask, causal = self._mask(key_valid, b, t, past + t, h.device)
        cos, sin = self.rotary(positions)
        for block in self.layers:
            if self.gradient_checkpointing and self.training and cache is None:
                h = checkpoint(block, h, cos, sin, mask, causal, use_reentrant=False)
            else:
                h = block(h, cos, sin, mask, causal, cache)
        if cache is not None:
            cache.advance(t, valid)
        return self.norm(h)

    @staticmethod
    def _mask(key_valid: Optional[torch.Tensor], b: int, t: int, s: int, device):
        """(additive mask [B,1,T,S] or None, causal flag). Pure causal stays a flag for fused kernels."""
        if key_valid is None or bool(key_valid.all()):
            return None, True
        neg = torch.finfo(torch.float32).min
        keep = torch.ones(t, s, dtype=torch.bool, device=device).tril(s - t)[None] & key_valid[:, None, :]
        return torch.zeros(b, 1, t, s, device=device).masked_fill(~keep[:, None], neg), False

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

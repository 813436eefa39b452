"""The language backbone shared by every family: embeddings -> L x [norm, attention, norm, MLP|MoE] -> norm.

Notation: B batch, T new tokens, S keys (cached + new), H hidden, V vocab.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import LMConfig
from ..kernels.masks import additive, causal_keep
from .attention import Attention
from .cache import KVCache
from .fused import _ATTR as _PACKED, pack
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

    def fuse_projections(self) -> int:
        """Pack every group of projections that read the same input (q/k/v; gate/up, shared experts
        included; MLA's query and kv latent) into one tensor per group, so inference runs one matmul per
        group (see `mmstack.llm.fused`). Parameters keep their names, values and state-dict form.
        Returns the number of groups packed; a later `.to()` re-packs."""
        self._fused = True
        n = 0
        for m in self.modules():
            names = getattr(m, "input_projections", None)
            if names is not None:
                m.__dict__.pop(_PACKED, None)
                n += pack(m, names)
        return n

    def unfuse_projections(self) -> None:
        """Forget the packed tensors (the parameters stay views of them until something re-allocates
        them): call before FSDP sharding, which would otherwise leave a full copy on every rank."""
        self._fused = False
        for m in self.modules():
            m.__dict__.pop(_PACKED, None)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if getattr(self, "_fused", False):  # moved or cast: the packed tensors must follow the parameters
            self.fuse_projections()
        return out

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
        if cache is not None and cache.static:
            return self._static_step(h, attention_mask, positions, cache)
        valid = None if attention_mask is None else attention_mask.to(torch.bool)
        table = cache if positions is None else None  # default positions stay below the cache capacity
        if positions is None:
            start = cache.next_pos[:, None] if cache is not None else torch.zeros(b, 1, dtype=torch.long, device=h.device)
            if valid is None:
                positions = start if t == 1 else start + torch.arange(t, device=h.device)[None]
            else:
                positions = (start + valid.long().cumsum(-1) - 1).clamp_min(0)
        if cache is not None:
            cache.reserve(t, valid)
            mask, causal = cache.mask(t)
        else:
            mask, causal = self._mask(valid, b, t, t, h.device)
        cos, sin = self._rope_tables(positions, h.dtype, table)
        for block in self.layers:
            if self.gradient_checkpointing and self.training and cache is None:
                h = checkpoint(block, h, cos, sin, mask, causal, use_reentrant=False)
            else:
                h = block(h, cos, sin, mask, causal, cache)
        if cache is not None:
            cache.advance(t, valid)
        return self.norm(h)

    def _static_step(self, h: torch.Tensor, attention_mask, positions, cache: KVCache) -> torch.Tensor:
        """One token per row on a static cache: fixed shapes, no host sync (see `KVCache.enter_static`).
        The caller advances `cache.length` (host bookkeeping stays outside a captured graph)."""
        if h.shape[1] != 1 or attention_mask is not None or positions is not None:
            raise ValueError("a static cache step takes exactly one token per row, without mask or positions")
        positions, mask = cache.static_reserve()
        cos, sin = self._rope_tables(positions, h.dtype, cache)
        for block in self.layers:
            h = block(h, cos, sin, mask, False, cache)
        cache.static_advance()
        return self.norm(h)

    def _rope_tables(self, positions: torch.Tensor, dtype: torch.dtype,
                     cache: Optional[KVCache] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [B,1,T,D] (computed in fp32, cast once per forward rather than once per layer). With a
        cache, rows are looked up in a table of every position the cache can hold, built on first use: a
        decode step then costs two lookups, and the values are the same elementwise fp32 results."""
        if cache is None:
            cos, sin = self.rotary(positions)
            return cos.unsqueeze(1).to(dtype), sin.unsqueeze(1).to(dtype)
        tab = cache.rope_table
        if tab is None or tab[0].dtype != dtype:
            cos, sin = self.rotary(torch.arange(cache.capacity, device=positions.device)[None])  # [1,S,D]
            tab = cache.rope_table = (cos[0].to(dtype), sin[0].to(dtype))
        return F.embedding(positions, tab[0]).unsqueeze(1), F.embedding(positions, tab[1]).unsqueeze(1)

    @staticmethod
    def _mask(key_valid: Optional[torch.Tensor], b: int, t: int, s: int, device):
        """(additive mask [B,1,T,S] or None, causal flag). Pure causal stays a flag for fused kernels."""
        if key_valid is None or bool(key_valid.all()):
            return None, True
        keep = causal_keep(t, s, device)[None] & key_valid[:, None, :]  # [B,T,S]
        return additive(keep[:, None]), False

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

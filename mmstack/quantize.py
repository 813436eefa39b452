"""Weight-only quantization at load time: `mmstack.load(..., quantize="int8" | "int4")`.

What is quantized: every `nn.Linear` of the language model's decoder layers (attention projections, dense
and shared-expert MLPs) and the stacked routed experts (`Experts.gate_up_proj` / `down_proj`, most of an MoE
model's bytes). What is not: embeddings, norms, routers (`Gate`), the output heads (`lm_head`, image heads),
MLA's `kv_b_proj` (read as a matrix by the absorbed decode; small), the vision tower and the generation parts.
Activations stay in the model dtype; weights are dequantized on the fly.

Schemes (symmetric, round to nearest, scales in the model dtype):
    int8: one scale per output channel; [out, in] int8. Linear layers use torch's fused int8 weight kernel
        (`torch._weight_int8pack_mm`) where it runs, else dequantize + matmul.
    int4: one scale per group of 64 input columns, its range clipped where that lowers the group's error (32, 16 or 8 where 64 does not divide the width; int8 where
        none does); two values per byte ([out, in / 2] uint8, low nibble first). Always dequantize + matmul:
        it saves memory, not time, on CPUs.
Experts dequantize only the experts a forward routes tokens to (all of them during CUDA-graph capture).

Why not torchao / bitsandbytes: torchao 0.18 quantizes `nn.Linear` only (int4 needs its GPU `mslk`
kernels) and bitsandbytes is CUDA-first; neither handles stacked 3-D expert tensors, which hold ~90% of the
weights of DeepSeek-VL2-small. These formats are for inference: training, LoRA and export refuse them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .llm.moe import Experts

SCHEMES = ("int8", "int4")
INT4_GROUP = 64
INT4_CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)  # fractions of a group's largest |w| tried as its range
SKIP = ("kv_b_proj",)  # read as a matrix (absorbed MLA): kept in the model dtype

__all__ = ["SCHEMES", "QuantLinear", "QuantExperts", "quantize_model", "quantize_weight", "dequantize_weight",
           "is_quantized", "check_scheme", "scheme_for", "weight_bytes"]


def check_scheme(scheme) -> Optional[str]:
    if scheme is None:
        return None
    if scheme not in SCHEMES:
        raise ValueError(f"quantize must be one of {SCHEMES} (or None), got {scheme!r}")
    return scheme


# ------------------------------------------------------------------------------------------- tensors
def quantize_weight(w: torch.Tensor, scheme: str, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., out, in] -> (q, scale). int8: q [..., out, in] int8, scale [..., out]; int4: q [..., out, in/2]
    uint8, scale [..., out, in/group]. Computed in fp32 one matrix at a time (bounded temporaries); scales are
    returned in w's dtype."""
    if w.dim() > 2:  # stacked experts: one matrix at a time
        parts = [quantize_weight(m, scheme, group) for m in w.reshape(-1, *w.shape[-2:])]
        q, s = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
        return q.view(*w.shape[:-2], *q.shape[1:]), s.view(*w.shape[:-2], *s.shape[1:])
    wf = w.detach().float()
    if scheme == "int8":
        scale = wf.abs().amax(-1).clamp(min=1e-12) / 127.0
        q = torch.round(wf / scale[..., None]).clamp(-127, 127).to(torch.int8)
        return q, scale.to(w.dtype)
    out, cols = wf.shape
    g = wf.reshape(out, cols // group, group)
    amax = g.abs().amax(-1).clamp(min=1e-12)
    scale, best = amax / 7.0, None
    for clip in INT4_CLIPS:  # per group, the clipping range with the least squared error (outliers clipped)
        s = amax * (clip / 7.0)
        err = (torch.round(g / s[..., None]).clamp(-8, 7) * s[..., None] - g).square().sum(-1)
        if best is None:
            best = err
        else:
            better = err < best
            scale, best = torch.where(better, s, scale), torch.minimum(err, best)
    q = (torch.round(g / scale[..., None]).clamp(-8, 7) + 8).to(torch.uint8).view(out, cols)
    return q[:, 0::2] | (q[:, 1::2] << 4), scale.to(w.dtype)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, scheme: str, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of `quantize_weight` up to rounding: [..., out, in] in `dtype`."""
    if scheme == "int8":
        return q.to(dtype) * scale[..., None].to(dtype)
    low, high = (q & 0xF).to(dtype) - 8, (q >> 4).to(dtype) - 8
    vals = torch.stack([low, high], -1).flatten(-2)  # [..., out, in]
    groups = scale.shape[-1]
    vals = vals.unflatten(-1, (groups, vals.shape[-1] // groups))
    return (vals * scale[..., None].to(dtype)).flatten(-2)


def scheme_for(cols: int, scheme: str) -> tuple[str, int]:
    """The scheme and int4 group a weight with `cols` input columns gets (int8 where no int4 group divides)."""
    if scheme == "int4":
        for g in (INT4_GROUP, 32, 16, 8):
            if cols % g == 0:
                return "int4", g
    return "int8", 0


def _fused_int8_ok(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------------------- modules
class QuantLinear(nn.Module):
    """A weight-only quantized `nn.Linear` (inference only). `weight` dequantizes, for code that reads it."""

    def __init__(self, linear: nn.Linear, scheme: str, device=None):
        super().__init__()
        w = linear.weight.detach().to(device or linear.weight.device)
        self.scheme, self.in_features, self.out_features = scheme, linear.in_features, linear.out_features
        self.scheme, group = scheme_for(self.in_features, scheme)
        q, scale = quantize_weight(w, self.scheme, group)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(w.device), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return dequantize_weight(self.qweight, self.scale, self.scheme, self.scale.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scheme == "int8" and _fused_int8_ok(x) and not torch.is_grad_enabled():
            shape = x.shape
            y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.qweight, self.scale.to(x.dtype))
            y = y.view(*shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        return F.linear(x, dequantize_weight(self.qweight, self.scale, self.scheme, x.dtype),
                        None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"


class QuantExperts(nn.Module):
    """Stacked SwiGLU experts with quantized weights; a forward dequantizes only the experts it routes to."""

    def __init__(self, experts: Experts, scheme: str, device=None):
        super().__init__()
        self.schemes = {}
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(experts, name).detach().to(device or getattr(experts, name).device)
            self.schemes[name], group = scheme_for(w.shape[-1], scheme)
            q, scale = quantize_weight(w, self.schemes[name], group)
            self.register_buffer(f"q_{name}", q)
            self.register_buffer(f"s_{name}", scale)
        self.num_experts = experts.gate_up_proj.shape[0]

    def _weights(self, used: Optional[torch.Tensor], dtype) -> tuple[torch.Tensor, torch.Tensor]:
        def one(name):
            q, s = getattr(self, f"q_{name}"), getattr(self, f"s_{name}")
            if used is not None:
                q, s = q[used], s[used]
            return dequantize_weight(q, s, self.schemes[name], dtype)
        return one("gate_up_proj"), one("down_proj")

    @property
    def gate_up_proj(self) -> torch.Tensor:
        return self._weights(None, self.s_gate_up_proj.dtype)[0]

    @property
    def down_proj(self) -> torch.Tensor:
        return self._weights(None, self.s_down_proj.dtype)[1]

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        from . import kernels

        capturing = x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if capturing or idx.numel() >= self.num_experts:
            w_gu, w_d = self._weights(None, x.dtype)  # (a static step, or enough tokens to touch most experts)
            return kernels.moe(x, idx, weight, w_gu, w_d)
        used, local = torch.unique(idx, return_inverse=True)  # the routed experts only, renumbered 0..U-1
        w_gu, w_d = self._weights(used, x.dtype)
        return kernels.moe(x, local.view_as(idx), weight, w_gu, w_d)


# ------------------------------------------------------------------------------------------- models
def quantize_model(model: nn.Module, scheme: str, device=None) -> dict:
    """Quantize the language model of `model` (a `MultimodalModel` or `LanguageModel`) in place, layer by
    layer on `device` (default: where the weights are), so a model held in CPU memory can be quantized onto a
    GPU too small for its full-precision weights. Returns counts: {"linear": n, "experts": n}."""
    check_scheme(scheme)
    lm = getattr(model, "language", model)
    counts = {"linear": 0, "experts": 0}
    for layer in lm.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, Experts):
                    setattr(parent, name, QuantExperts(child, scheme, device))
                    counts["experts"] += 1
                elif type(child) is nn.Linear and name not in SKIP:
                    setattr(parent, name, QuantLinear(child, scheme, device))
                    counts["linear"] += 1
                else:
                    continue
                del child
    if device is not None:
        model.to(device)
    model.quantization = scheme
    return counts


def is_quantized(model: nn.Module) -> bool:
    return getattr(model, "quantization", None) is not None


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers (what the weights take in memory), counting each storage once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total

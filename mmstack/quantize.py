"""Weight-only quantization at load time: `mmstack.load(..., quantize="int8" | "int4")`.

What is quantized: every `nn.Linear` of the language model's decoder layers (attention projections, dense
and shared-expert MLPs) and the stacked routed experts (`Experts.gate_up_proj` / `down_proj`, most of an MoE
model's bytes). What is not: embeddings, norms, routers (`Gate`), the output heads (`lm_head`, image heads),
MLA's `kv_b_proj` (read as a matrix by the absorbed decode; small), the vision tower and the generation parts.
Activations stay in the model dtype; weights are dequantized on the fly.

Schemes (symmetric, round to nearest, scales in the model dtype):
    int8: one scale per output channel; [out, in] int8.
    int4: one scale per group of 64 input columns (32, 16 or 8 where 64 does not divide the width; int8 where
        none does), each group's range clipped where that lowers its error; two values per byte ([out, in/2]
        uint8, low nibble first), or on the CPU torch's own int4 layout for its kernel.

Kernels: on the CPU, matmuls of up to FUSED_MAX_ROWS rows (decode, and each expert's share of a prompt) run
torch's fused weight-only kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) on the quantized
weight (int4 in chunks of that many rows at any length: its layout has no cheap dequantize). Those kernels
are fast for bf16 activations only (fp32 ones are 6-10x slower than a plain fp32
matmul, measured on torch 2.14), so their inputs and scales are rounded to bf16, an error below the weights'
own quantization error. Larger matmuls, other devices and anything with autograd dequantize and use
`F.linear` in the model dtype. Experts run per expert on the CPU (only the routed ones), and elsewhere
dequantize only the routed experts (all of them during CUDA-graph capture or for long prompts).

Why not torchao / bitsandbytes: torchao 0.18 quantizes `nn.Linear` only (int4 needs its GPU `mslk`
kernels) and bitsandbytes is CUDA-first; neither handles stacked 3-D expert tensors, which hold ~90% of the
weights of DeepSeek-VL2-small. These formats are for inference: training, LoRA and export refuse them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .llm.moe import Experts

SCHEMES = ("int8", "int4")
INT4_GROUP = 64
INT4_CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)  # fractions of a group's largest |w| tried as its range
SKIP = ("kv_b_proj",)
FUSED_MAX_ROWS = 64  # rows up to which torch's fused CPU kernels beat dequantize + matmul (2-core x86, torch 2.14)
FUSED_MAX_PAIRS = 64  # (token, expert) pairs up to which int8 experts run pair by pair on the CPU (decode)  # read as a matrix (absorbed MLA): kept in the model dtype

__all__ = ["SCHEMES", "QuantWeight", "QuantLinear", "QuantExperts", "quantize_model", "quantize_weight", "dequantize_weight",
           "is_quantized", "refuse_quantized", "check_scheme", "scheme_for", "weight_bytes"]


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


def _cpu_int4_ok(out_features: int, group: int, device: torch.device) -> bool:
    """torch's CPU int4 kernel takes the weight in its own packed layout (widths divisible by 16, groups of 32..256)."""
    return (device.type == "cpu" and out_features % 16 == 0 and group in (32, 64, 128, 256)
            and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"))


def _unpack_int4(q: torch.Tensor) -> torch.Tensor:
    """[out, in/2] uint8 (low nibble first) -> [out, in] int32 in 0..15."""
    return torch.stack([q & 0xF, q >> 4], -1).flatten(-2).to(torch.int32)


# ------------------------------------------------------------------------------------------- modules
class QuantWeight(nn.Module):
    """One quantized weight [out, in], or a stack of them [E, out, in], with its kernels.

    Layouts: "portable" (`quantize_weight`'s, any device: dequantize + matmul, or torch's fused int8 kernel on
    the CPU) and "cpu_int4" (torch's CPU int4 kernel layout, made at load time when the weight lives on the
    CPU: matmuls run on the packed weight, nothing is dequantized)."""

    def __init__(self, w: torch.Tensor, scheme: str):
        super().__init__()
        self.shape = tuple(w.shape)
        self.scheme, self.group = scheme_for(w.shape[-1], scheme)
        q, scale = quantize_weight(w, self.scheme, self.group)
        self.layout = "portable"
        if self.scheme == "int4" and _cpu_int4_ok(w.shape[-2], self.group, w.device):
            self.layout = "cpu_int4"
            mats, scales = q.reshape(-1, *q.shape[-2:]), scale.reshape(-1, *scale.shape[-2:])
            q = torch.stack([torch.ops.aten._convert_weight_to_int4pack_for_cpu(_unpack_int4(m), 1) for m in mats])
            zeros = torch.zeros_like(scales)
            scale = torch.stack([scales.transpose(1, 2), zeros.transpose(1, 2)], -1)  # [n, in/g, out, 2]
            q, scale = q.view(*self.shape[:-2], *q.shape[1:]), scale.view(*self.shape[:-2], *scale.shape[1:])
        self.register_buffer("q", q.contiguous())
        self.register_buffer("scale", scale.contiguous())
        # torch's fused CPU kernels (bf16 activations and scales): int8, and int4 in their packed layout
        # (torch 2.14's int8 kernel crashes the process for widths not divisible by 16: those dequantize)
        self.fused = self.q.device.type == "cpu" and (
            (self.scheme == "int8" and self.shape[-1] % 16 == 0) or self.layout == "cpu_int4")
        self.register_buffer("kscale", self.scale.to(torch.bfloat16) if self.fused else None, persistent=False)

    def _select(self, index) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.q, self.scale) if index is None else (self.q[index], self.scale[index])

    def dequantize(self, dtype: torch.dtype, index=None) -> torch.Tensor:
        """The weight (or the experts `index` selects) in `dtype`."""
        q, scale = self._select(index)
        if self.layout == "portable":
            return dequantize_weight(q, scale, self.scheme, dtype)
        if q.device.type != "cpu":
            raise RuntimeError("these int4 weights were packed for the CPU's kernel when the model was loaded; "
                               "to run on another device, load with that device and quantize again")
        eye = torch.eye(self.shape[-1], dtype=scale.dtype, device=q.device)  # W^T = I @ W^T, exactly
        mats = [torch.ops.aten._weight_int4pack_mm_for_cpu(eye, m, self.group, s).t()
                for m, s in zip(q.reshape(-1, *q.shape[-2:]), scale.reshape(-1, *scale.shape[-3:]))]
        out = torch.stack(mats).view(*q.shape[:-2], *self.shape[-2:]) if mats else q.new_empty(0)
        return out.to(dtype)

    def matmul(self, x: torch.Tensor, index=None) -> torch.Tensor:
        """x [..., in] @ W^T (W the weight, or expert `index` of the stack) -> [..., out]."""
        rows = x.numel() // x.shape[-1]
        fused = self.fused and x.device.type == "cpu" and not torch.is_grad_enabled()
        if fused and (rows <= FUSED_MAX_ROWS or self.layout == "cpu_int4"):  # int4: no cheap dequantize here
            q, kscale = (self.q, self.kscale) if index is None else (self.q[index], self.kscale[index])
            xb = x.reshape(rows, x.shape[-1]).to(torch.bfloat16)
            ys = [self._fused_mm(xb[i : i + FUSED_MAX_ROWS].contiguous(), q, kscale)
                  for i in range(0, rows, FUSED_MAX_ROWS)]
            y = ys[0] if len(ys) == 1 else torch.cat(ys)
            return y.to(x.dtype).view(*x.shape[:-1], y.shape[-1])
        return F.linear(x, self.dequantize(x.dtype, index))

    def _fused_mm(self, xb: torch.Tensor, q: torch.Tensor, kscale: torch.Tensor) -> torch.Tensor:
        if self.layout == "cpu_int4":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, q, self.group, kscale)
        return torch._weight_int8pack_mm(xb, q, kscale)

    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.scale.numel() * self.scale.element_size()

    def extra_repr(self) -> str:
        return f"shape={self.shape}, scheme={self.scheme}, group={self.group}, layout={self.layout}"


class QuantLinear(nn.Module):
    """A weight-only quantized `nn.Linear` (inference only). `weight` dequantizes, for code that reads it."""

    def __init__(self, linear: nn.Linear, device=None, scheme: str = "int8"):
        super().__init__()
        w = linear.weight.detach().to(device or linear.weight.device)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.qweight = QuantWeight(w, scheme)
        self.scheme = self.qweight.scheme
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(w.device), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight.dequantize(self.qweight.scale.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.qweight.matmul(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"


class QuantExperts(nn.Module):
    """Stacked SwiGLU experts with quantized weights. On the CPU each expert's tokens run through the fused
    kernels on that expert's quantized matrices; elsewhere a forward dequantizes only the experts it routes
    tokens to (all of them during CUDA-graph capture or when there are tokens enough to reach most)."""

    def __init__(self, experts: Experts, scheme: str, device=None):
        super().__init__()
        dev = device or experts.gate_up_proj.device
        self.gate_up = QuantWeight(experts.gate_up_proj.detach().to(dev), scheme)
        self.down = QuantWeight(experts.down_proj.detach().to(dev), scheme)
        self.num_experts = experts.gate_up_proj.shape[0]

    @property
    def gate_up_proj(self) -> torch.Tensor:
        return self.gate_up.dequantize(self.gate_up.scale.dtype)

    @property
    def down_proj(self) -> torch.Tensor:
        return self.down.dequantize(self.down.scale.dtype)

    def _grouped_on_cpu(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Tokens grouped by expert, each group through the fused kernels (weighted in fp32 as `kernels.moe`)."""
        k = idx.shape[1]
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        used, counts = torch.unique(flat, return_counts=True)  # sorted: the runs of `order`
        out = torch.zeros(x.shape[0], self.down.shape[-2], dtype=torch.float32, device=x.device)
        start = 0
        for e, c in zip(used.tolist(), counts.tolist()):
            sel = order[start : start + c]
            start += c
            rows = sel // k
            gate, up = self.gate_up.matmul(x[rows], e).chunk(2, dim=-1)
            y = self.down.matmul(F.silu(gate) * up, e)
            out.index_add_(0, rows, y.float() * weight.reshape(-1)[sel, None].float())
        return out.to(x.dtype)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.gate_up.fused and self.down.fused and x.device.type == "cpu" and not torch.is_grad_enabled():
            return self._grouped_on_cpu(x, idx, weight)
        capturing = x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if capturing or idx.numel() >= self.num_experts:
            return kernels.moe(x, idx, weight, self.gate_up.dequantize(x.dtype), self.down.dequantize(x.dtype))
        used, local = torch.unique(idx, return_inverse=True)  # the routed experts only, renumbered 0..U-1
        return kernels.moe(x, local.view_as(idx), weight, self.gate_up.dequantize(x.dtype, used),
                           self.down.dequantize(x.dtype, used))


# ------------------------------------------------------------------------------------------- models
def quantizable_modules(model: nn.Module):
    """Yield (parent, name, module) for every routed-experts stack and every plain `nn.Linear` of the decoder
    layers of `model` (a `MultimodalModel` or `LanguageModel`) that weight-only quantization replaces (not the
    `SKIP` ones), layer by layer, so a caller can `setattr(parent, name, replacement)` as it goes (int8/int4 here,
    NF4 for QLoRA in `apps/qlora.py`)."""
    lm = getattr(model, "language", model)
    for layer in lm.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, Experts) or (type(child) is nn.Linear and name not in SKIP):
                    yield parent, name, child


def quantize_model(model: nn.Module, scheme: str, device=None) -> dict:
    """Quantize the language model of `model` (a `MultimodalModel` or `LanguageModel`) in place, layer by
    layer on `device` (default: where the weights are), so a model held in CPU memory can be quantized onto a
    GPU too small for its full-precision weights. Returns counts: {"linear": n, "experts": n}."""
    check_scheme(scheme)
    if is_quantized(model):  # its linear layers are QuantLinear now: a second pass would only relabel them
        raise ValueError(f"this model is already quantized ({model.quantization!r}): load it again to quantize it "
                         f"as {scheme!r}")
    counts = {"linear": 0, "experts": 0}
    for parent, name, child in quantizable_modules(model):
        if isinstance(child, Experts):
            setattr(parent, name, QuantExperts(child, scheme, device))
            counts["experts"] += 1
        else:
            setattr(parent, name, QuantLinear(child, device, scheme))
            counts["linear"] += 1
        del child
    if device is not None:
        model.to(device)
    model.quantization = scheme
    return counts


def is_quantized(model: nn.Module) -> bool:
    return getattr(model, "quantization", None) is not None


def refuse_quantized(model: nn.Module, what: str) -> None:
    """Raise a clear error when `what` (training, LoRA, export) is asked of a quantized model."""
    if is_quantized(model):
        raise ValueError(f"{what} needs the full-precision weights, but this model was loaded with "
                         f"quantize={model.quantization!r}: load it again without quantize")


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

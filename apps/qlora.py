"""QLoRA's frozen base (`mmstack finetune --qlora`): the language model's weights in 4-bit NF4 with double
quantisation (bitsandbytes; Dettmers et al. 2023, https://arxiv.org/abs/2305.14314), LoRA adapters on top.

What is quantized, as `mmstack.quantize` does for inference: every `nn.Linear` of the decoder layers (attention
projections, dense and shared-expert MLPs) becomes a `bitsandbytes.nn.Linear4bit` (bf16 compute), and the stacked
routed experts an `NF4Experts`. What is not: embeddings, norms, routers (`Gate`), `lm_head`, MLA's `kv_b_proj`
(read as a matrix by the absorbed decode; small), the vision tower and projector: those stay in the model dtype.

LoRA (`apps.lora.add_lora`) then wraps these unchanged: peft wraps a `Linear4bit` with its own 4-bit LoRA layer
(base output + B(A(x)) * scale), and the stacked experts through `target_parameters`. For the experts, each of
`gate_up_proj` / `down_proj` is a zero placeholder of the full shape (one stored element, stride 0), so that
peft's parametrization of it yields the LoRA delta alone; `NF4Experts.forward` adds that delta to the
dequantized weights and runs the routing math of `mmstack.llm.moe.Experts` (`kernels.moe`) on the sum. Like peft on
bf16 experts, this materialises one MoE layer's expert stack (in bf16) for its backward: gradient checkpointing
keeps one layer's copy instead of all.

    quantize_base_nf4(model)                  # before add_lora
    plan = add_lora(model, r=16, alpha=32, targets=[...])
    merge_lora(model)                          # dequantizes the base (bf16) and folds the adapters in

The 4-bit state lives on the modules only (not in their state dicts): the base is quantized again from the model
folder at each start, resumes included, and saved only dequantized (`dequantize_base_nf4`).
bitsandbytes is imported only here and by peft.
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.utils import parametrize

from mmstack import kernels
from mmstack.llm.moe import Experts
from mmstack.quantize import quantizable_modules

log = logging.getLogger(__name__)

__all__ = ["NF4Experts", "quantize_base_nf4", "dequantize_base_nf4", "is_nf4", "require_bitsandbytes",
           "logical_numel", "fold_lora_into_plain"]

BLOCK = 64  # weights per absmax (QLoRA's choice; bitsandbytes' default)
STACKED = ("gate_up_proj", "down_proj")


def require_bitsandbytes():
    """The `bitsandbytes` module, or an ImportError saying how to install it (one line)."""
    try:
        import bitsandbytes
    except ImportError:
        raise ImportError("--qlora needs bitsandbytes: pip install bitsandbytes") from None
    return bitsandbytes


def is_nf4(model: nn.Module) -> bool:
    """Whether `quantize_base_nf4` quantized `model` (and it was not dequantized since)."""
    return getattr(model, "qlora_base", None) == "nf4"


def _placeholder(shape, dtype, device) -> nn.Parameter:
    """A frozen zero tensor of `shape` holding one element: peft's LoRA parametrization turns it into the delta."""
    return nn.Parameter(torch.zeros((), dtype=dtype, device=device).expand(shape), requires_grad=False)


class NF4Experts(nn.Module):
    """Stacked SwiGLU experts (`Experts`: gate_up [E, 2I, H], down [E, H, I]) with NF4 weights, frozen.

    Each stack is quantized as one flat tensor and dequantized whole in forward. `gate_up_proj` / `down_proj` are zero placeholders (see the module
    docstring): read plainly they are zeros; under peft's LoRA they are the adapters' delta.
    """

    def __init__(self, experts: Experts, compute_dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        import bitsandbytes.functional as bf

        self.compute_dtype = compute_dtype
        self.num_experts = experts.gate_up_proj.shape[0]
        self.states = {}  # name -> bitsandbytes QuantState (absmax codes, nested absmax, code books)
        for name in STACKED:
            w = getattr(experts, name).detach()
            dev = device or w.device
            codes, state = bf.quantize_4bit(w.to(dev, compute_dtype).reshape(-1), blocksize=BLOCK,
                                            compress_statistics=True, quant_type="nf4")  # [numel/2, 1] uint8
            self.register_parameter(f"{name}_nf4", nn.Parameter(codes, requires_grad=False))
            self.states[name] = state
            self.register_parameter(name, _placeholder(w.shape, compute_dtype, dev))

    def dequantize(self, name: str, dtype=None) -> torch.Tensor:
        """The 4-bit stack `name` ("gate_up_proj" or "down_proj") as a plain tensor [E, out, in]."""
        import bitsandbytes.functional as bf

        # flat: bitsandbytes 0.50's CPU kernel misplaces the blocks of a 2-D weight whose width is not a multiple of 64
        w = bf.dequantize_4bit(getattr(self, f"{name}_nf4"), self.states[name])
        return w.view(self._shape(name)).to(dtype or self.compute_dtype)

    def _shape(self, name: str) -> torch.Size:
        if parametrize.is_parametrized(self, name):
            return self.parametrizations[name].original.shape
        return self._parameters[name].shape

    def _weight(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        w = self.dequantize(name, dtype)
        if parametrize.is_parametrized(self, name):  # LoRA: the placeholder reads as the adapters' delta
            w = w + getattr(self, name).to(dtype)
        return w

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # x [N,H], idx [N,K], weight [N,K] -> [N,H], as Experts.forward
        return kernels.moe(x, idx, weight, self._weight("gate_up_proj", x.dtype), self._weight("down_proj", x.dtype))

    def _apply(self, fn, recurse=True):
        # `.to(device)` would materialise the stride-0 placeholders at full size: rebuild them instead
        shapes = {n: self._parameters.pop(n).shape for n in STACKED if self._parameters.get(n) is not None}
        super()._apply(fn, recurse)
        device = getattr(self, f"{STACKED[0]}_nf4").device
        for state in self.states.values():
            state.to(device)
        for n, shape in shapes.items():
            self.register_parameter(n, _placeholder(shape, self.compute_dtype, device))
        return self

    def nbytes(self) -> int:
        """Bytes of the 4-bit codes and their quantisation statistics."""
        total = 0
        for name in STACKED:
            s = self.states[name]
            parts = [getattr(self, f"{name}_nf4"), s.absmax, s.code, s.offset, s.state2.absmax, s.state2.code]
            total += sum(t.numel() * t.element_size() for t in parts)
        return total

    def extra_repr(self) -> str:
        return (f"gate_up={tuple(self._shape('gate_up_proj'))}, down={tuple(self._shape('down_proj'))}, nf4, "
                f"compute_dtype={self.compute_dtype}")


def _cpu_kernel_ok(linear: nn.Linear, device) -> bool:
    """bitsandbytes 0.50's CPU kernel dequantizes a 2-D 4-bit weight wrong when its width is not a multiple of the
    block (0.20-0.26 relative error instead of NF4's 0.09, measured on the tiny test models): on the CPU such layers
    stay unquantized. Real models' widths are multiples of 64, and CUDA has no such limit."""
    dev = torch.device(device) if device is not None else linear.weight.device
    return dev.type != "cpu" or linear.in_features % BLOCK == 0


def _linear4bit(linear: nn.Linear, compute_dtype: torch.dtype, device=None) -> nn.Module:
    import bitsandbytes as bnb

    dev = device or linear.weight.device
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4", device="meta")
    q.weight = bnb.nn.Params4bit(linear.weight.detach().to(dev, compute_dtype), requires_grad=False, blocksize=BLOCK,
                                 compress_statistics=True, quant_type="nf4", module=q)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().to(dev, compute_dtype), requires_grad=False)
    q = q.to(dev)  # quantizes the weight (Params4bit.to)
    # bitsandbytes 0.50 repacks a CPU weight in place for inference (out_features % 32 == 0 only, and into a layout
    # that dequantize_4bit no longer reads): keep the one layout (the CPU runs tests here, not training)
    q.support_avx512bf16_for_cpu = False
    if not getattr(q.weight, "bnb_quantized", False):
        raise RuntimeError(f"bitsandbytes did not quantize a Linear on {dev} (no 4-bit backend for this device?)")
    return q


@torch.no_grad()
def quantize_base_nf4(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16, device=None) -> dict:
    """Quantize the language model of `model` (a `MultimodalModel` or `LanguageModel`) to NF4 in place, frozen,
    layer by layer on `device` (default: where the weights are; bitsandbytes' CPU backend included). Call it before
    `add_lora`; the rest of the model keeps its dtype.

    Returns:
        counts: {"linear": Linear4bit layers, "experts": NF4Experts stacks, "kept_on_cpu": Linear layers left
        unquantized on the CPU (see `_cpu_kernel_ok`)}.
    Raises:
        ImportError: bitsandbytes is missing (with the pip command); ValueError: `model` is already quantized or
            already carries LoRA adapters (quantize first).
    """
    require_bitsandbytes()
    if is_nf4(model) or getattr(model, "quantization", None) is not None:
        raise ValueError("this model is already quantized: load it again for --qlora")
    if any("lora_" in n for n, _ in model.named_parameters()):
        raise ValueError("quantize the base before adding LoRA (quantize_base_nf4, then add_lora)")
    counts = {"linear": 0, "experts": 0, "kept_on_cpu": 0}
    for parent, name, child in quantizable_modules(model):
        if isinstance(child, Experts):
            setattr(parent, name, NF4Experts(child, compute_dtype, device))
            counts["experts"] += 1
        elif not _cpu_kernel_ok(child, device):
            counts["kept_on_cpu"] += 1
        else:
            setattr(parent, name, _linear4bit(child, compute_dtype, device))
            counts["linear"] += 1
    if counts["kept_on_cpu"]:
        log.info("%d Linear layer(s) of widths not a multiple of %d stay in %s on the CPU (bitsandbytes' CPU kernel "
                 "dequantizes them wrong)", counts["kept_on_cpu"], BLOCK, compute_dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    if device is not None:
        model.to(device)
    model.qlora_base = "nf4"
    return counts


@torch.no_grad()
def dequantize_base_nf4(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The inverse of `quantize_base_nf4` up to NF4's rounding, in place: every `Linear4bit` back to an `nn.Linear`
    and every `NF4Experts` back to `Experts`, in `dtype`, also where a LoRA wrapper holds them (the adapters stay)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                w = bf.dequantize_4bit(child.weight.data, child.weight.quant_state).to(dtype)
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                plain.weight = nn.Parameter(w, requires_grad=False)
                if child.bias is not None:
                    plain.bias = nn.Parameter(child.bias.detach().to(dtype), requires_grad=False)
            elif isinstance(child, NF4Experts):
                gate_up = child.dequantize("gate_up_proj", dtype)
                e, w2, h = gate_up.shape
                plain = Experts(e, h, w2 // 2, device="meta")
                plain.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
                plain.down_proj = nn.Parameter(child.dequantize("down_proj", dtype), requires_grad=False)
            else:
                continue
            setattr(parent, name, plain)
    model.qlora_base = None
    return model


def logical_numel(model: nn.Module) -> int:
    """Parameters as the unquantized model counts them: a 4-bit Linear weight holds two per stored byte, and an
    `NF4Experts` stack counts by its full-shape placeholder, not by its codes."""
    seen, total = set(), 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or (isinstance(module, NF4Experts) and name.endswith("_nf4")):
                continue
            seen.add(id(p))
            total += p.numel() * (2 if getattr(p, "quant_state", None) is not None else 1)  # Params4bit: packed
    return total


@torch.no_grad()
def fold_lora_into_plain(layer) -> None:
    """Merge a peft 4-bit LoRA layer whose base `dequantize_base_nf4` made a plain Linear again: W += scale * B @ A
    (peft's own merge would quantize the sum back to 4 bits)."""
    base = layer.get_base_layer()
    for name in layer.active_adapters:
        if name in layer.lora_A:
            base.weight += layer.get_delta_weight(name).to(base.weight.dtype)

"""Fused projections: Linear layers that read the same input (q/k/v, gate/up), run as one matmul.

`pack` moves the layers' weights (and biases) into one contiguous tensor and leaves every Parameter as
a view of its rows: the parameters, their names and the state dict are unchanged, and anything that
writes them (an optimizer step, `load_state_dict`, a LoRA merge) writes the packed tensor too, so the
fused matmul can never read stale weights. `fused` then returns the layers' outputs from one `F.linear`
when that is exactly what calling them would compute: no gradient needed, every layer still a plain
hook-free `nn.Linear` whose weight is still the view `pack` made. Anything else (LoRA-wrapped layers,
a model moved with `.to()`, parameters re-assigned) gets None and the caller runs the layers one by one.

In an eager decode step each matmul is a separate dispatch of a tiny GEMM; fusing q/k/v and gate/up
removes three of the seven per layer.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

_ATTR = "_packed_projections"


def pack(owner: nn.Module, names: Sequence[str]) -> bool:
    """Pack `owner.<name>` Linear layers (same input size, dtype, device) into one tensor. Idempotent."""
    mods = [getattr(owner, n, None) for n in names]
    if any(type(m) is not nn.Linear for m in mods):
        return False
    ws = [m.weight for m in mods]
    if ws[0].is_meta or len({(w.dtype, w.device, w.shape[1]) for w in ws}) != 1:
        return False
    has_bias = [m.bias is not None for m in mods]
    if any(has_bias) and not all(has_bias):
        return False
    with torch.no_grad():
        weight = torch.cat([w.detach() for w in ws])
        bias = torch.cat([m.bias.detach() for m in mods]) if all(has_bias) else None
    sizes = [w.shape[0] for w in ws]
    start = 0
    for m, n in zip(mods, sizes):
        m.weight.data = weight[start : start + n]
        if bias is not None:
            m.bias.data = bias[start : start + n]
        start += n
    # what `fused` re-checks on every call: the same module objects, still views at the same addresses
    checks = tuple((name, m, m.weight.data_ptr(), m.bias.data_ptr() if bias is not None else 0)
                   for name, m in zip(names, mods))
    owner.__dict__[_ATTR] = (tuple(names), weight, bias, sizes, checks)
    return True


def fused(owner: nn.Module, names: Sequence[str], x: torch.Tensor) -> Optional[tuple[torch.Tensor, ...]]:
    """The outputs of `owner.<name>(x)` for each name from one matmul, or None where that is not exact."""
    entry = owner.__dict__.get(_ATTR)
    if entry is None or torch.is_grad_enabled() or _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return None
    packed_names, weight, bias, sizes, checks = entry
    if packed_names != names:
        return None
    modules = owner._modules
    tracing = torch.compiler.is_compiling()  # data pointers are not traceable; a compiled step is inference only
    for name, m, wptr, bptr in checks:
        if modules[name] is not m or m._forward_hooks or m._forward_pre_hooks:
            return None
        if not tracing and (m.weight.data_ptr() != wptr or (bptr and m.bias.data_ptr() != bptr)):
            return None
    return F.linear(x, weight, bias).split_with_sizes(sizes, dim=-1)

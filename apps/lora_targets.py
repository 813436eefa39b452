"""Which weights LoRA adapts (`mmstack finetune --lora-targets`): named groups of the language model's decoder
layers, or plain names, resolved on a built model into peft's `target_modules` (Linear layers) and
`target_parameters` (the stacked routed experts, 3-D tensors no Linear wraps).

Groups (found by the layers' structure, never by their names, in every decoder layer that has them):
    attention       the attention projections (q/k/v/o; MLA's q_a/q_b, kv_a_proj_with_mqa, kv_b_proj)
    mlp             the dense MLPs (every layer of a dense model; the first layers of DeepSeek-MoE models)
    shared_experts  the always-on shared experts of MoE layers
    routed_experts  the stacked routed experts, `experts.gate_up_proj` [E, 2I, H] and `experts.down_proj` [E, H, I]
A plain name (`q_proj`, `self_attn.o_proj`, `experts.down_proj`) matches every Linear layer, or stacked expert
parameter, whose full name is it or ends with `.name`, anywhere in the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from mmstack.llm.mlp import SwiGLU
from mmstack.llm.moe import MoE

GROUPS = ("attention", "mlp", "shared_experts", "routed_experts")
DEFAULT_TARGETS = ",".join(GROUPS)


@dataclass
class Targets:
    """Resolved LoRA targets: full module and parameter names, and how many weights each asked target matched."""

    modules: list = field(default_factory=list)
    parameters: list = field(default_factory=list)
    matched: dict = field(default_factory=dict)  # target -> number of weights

    def describe(self) -> str:
        return ", ".join(f"{t} ({n})" for t, n in self.matched.items())


def _linears(module: nn.Module, prefix: str) -> list[str]:
    return [f"{prefix}.{n}" for n, m in module.named_modules() if isinstance(m, nn.Linear)]


def _group(model: nn.Module, group: str) -> tuple[list[str], list[str]]:
    """(module names, parameter names) of one group over the language model's decoder layers."""
    modules, params = [], []
    layers = getattr(getattr(model, "language", model), "layers", None)
    if layers is None:
        raise ValueError("LoRA target groups need a model with a language model (`language.layers`)")
    base = "language.layers" if hasattr(model, "language") else "layers"
    for i, block in enumerate(layers):
        at = f"{base}.{i}"
        mlp = block.mlp
        if group == "attention":
            modules += _linears(block.self_attn, f"{at}.self_attn")
        elif group == "mlp" and isinstance(mlp, SwiGLU):
            modules += _linears(mlp, f"{at}.mlp")
        elif group == "shared_experts" and isinstance(mlp, MoE) and mlp.shared_experts is not None:
            modules += _linears(mlp.shared_experts, f"{at}.mlp.shared_experts")
        elif group == "routed_experts" and isinstance(mlp, MoE):
            params += [f"{at}.mlp.experts.{n}" for n, p in mlp.experts.named_parameters(recurse=False) if p.dim() == 3]
    return modules, params


def _named(model: nn.Module, name: str) -> tuple[list[str], list[str]]:
    """(Linear layers, stacked parameters) whose full name is `name` or ends with `.name`."""
    def hit(full: str) -> bool:
        return full == name or full.endswith("." + name)

    modules = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and hit(n)]
    params = [n for n, p in model.named_parameters() if p.dim() == 3 and hit(n)]
    return modules, params


def resolve_targets(model: nn.Module, targets: list[str]) -> Targets:
    """Resolve `targets` (groups or plain names, see the module docstring) on `model`.

    Raises:
        ValueError: no target matches anything (naming the groups and the Linear layer names the model has).
    """
    out = Targets()
    for t in (t.strip() for t in targets):
        if not t:
            continue
        modules, params = _group(model, t) if t in GROUPS else _named(model, t)
        out.modules += [m for m in modules if m not in out.modules]
        out.parameters += [p for p in params if p not in out.parameters]
        out.matched[t] = len(modules) + len(params)
    if not out.modules and not out.parameters:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"the LoRA targets {targets} match no weight of this model: use the groups {list(GROUPS)} "
                         f"or names of its Linear layers ({names})")
    return out

"""LoRA through peft on any mmstack model (`inject_adapter_in_model`): Linear layers through `target_modules`, the
stacked routed experts through `target_parameters` (peft's `ParamWrapper`, one rank-r pair per expert). On save,
merged into the base weights (a plain native model), written as a standard peft adapter folder
(`mmstack.adapters`), or both. peft is imported only here.

    plan = add_lora(model, r=8, alpha=16, targets=["attention", "routed_experts"])
    print(plan.summary())                       # the targets and the trainable parameter count
    save_adapter(model, plan, "out/adapter")     # adapter_config.json + adapter_model.safetensors
    merge_lora(model)                            # the plain model again, adapters folded in
On a QLoRA base (`apps.qlora.quantize_base_nf4` first) the same calls work: the adapters train in fp32 on the 4-bit
layers, the saved folder is the same, and a merge dequantizes the base (bf16) before folding the adapters in.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from mmstack.quantize import refuse_quantized

from .lora_targets import GROUPS, Targets, resolve_targets
from .qlora import is_nf4, logical_numel

log = logging.getLogger(__name__)

__all__ = ["LoraPlan", "add_lora", "merge_lora", "save_adapter", "check_qlora", "track_adapter_use"]


@dataclass
class LoraPlan:
    """What `add_lora` did: the peft config, the resolved targets, and the parameter counts."""

    config: object  # peft.LoraConfig
    targets: Targets
    trainable: int
    total: int

    def summary(self) -> str:
        c = self.config
        return (f"LoRA r={c.r} alpha={c.lora_alpha} on {self.targets.describe()}: {len(self.targets.modules)} Linear "
                f"layers, {len(self.targets.parameters)} stacked expert tensors; trainable {self.trainable:,} of "
                f"{self.total:,} parameters ({100 * self.trainable / max(self.total, 1):.2f}%)")


def add_lora(model: nn.Module, r: int, alpha: int, targets: list[str], dropout: float = 0.0) -> LoraPlan:
    """Freeze the model and add trainable rank-`r` adapters to the weights `targets` names (groups or names,
    `apps.lora_targets`). Targets that match nothing are warned about (groups absent from this architecture
    only logged); when none matches anything, a ValueError. Stacked experts take no dropout (peft's rule)."""
    refuse_quantized(model, "LoRA")
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise ImportError("LoRA needs peft (pip install 'peft>=0.17')") from e
    found = resolve_targets(model, targets)
    for t, n in found.matched.items():
        if n == 0:
            (log.info if t in GROUPS else log.warning)(
                "LoRA target %r matches nothing in this model%s", t, "" if t in GROUPS else " (a typo?)")
    if found.parameters and "target_parameters" not in LoraConfig.__dataclass_fields__:
        raise ImportError("LoRA on the routed experts needs peft>=0.17 (target_parameters): pip install -U peft")
    if found.parameters and dropout:
        raise ValueError("LoRA dropout is not possible on the stacked experts (peft); use dropout 0 or leave "
                         "routed_experts out of the targets")
    qlora = is_nf4(model)
    total = logical_numel(model) if qlora else sum(p.numel() for p in model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    extra = {"target_parameters": found.parameters} if found.parameters else {}
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=found.modules, **extra)
    inject_adapter_in_model(config, model)
    trainable = 0
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
        if qlora and p.requires_grad:  # on a bf16 base peft makes them bf16: AdamW keeps fp32 masters instead
            p.data = p.data.float()
        trainable += p.numel() if p.requires_grad else 0
    return LoraPlan(config, found, trainable, total)


def track_adapter_use(model: nn.Module) -> set:
    """A set that collects the names of the adapter weights of every LoRA layer running a forward with autograd on
    (clear it after each step). Under FSDP a reached adapter weight can have an all-zero gradient (A while B is
    still zero, as it starts), which looks like the reduced zeros of a weight no rank reached; this tells them apart
    (`parallel.drop_unreached_grads`), so that A takes its first AdamW step when a single process would."""
    from peft.tuners.lora import LoraLayer

    used: set = set()

    def hook(names):
        return lambda module, args: used.update(names) if torch.is_grad_enabled() else None

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):  # nested wrappers too: an outer one runs the inner ones
            names = [f"{name}.{n}" for n, _ in module.named_parameters() if "lora_" in n]
            module.register_forward_pre_hook(hook(names))
    return used


def _param_wrapper_chain(module) -> list:
    from peft.tuners.lora.layer import ParamWrapper

    chain = []
    while isinstance(module, ParamWrapper):
        chain.append(module)
        module = module.base_layer
    return chain


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain module back (keys as before LoRA). Nested
    wrappers of one module's stacked parameters are merged innermost last, each into its own parameter. A QLoRA
    model's 4-bit base is dequantized first (`apps.qlora.dequantize_base_nf4`): the result is a plain bf16 model."""
    from peft.tuners.lora import Linear, LoraLayer, ParamWrapper

    qlora = is_nf4(model)
    if qlora:
        from .qlora import dequantize_base_nf4, fold_lora_into_plain

        log.info("merging LoRA into the dequantized 4-bit base (bf16; the weights the adapters trained against)")
        dequantize_base_nf4(model)
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLayer) or ".base_layer" in f".{name}":
            continue  # inner wrappers are merged with their outermost one
        for layer in _param_wrapper_chain(module) or [module]:
            if qlora and not isinstance(layer, (Linear, ParamWrapper)):  # peft's 4-bit wrapper, its base plain again
                fold_lora_into_plain(layer)
            else:
                layer.merge()
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], module.get_base_layer())
    return model


def save_adapter(model: nn.Module, plan: LoraPlan, folder, base: Optional[str] = None) -> Path:
    """Write the adapters of an `add_lora` model (not yet merged) as a standard peft folder: `adapter_config.json`
    + `adapter_model.safetensors` (keys `base_model.model.<module>.lora_A.weight`), each written atomically, that
    `mmstack.load(base, adapter=folder)` (and peft's `PeftModel.from_pretrained`) read back."""
    from peft import get_peft_model_state_dict

    from mmstack.adapters import write_adapter

    tensors = {k: v.detach() for k, v in get_peft_model_state_dict(model).items()}
    if not tensors:
        raise ValueError("the model holds no LoRA adapters to save (merged already?)")
    config = plan.config.to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    config["base_model_name_or_path"] = str(base) if base is not None else None
    config["inference_mode"] = True
    return write_adapter(folder, config, tensors)


def check_qlora(device: torch.device, lora_r: int, world: int = 1) -> None:
    """Refuse `--qlora` where the trainer does not run it, with one line saying why: off CUDA (bitsandbytes' CPU
    backend runs the 4-bit paths too, but slowly: `apps.qlora` takes any device, for tests), without `--lora-r`,
    under torchrun, or without bitsandbytes."""
    if device.type != "cuda":
        raise ValueError(f"--qlora needs a CUDA device (bitsandbytes' 4-bit kernels); this run is on {device.type}: "
                         f"drop --qlora to train LoRA on the full-precision base")
    if not lora_r:
        raise ValueError("--qlora trains LoRA adapters: give --lora-r too (e.g. --lora-r 16)")
    if world > 1:
        raise ValueError(f"--qlora runs in one process (the 4-bit base is neither sharded nor replicated); this run "
                         f"has {world}: run it without torchrun, or drop --qlora")
    from .qlora import require_bitsandbytes

    require_bitsandbytes()

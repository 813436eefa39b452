"""LoRA through peft on any mmstack model (`inject_adapter_in_model`), merged into the base weights on
save so the output is a plain native model. peft is imported only here."""
from __future__ import annotations

from torch import nn

from mmstack.quantize import refuse_quantized


def add_lora(model: nn.Module, r: int, alpha: int, targets: list[str], dropout: float = 0.0) -> nn.Module:
    """Freeze the model and add trainable rank-`r` adapters to the Linear layers named in `targets`."""
    refuse_quantized(model, "LoRA")
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise ImportError("LoRA needs peft (pip install peft)") from e
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    wanted = [t for t in targets if t in names]
    if not wanted:
        raise ValueError(f"none of the LoRA targets {targets} is a Linear layer of this model (it has {sorted(names)})")
    for p in model.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=wanted), model)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base Linear and put the plain Linear back (keys as before LoRA)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], module.get_base_layer())
    return model

"""LoRA adapters as files: the standard peft folder (`adapter_config.json` + `adapter_model.safetensors`), written
atomically, and read back and merged into a loaded model's weights (`mmstack.load(base, adapter=DIR)`).

No peft is needed here: the merge is the LoRA update itself, W += scale * B @ A, in fp32, one matrix at a time.
Keys are peft's: `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`, module names being mmstack's
internal ones (`language.layers.3.self_attn.q_proj`). Stacked parameters (the routed experts, targeted through
peft's `target_parameters`) follow peft's `ParamWrapper` layout, for a parameter [E, out, in]:

    A [E*r, in]  viewed as [E, r, in]          (expert-major rows)
    B [out, r*E] viewed as [out, r, E]         (expert-minor columns)
    delta_e = scale * B[:, :, e] @ A[e]        [out, in]

and several targeted parameters of one module are nested wrappers, the first registered innermost: its keys carry
one `.base_layer` per wrapper around it (`experts.base_layer.lora_A.weight` is `gate_up_proj`,
`experts.lora_A.weight` is `down_proj`; where the shapes tell them apart, the shapes decide). Only safetensors are
read; anything else in the folder is ignored.

Notation: E experts, r rank, out / in the matrix's output / input width.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .errors import AdapterError
from .io.checkpoint import check_safetensors, save_safetensors
from .io.files import UnsafeFileError, read_text

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
# adapter_config.json settings whose non-default values change what the tensors mean: refused, not ignored
UNSUPPORTED = {"use_dora": False, "lora_bias": False, "bias": "none", "fan_in_fan_out": False, "alpha_pattern": {},
               "modules_to_save": None, "trainable_token_indices": None, "layer_replication": None,
               "alora_invocation_tokens": None, "use_qalora": False, "use_bdlora": None, "velora_config": None,
               "kasa_config": None, "arrow_config": None, "monteclora_config": None}

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "AdapterError", "LoraUpdate", "read_adapter", "merge_adapter", "write_adapter"]


@dataclass
class LoraUpdate:
    """One adapted weight: `param` (its model name) gets `scale * B @ A` per matrix (per expert for 3-D)."""

    param: str
    a: torch.Tensor  # [E*r, in]
    b: torch.Tensor  # [out, r*E]
    scale: float
    experts: int  # 1 for a matrix

    def delta(self, e: Optional[int] = None) -> torch.Tensor:
        """The fp32 update of the matrix (e=None) or of expert `e`: [out, in]."""
        a, b = self.a.float(), self.b.float()
        if e is None:
            return self.scale * (b @ a)
        r = a.shape[0] // self.experts
        return self.scale * (b.view(b.shape[0], r, self.experts)[:, :, e] @ a.view(self.experts, r, -1)[e])


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    try:
        cfg = json.loads(read_text(path, what="adapter config"))
    except FileNotFoundError:
        raise AdapterError(f"{folder}: not a LoRA adapter folder (no {CONFIG_FILE})") from None
    except (UnsafeFileError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise AdapterError(f"{path}: cannot read it ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: 'peft_type' is {cfg.get('peft_type')!r}; only LoRA adapters (\"LORA\") load")
    alpha = cfg.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise AdapterError(f"{path}: 'lora_alpha' must be a number, got {alpha!r}")
    for key, default in UNSUPPORTED.items():
        if cfg.get(key, default) not in (default, [], {}, None, False):
            raise AdapterError(f"{path}: {key!r} = {cfg[key]!r} is not supported (only plain LoRA merges here)")
    targets = cfg.get("target_parameters") or []
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise AdapterError(f"{path}: 'target_parameters' must be a list of names, got {targets!r}")
    return cfg


def _split_key(key: str, where: Path) -> tuple[str, int, str]:
    """`base_model.model.M(.base_layer)*.lora_X.weight` -> (M, number of base_layer, "A" | "B")."""
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    for side in ("A", "B"):
        tail = f".lora_{side}.weight"
        if name.endswith(tail):
            module, depth = name[: -len(tail)], 0
            while module.endswith(".base_layer"):
                module, depth = module[: -len(".base_layer")], depth + 1
            return module, depth, side
    raise AdapterError(f"{where}: key {key!r} is not a LoRA weight (expected <module>.lora_A.weight or "
                       f".lora_B.weight; biases, DoRA magnitudes and saved modules are not supported)")


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _fits(param: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether A [E*r, in] and B [out, r*E] fit a parameter [out, in] or [E, out, in]."""
    if param.dim() not in (2, 3):  # a norm weight, a convolution: no LoRA matrix fits it
        return False
    experts, out_f, in_f = (1, *param.shape) if param.dim() == 2 else tuple(param.shape)
    return (a.dim() == b.dim() == 2 and a.shape[0] % experts == 0 and a.shape[0] > 0
            and tuple(a.shape) == (a.shape[0], in_f) and tuple(b.shape) == (out_f, a.shape[0]))


def read_adapter(folder, model: nn.Module) -> list[LoraUpdate]:
    """Read and check a peft LoRA folder against `model` (before anything is changed).

    Args:
        folder: a folder holding `adapter_config.json` and `adapter_model.safetensors`.
        model: the base model the adapter was trained on (mmstack's internal module names).
    Returns:
        one `LoraUpdate` per adapted weight.
    Raises:
        AdapterError: a missing or malformed file, an unsupported setting, or a key the model lacks or whose
            shape does not fit (each names the file and the key).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"{folder}: no such adapter folder")
    cfg = _read_config(folder)
    path = folder / WEIGHTS_FILE
    if not path.exists():
        others = sorted(p.name for p in folder.glob("adapter_model*"))
        hint = f" (found {others}: only safetensors adapters are read)" if others else ""
        raise AdapterError(f"{folder}: no {WEIGHTS_FILE}{hint}")
    check_safetensors(path)  # header validated against the file size before anything is read
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, RuntimeError) as e:  # e.g. overlapping or unordered tensor offsets
        raise AdapterError(f"{path}: cannot read the tensors ({type(e).__name__}: {str(e)[:200]})") from None
    pairs: dict[tuple[str, int], dict[str, tuple[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        module, depth, side = _split_key(key, path)
        pairs.setdefault((module, depth), {})[side] = (key, t)
    targets = cfg.get("target_parameters") or []
    use_rslora = bool(cfg.get("use_rslora", False))
    updates = []
    for (module, depth), sides in sorted(pairs.items()):
        first_key = next(iter(sides.values()))[0]
        if len(sides) != 2:
            missing = "lora_B" if "A" in sides else "lora_A"
            raise AdapterError(f"{path}: {first_key!r} has no matching {missing} weight")
        try:
            owner = model.get_submodule(module)
        except AttributeError:
            raise AdapterError(f"{path}: key {first_key!r} names the module {module!r}, which the base model lacks "
                               f"(an adapter for another model?)") from None
        (ka, a), (kb, b) = sides["A"], sides["B"]
        # peft nests one wrapper per targeted parameter, the first registered innermost (peft 0.22); where the
        # shapes tell the parameters apart, they decide, so another nesting order loads too
        wrapped = [n for n, _ in owner.named_parameters(recurse=False) if _matches(f"{module}.{n}", targets)]
        if wrapped:
            if depth >= len(wrapped):
                raise AdapterError(f"{path}: key {first_key!r} is nested {depth} deep, but the adapter config targets "
                                   f"only {wrapped} on {module!r}")
            by_order = wrapped[len(wrapped) - 1 - depth]
            fitting = [n for n in wrapped if _fits(getattr(owner, n), a, b)]
            pname = by_order if by_order in fitting or len(fitting) != 1 else fitting[0]
        elif isinstance(owner, nn.Linear) and depth == 0:
            pname = "weight"
        else:
            raise AdapterError(f"{path}: key {first_key!r}: {module!r} is a {type(owner).__name__}, neither a Linear "
                               f"layer nor the owner of a parameter in 'target_parameters'")
        param = getattr(owner, pname)
        experts = 1 if param.dim() != 3 else param.shape[0]
        if param.dim() not in (2, 3) or a.dim() != 2 or b.dim() != 2 or a.shape[0] % experts or a.shape[0] == 0:
            raise AdapterError(f"{path}: {ka!r} {tuple(a.shape)} / {kb!r} {tuple(b.shape)} do not fit "
                               f"{module}.{pname} {tuple(param.shape)}")
        out_f, in_f = param.shape[-2:]
        r = a.shape[0] // experts
        if tuple(a.shape) != (experts * r, in_f) or tuple(b.shape) != (out_f, experts * r):
            raise AdapterError(f"{path}: {ka!r} is {tuple(a.shape)} and {kb!r} is {tuple(b.shape)}, but "
                               f"{module}.{pname} {tuple(param.shape)} needs ({experts * r}, {in_f}) and "
                               f"({out_f}, {experts * r}): an adapter for another model?")
        if not (torch.isfinite(a.float()).all() and torch.isfinite(b.float()).all()):  # float8 has no isfinite
            raise AdapterError(f"{path}: {ka!r} or {kb!r} holds NaN or infinite values")
        scale = cfg["lora_alpha"] / (math.sqrt(r) if use_rslora else r)
        updates.append(LoraUpdate(f"{module}.{pname}", a, b, scale, experts if param.dim() == 3 else 1))
    if not updates:
        raise AdapterError(f"{path}: holds no LoRA weights")
    return updates


@torch.no_grad()
def merge_adapter(model: nn.Module, folder) -> int:
    """Add a peft LoRA folder's updates to `model`'s weights in place (in fp32, then rounded to each weight's
    dtype; written into the existing storage, so packed projections see them). Returns the weights changed.

    Raises:
        AdapterError: see `read_adapter`; nothing is changed then.
    """
    updates = read_adapter(folder, model)

    def merged(p: torch.Tensor, u: LoraUpdate, e: Optional[int]) -> torch.Tensor:
        w = p if e is None else p[e]
        return (w.float() + u.delta(e).to(p.device)).to(p.dtype)

    def matrices(u: LoraUpdate, p: torch.Tensor) -> list:
        return [None] if u.experts == 1 and p.dim() == 2 else list(range(u.experts))  # experts one at a time

    for u in updates:  # every merged matrix checked before any is written: a huge lora_alpha or huge values
        p = model.get_parameter(u.param)  # would overflow the weights (to inf in fp32, sooner in fp16)
        for e in matrices(u, p):
            if not torch.isfinite(merged(p, u, e)).all():
                raise AdapterError(f"{Path(folder) / WEIGHTS_FILE}: merging it overflows {u.param} in {p.dtype} "
                                   f"(scale {u.scale:.3g} = lora_alpha / r): the merged weights would not be finite")
    for u in updates:
        p = model.get_parameter(u.param)
        for e in matrices(u, p):
            (p if e is None else p[e]).copy_(merged(p, u, e))
    return len(updates)


def write_adapter(folder, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write a standard peft LoRA folder: `adapter_model.safetensors` (keys `base_model.model.<module>.lora_X.weight`)
    then `adapter_config.json`, each atomically. Returns the folder."""
    from .io.atomic import atomic_write_json

    folder = Path(folder)
    os.makedirs(folder, exist_ok=True)
    named = {k if k.startswith(PREFIX) else PREFIX + k: t for k, t in tensors.items()}
    save_safetensors(named, folder / WEIGHTS_FILE)
    atomic_write_json(folder / CONFIG_FILE, config)
    return folder

"""Data parallelism for the fine-tuning loop: the torchrun process group (rank, world size, device, sums over
ranks), DDP, or FSDP2 (`fully_shard`) for models larger than one device, LoRA adapters included; and the full
(unsharded) weights that the final model folder is written from. Resumable checkpoints are DCP shards, written and
read without a gather (`sharded_checkpoint`); `load_state` reads the full-tensor checkpoints of earlier versions.

FSDP groups: each decoder layer, each vision-tower block (when every rank runs the tower in every step),
and the root, the `LossModule`, which holds the rest (embeddings, heads, projector, VQ, ...). Everything
the losses touch runs inside `LossModule.forward`, so the root group is gathered whenever a weight of it
is read, including by methods other than `forward` (`language.logits`, `vq_head.embed_codes`). Under LoRA the
frozen base is sharded like any weight; peft's stacked-expert wrappers (`ParamWrapper`) add their update inside the
decoder layer's forward, while FSDP holds the layer's weights gathered.
"""
from __future__ import annotations

import os

import torch
from torch import nn

MODES = ("ddp", "fsdp")
_FULL = dict(full_state_dict=True, cpu_offload=True)  # rank 0 gathers each tensor to CPU, the others get {}


# ------------------------------------------------------------------------------------------ process group


def dist_info() -> tuple[int, int]:
    """(rank, world size) of this process under torchrun; (0, 1) alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_distributed(device: torch.device) -> torch.device:
    """Join the torchrun process group (if any); returns the device, made this process's own GPU."""
    rank, world = dist_info()
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def close_distributed(ok: bool) -> None:
    """Leave the process group this process joined (`init_distributed`). After a good run every rank waits for the
    others first (rank 0 may still be writing outputs); a process that exits with gloo's threads still alive is
    killed by `terminate called without an active exception` (SIGABRT) and fails the whole torchrun job."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    try:
        if ok:
            torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def all_sum(x: float) -> float:
    """`x` summed over all processes (x itself without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([float(x)], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item())
    return float(x)


# ------------------------------------------------------------------------------------------ wrapping


def shard_units(model, vision: bool) -> list[nn.Module]:
    """The modules that become their own FSDP group: decoder layers, then vision-tower blocks."""
    units = list(model.language.layers)
    tower = getattr(getattr(model, "vision", None), "tower", None)
    if vision and isinstance(getattr(tower, "blocks", None), nn.Module):
        units += list(tower.blocks)
    return units


def wrap(loss_mod: nn.Module, mode: str, device: torch.device, shard_vision: bool = True) -> nn.Module:
    """Wrap the loss module for `mode` ("ddp" or "fsdp") across the initialised process group.

    Args:
        shard_vision: give each vision block its own group. Only when every rank runs the tower in every
            forward: a group gathers and reduces with collectives that all ranks must enter together, so a
            rank whose share of a batch has no image would hang the others (the root group has no such
            constraint). Left out, the tower is part of the root group.
    Returns:
        the module to call. Under FSDP it is `loss_mod` itself, its parameters replaced by sharded
        DTensors: build the optimizer from `.parameters()` after this call.
    """
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(loss_mod, find_unused_parameters=True)
    if mode != "fsdp":
        raise ValueError(f"--parallel must be one of {MODES}, got {mode!r}")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = loss_mod.model
    model.language.unfuse_projections()  # the packed inference copies would stay whole on every rank
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    # Weights stay fp32 (bf16 comes from autocast). reduce_dtype is stated because reducing unused
    # parameters (below) needs it to build the zero gradients.
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for unit in shard_units(model, shard_vision):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(loss_mod, mesh=mesh, mp_policy=policy)
    # A rank can leave weights of a group it ran without gradient (an image-free share of a batch skips
    # the projector, a share without target tokens the LM head, an expert no token chose): it then
    # reduces zeros, as DDP's find_unused_parameters does, so every rank reduces the same tensors.
    loss_mod.set_reduce_scatter_unused_params(True)
    return loss_mod


def drop_unreached_grads(params: list, reached=frozenset()) -> None:
    """Under FSDP, after backward: give a gradient of None back to each parameter that no rank reached.

    Reducing unused parameters (see `wrap`) hands those all-zero gradients, and AdamW would then create
    state for them and decay them, which DDP and a single process do not do (their gradient stays None):
    a weight that is never used (timm's attention-pool head) would end up different. An all-zero gradient
    is taken for "not reached" unless the parameter is in `reached` on some rank: a weight known to be in this
    step's graph whose true gradient is zero (LoRA's A while B is still zero, `lora.track_adapter_use`).
    """
    if not params:
        return
    none = torch.zeros((), dtype=torch.bool, device=params[0].device)
    yes = torch.ones((), dtype=torch.bool, device=params[0].device)
    hit = torch.stack([yes if p in reached else p.grad.to_local().ne(0).any() if p.grad is not None else none
                       for p in params]).float()
    torch.distributed.all_reduce(hit, op=torch.distributed.ReduceOp.MAX)
    for p, h in zip(params, hit.tolist()):
        if not h:
            p.grad = None


def is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


# ------------------------------------------------------------------------------------------ full state


def tied_names(model: nn.Module) -> list[list[str]]:
    """Names of parameters that are one tensor (tied embeddings), in groups; read before sharding."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def model_state(wrapped: nn.Module, model: nn.Module, ties: list[list[str]], trainable_only: bool = False) -> dict:
    """`model.state_dict()` as full CPU tensors (`trainable_only`: of the trainable weights alone). Under FSDP every
    rank must call it; only rank 0 gets the tensors (the others get {}), with tied names sharing one tensor as in
    the unsharded model."""
    if not is_fsdp(wrapped):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(**_FULL, ignore_frozen_params=trainable_only))
    for names in ties:
        if names[0] in sd:
            for name in names[1:]:
                sd[name] = sd[names[0]]
    return sd


def load_state(wrapped: nn.Module, model: nn.Module, opt: torch.optim.Optimizer, model_sd: dict,
               opt_sd: dict) -> None:
    """Load full state (`model.state_dict()`, `opt.state_dict()`: what checkpoints of earlier versions hold); under
    FSDP each rank keeps its shards. Every rank passes the whole state."""
    if not is_fsdp(wrapped):
        model.load_state_dict(model_sd)
        opt.load_state_dict(opt_sd)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    set_model_state_dict(model, model_sd, options=StateDictOptions(full_state_dict=True))
    if [len(g["params"]) for g in opt_sd["param_groups"]] != [len(g["params"]) for g in opt.param_groups]:
        raise ValueError("the saved optimizer state has parameter groups of other sizes than this optimizer's")
    names = _optimizer_names(model, opt)
    by_name = {"state": {names[i]: s for i, s in opt_sd["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in opt_sd["param_groups"]]}
    # strict=False: a parameter that never had a gradient has no state (see `drop_unreached_grads`), as in
    # `opt.state_dict()`. Loading fills in fresh state for it: drop that again, as `opt.load_state_dict` would
    set_optimizer_state_dict(model, opt, by_name, options=StateDictOptions(full_state_dict=True, strict=False))
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        if i not in opt_sd["state"]:
            opt.state.pop(p, None)


def full_model(like: nn.Module, sd: dict, ties: list[list[str]], prepare=None, strict: bool = True) -> nn.Module:
    """A plain model with `like`'s config holding the full state `sd` (CPU): what `save_pretrained` writes
    after an FSDP run. Built on the meta device, so the tensors of `sd` are used, not copied.

    Args:
        prepare: called on the meta model before loading (e.g. to add the LoRA adapters `sd` has keys of).
        strict: False when `sd` holds only some weights (the others stay on the meta device).
    """
    from mmstack.loading import build_model

    model = build_model(like.cfg, "meta")
    if prepare is not None:
        with torch.device("meta"):
            prepare(model)
    model.load_state_dict(sd, assign=True, strict=strict)
    for names in ties:  # assign=True gives each name its own Parameter: re-tie as the constructor did
        first = model.get_parameter(names[0])
        for name in names[1:]:
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner), leaf, first)
    return model


def _optimizer_names(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """The name of each optimizer parameter, in the order `opt.state_dict()` numbers them."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]

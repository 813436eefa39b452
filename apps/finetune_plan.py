"""`mmstack finetune --plan`: the memory one GPU needs for a fine-tuning run, before any weight or data is read.

    mmstack finetune --plan --model deepseek-vl2-small --lora-r 16 --gradient-checkpointing --seq-len 4096
    plan = memory_plan("janus-pro-7b", lora_r=16, gpus=2, seq_len=2048)   # a `Plan`; print(plan.table())

The model is built on the meta device (`build_model(cfg, "meta")`, no weights) and prepared as `apps.train` prepares
it (`select_trainable`, or `add_lora` with the same targets). What the trainer keeps, per GPU:
- parameters: the model loaded in fp32, every part (QLoRA, as `apps.qlora` quantizes: the decoder layers' Linear
  weights but MLA's kv_b_proj, and the stacked experts, NF4 with double quantisation, 0.52 bytes a weight; other
  frozen weights bf16; the adapters fp32);
- gradients: fp32, for the trainable parameters the understanding loss reaches (not the generation heads, nor
  the vision tower's unused pooling head); optimizer: AdamW's two fp32 states and a step per tensor. There are no
  separate master weights: the weights themselves are fp32 and bf16 autocast (the trainer's default on CUDA)
  only casts them for the matmuls; those bf16 copies stay referenced by autograd until the backward (one row);
- activations: what autograd saves for the backward (`apps.memory_formula`, per layer from the shapes); with
  gradient checkpointing the layers' inputs, plus one layer recomputed during the backward;
- FSDP over N GPUs divides parameters, gradients and optimizer state by N and gathers about two layers at a
  time; DDP replicates them and adds gradient buckets (one gradient-sized copy).
Assumed: micro-batch = ceil(batch size / GPUs) examples of `seq_len` tokens each, image tokens included, no
padding; every text token is a target (the logits are the upper bound); the understanding task.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

from . import memory_formula as mf

GiB = 1 << 30
# parts of an mmstack model the understanding loss runs (parameters elsewhere get no gradient)
UNDERSTANDING = ("language.", "projector.", "layout.", "vision.tower.patch_embed", "vision.tower.pos_embed",
                 "vision.tower.blocks.", "vision.tower.norm.")
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes, 8-bit absmax per 64 weights, fp32 per 256 absmax


@dataclass
class PlanArgs:
    """The `--plan` options of `mmstack finetune` (the run's own flags give the model, mode and batch)."""

    plan: bool = field(default=False, metadata={"help": (
        "print the memory per GPU of this run (parameters, gradients, optimizer state, activations) and exit: no "
        "data is read, nothing trains; --model may also name a released variant, e.g. deepseek-vl2-small")})
    plan_json: bool = field(default=False, metadata={"help": "with --plan: JSON instead of a table", "flag": "--json"})
    gpus: int = field(default=1, metadata={"help": "with --plan: GPUs (--parallel fsdp shards weights, gradients "
                                                   "and optimizer state over them)"})
    seq_len: Optional[int] = field(default=None, metadata={"help": (
        "with --plan: tokens per example, image tokens included (default: 2048, or the model context if shorter)")})
    images: int = field(default=1, metadata={"help": "with --plan: images per example"})
    tiles: str = field(default="2x2", metadata={"help": "with --plan: local tiles per image, WxH (DeepSeek-VL2)"})


@dataclass
class Plan:
    model: str
    mode: str
    setup: dict
    parameters: int
    trainable: int
    bytes: dict  # row -> bytes per GPU
    largest_layer: dict
    notes: list = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "total": self.total}, indent=2)

    def table(self) -> str:
        s = self.setup
        lines = [f"mmstack finetune --plan: {self.model}, {self.mode}, gradient checkpointing "
                 f"{'on' if s['checkpointing'] else 'off'}",
                 f"{s['gpus']} GPU(s) ({s['parallel']}), micro-batch {s['batch']} x {s['seq_len']} tokens "
                 f"({s['image_tokens']} image tokens from {s['views']} views), activations {s['activation_dtype']}, "
                 f"{s['device']}",
                 f"parameters {self.parameters / 1e9:.3f} B, trainable {self.trainable / 1e6:.2f} M", ""]
        width = max(len(k) for k in self.bytes) + 2
        lines += [f"{k:<{width}}{v / GiB:10.3f} GiB" for k, v in self.bytes.items()]
        lines += [f"{'total':<{width}}{self.total / GiB:10.3f} GiB", ""]
        big = self.largest_layer
        lines.append(f"largest layer: {big['name']} ({big['parameters'] / 1e6:.1f} M parameters, "
                     f"{big['bytes'] / GiB:.3f} GiB per GPU with its gradients, optimizer state and activations)")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def model_config(spec: Union[str, Path]):
    """The `ModelConfig` of a released variant's name (`mmstack.variants`), a model folder, a `config.json`, or a
    manifest holding one under "config"."""
    from mmstack import variants
    from mmstack.errors import ConfigError
    from mmstack.formats import read_config
    from mmstack.io.files import UnsafeFileError, read_text

    path = Path(spec)
    if not path.exists() and not path.is_symlink():
        try:
            return read_config(variants.variant_config(str(spec)))
        except KeyError as e:  # names the known variants
            raise ConfigError(f"{spec}: no such model folder or file, and {e.args[0]}") from None
    if not path.is_dir():  # a config.json or a manifest holding one under "config"; a FIFO or device is refused by name
        try:
            data = json.loads(read_text(path, what="config file"))
        except UnsafeFileError as e:
            raise ConfigError(str(e)) from None
        except (ValueError, RecursionError) as e:  # invalid JSON or UTF-8, absurdly deep nesting
            raise ConfigError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
        data = data.get("config", data) if isinstance(data, dict) else data
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a config.json object (or a manifest with one under \"config\")")
        return read_config(data, where=str(path))
    return read_config(path)


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _image_tokens(model, views: int, tiles: tuple[int, int], images: int) -> int:
    import torch

    if model.vision is None or images == 0:
        return 0
    s = model.cfg.vision.image_size
    with torch.device("meta"):
        feats = model.image_features(torch.empty(views, 3, s, s))
        return model.layout.arrange(feats, [tiles]).shape[0] * images


def _layer_grads(model, full: bool, rank: int) -> tuple[list[mf.LayerGrad], set]:
    """Per decoder layer: its LoRA'd Linear layers and materialised expert elements, and whether its input needs
    a gradient (something before it trains); and the ids of the expert tensors LoRA wraps."""
    out, wrapped = [], set()
    upstream = any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("language.layers."))
    for block in model.language.layers:
        lora, experts = set(), 0
        for name, mod in block.named_modules():
            if not hasattr(mod, "lora_A"):
                continue
            if hasattr(mod, "parameter_name"):  # peft ParamWrapper: W + BA of a stacked expert tensor
                w = getattr(mod.get_base_layer(), mod.parameter_name)
                experts += w.numel()
                wrapped.add(id(w))
            else:
                lora.add(name)
        out.append(mf.LayerGrad(full=full, lora=frozenset(lora), experts_lora=experts, input=upstream or full, rank=rank))
        upstream = upstream or any(p.requires_grad for p in block.parameters())
    return out, wrapped


def _matmul_weights(module, used: set, wrapped: set, prefix: str = "") -> tuple[int, int]:
    """(trainable, frozen) elements of the matmul weights (2-D and up, not embeddings) the backward reads."""
    trainable = frozen = 0
    for k, p in module.named_parameters(prefix=prefix):
        if k not in used or p.dim() < 2 or "embed_tokens" in k or id(p) in wrapped:
            continue
        if p.requires_grad:
            trainable += p.numel()
        elif k.startswith("language."):  # frozen weights behind a trainable input: the backward reads them
            frozen += p.numel()
    return trainable, frozen


def memory_plan(model, lora_r: int = 0, qlora: bool = False, lora_targets: Optional[str] = None, train: str = "all",
                checkpointing: bool = False, gpus: int = 1, parallel: str = "fsdp", seq_len: Optional[int] = None,
                batch: int = 1, images: int = 1, tiles: tuple[int, int] = (2, 2), device: str = "cuda",
                autocast: Optional[bool] = None) -> Plan:
    """The per-GPU memory of fine-tuning `model` (a variant name, folder, config file or `ModelConfig`).

    Args:
        lora_r / qlora / lora_targets / train / checkpointing / parallel: as `TrainArgs`.
        batch: the global batch; each GPU runs ceil(batch / gpus) examples of `seq_len` tokens (default: 2048, or
            the model context if shorter).
        images / tiles: images per example and their VL2 local tile grid (tw, th).
        device: "cuda" (fused attention) or "cpu" (attention without the fused kernel when q/k and v widths
            differ); autocast: bf16 autocast (default: on CUDA, as the trainer).
    Raises:
        ValueError: a size no trainer could run (a count below 1, tiles outside 1..64, a sequence beyond the
            context or too short for its image tokens; named by its flag), or no trainable parameter.
        ConfigError: a config file that is not one (naming the file), or an unknown variant.
    """
    import torch

    from mmstack.config import ModelConfig
    from mmstack.model import build_model

    from .train import select_trainable
    from .train_args import TrainArgs

    cfg = model if isinstance(model, ModelConfig) else model_config(model)
    seq_len = min(2048, cfg.language.max_position_embeddings) if seq_len is None else seq_len
    _check_setup(cfg, lora_r=lora_r, gpus=gpus, seq_len=seq_len, batch=batch, images=images, tiles=tiles)
    net = build_model(cfg, "meta")
    lm = cfg.language
    autocast = device == "cuda" if autocast is None else autocast
    b_ = mf.Bytes(a=2 if autocast or qlora else 4, w=2 if qlora else 4, autocast=autocast and not qlora)
    lora_r = lora_r or (16 if qlora else 0)
    if lora_r:
        from .lora import add_lora

        targets = lora_targets or TrainArgs.__dataclass_fields__["lora_targets"].default
        with torch.device("meta"):  # the adapters too: a plan allocates nothing, whatever the rank
            add_lora(net, lora_r, 2 * lora_r, targets.split(","))
    else:
        select_trainable(net, train)
    params = dict(net.named_parameters())
    used = {n for n in params if n.startswith(UNDERSTANDING)}
    trainable = sum(p.numel() for n, p in params.items() if p.requires_grad and n in used)
    if not trainable:
        raise ValueError("nothing the understanding loss reaches trains: check --train / --lora-targets")
    shard = gpus if gpus > 1 and parallel == "fsdp" else 1
    b = math.ceil(batch / max(gpus, 1))
    views = (1 + tiles[0] * tiles[1]) if cfg.layout is not None and cfg.layout.kind == "vl2_tiles" else 1
    tw_th = tiles if views > 1 else (0, 0)
    img = _image_tokens(net, views, tw_th, images)
    if img >= seq_len:
        raise ValueError(f"--seq-len {seq_len} leaves no text after {img} image tokens ({images} image(s))")
    n = b * seq_len

    nf4 = _nf4_weights(net) if qlora else set()

    def weight_bytes(name: str, p) -> float:
        if p.requires_grad:
            return 4
        if name in nf4:
            return NF4_BYTES
        return 2 if qlora else 4

    rows = {"parameters": sum(weight_bytes(k, p) * p.numel() for k, p in params.items()) / shard,
            "gradients": 4 * trainable / shard,
            "optimizer (AdamW: 2 fp32 states)": (8 * trainable + 4 * sum(p.requires_grad for p in params.values())) / shard}
    grads, wrapped = _layer_grads(net, full=not lora_r, rank=lora_r)
    if autocast and not qlora:
        # autocast caches the bf16 copy of a trainable weight for the whole forward; a frozen weight's copy lives
        # while autograd keeps it: to the backward, or (checkpointing) one recomputed layer at a time
        trainable_w, frozen_w = _matmul_weights(net, used, wrapped)
        if checkpointing:
            frozen_w = max(_matmul_weights(blk, used, wrapped, f"language.layers.{i}")[1]
                           for i, blk in enumerate(net.language.layers))
        rows["bf16 weight copies (autocast)"] = 2 * (trainable_w + frozen_w)
    fused = device == "cuda" or lm.attention != "mla" or lm.mla.qk_nope_head_dim + lm.mla.qk_rope_head_dim == lm.mla.v_head_dim
    layers = [mf.decoder_layer(lm, i, n, seq_len, b_, g, fused) for i, g in enumerate(grads)]
    vision_trains = any(p.requires_grad for k, p in params.items() if k.startswith("vision.") and k in used)
    proj_trains = vision_trains or any(p.requires_grad for k, p in params.items() if k.startswith("projector."))
    act = mf.head_and_loss(lm, n, b * (seq_len - img), b_, full=not lora_r)
    if vision_trains:
        act += mf.vision_tower(cfg.vision, b * views * images, b_)
    if proj_trains and cfg.projector is not None:
        v = cfg.vision
        act += mf.projector(cfg.projector, b * views * images * v.grid ** 2, b * img, b_)
    if checkpointing:
        act += mf.checkpointed_inputs(lm, n, b_)
        rows["activations (saved for backward)"] = act
        rows["one layer recomputed in backward"] = max(layers) - n * b_.w * lm.hidden_size  # its input is kept anyway
    else:
        rows["activations (saved for backward)"] = act + sum(layers) + mf.rope_tables(lm, n, b_)
    units = [(f"language.layers.{i}", blk, layers[i]) for i, blk in enumerate(net.language.layers)]
    if shard > 1:  # FSDP groups: decoder layers and (every example has an image) vision blocks; the root stays whole
        blocks = list(net.vision.tower.blocks) if net.vision is not None and images else []
        unit_max = max(_numel(u) for u in [*net.language.layers, *blocks])
        root = sum(p.numel() for p in params.values()) - sum(_numel(u) for u in [*net.language.layers, *blocks])
        rows["FSDP gathered: root group + 2 layers"] = 4 * (root + 2 * unit_max)
    elif gpus > 1:
        rows["DDP gradient buckets"] = 4 * trainable
    head = mf.head_and_loss(lm, n, b * (seq_len - img), b_, full=not lora_r)
    units += [("language.embed_tokens", net.language.embed_tokens, 0), ("language.lm_head", net.language.lm_head, head)]

    def unit_bytes(unit) -> int:
        _, mod, act_bytes = unit
        train = sum(p.numel() for p in mod.parameters() if p.requires_grad)
        return int((4 * _numel(mod) + 12 * train) / shard + act_bytes)

    best = max(units, key=unit_bytes)
    name, mod, _ = best
    if name.startswith("language.layers."):
        name += " (MoE)" if hasattr(mod.mlp, "gate") else " (dense)"
    notes = []
    if lora_r and any(g.experts_lora for g in grads):
        notes.append("LoRA on the stacked experts (peft target_parameters) materialises W + BA of each MoE layer's "
                     "experts for the backward: gradient checkpointing keeps one layer's copy instead of all")
    if autocast and not qlora:
        notes.append("bf16 autocast keeps a bf16 copy of every weight the backward reads (fp32 weights + copies);"
                     " under FSDP those copies are of gathered weights, not sharded")
    if qlora:
        notes.append("QLoRA as the trainer runs it (apps.qlora): bitsandbytes NF4 Linear4bit layers and NF4 expert "
                     "stacks with bf16 compute; each MoE layer dequantizes its experts (plus the LoRA delta) in "
                     "bf16 for its forward and backward, one layer at a time with gradient checkpointing")
    mode = "full" if not lora_r else f"{'QLoRA' if qlora else 'LoRA'} r={lora_r}"
    setup = dict(checkpointing=checkpointing, gpus=gpus, parallel=parallel if gpus > 1 else "single", batch=b,
                 seq_len=seq_len, image_tokens=b * img, views=b * views * images, device=device,
                 activation_dtype="bf16 (autocast; residual stream fp32)" if b_.autocast else
                 "bf16" if b_.a == 2 else "fp32")
    largest = dict(name=name, parameters=_numel(mod), bytes=unit_bytes(best))
    return Plan(model=cfg.name or str(model), mode=mode, setup=setup, parameters=sum(p.numel() for p in params.values()),
                trainable=trainable, bytes={k: int(v) for k, v in rows.items()}, largest_layer=largest, notes=notes)


def _nf4_weights(net) -> set:
    """Names of the weights `apps.qlora.quantize_base_nf4` makes 4-bit (LoRA wrappers or not): the decoder layers'
    plain Linear weights but those `mmstack.quantize.SKIP` names, and the stacked routed experts."""
    from torch import nn

    from mmstack.llm.moe import Experts
    from mmstack.quantize import SKIP

    names = set()
    for mname, mod in net.language.layers.named_modules(prefix="language.layers"):
        if isinstance(mod, Experts):
            names |= {f"{mname}.{n}" for n, _ in mod.named_parameters(recurse=False)}
        elif type(mod) is nn.Linear and not any(f".{s}." in f"{mname}." for s in SKIP) and ".lora_" not in mname:
            names.add(f"{mname}.weight")
    return names


def _check_setup(cfg, **setup) -> None:
    """The run's sizes as a trainer could run them, each refused by its flag: counts from 1 (images and the LoRA rank
    from 0), a sequence within the model's context."""
    lows = dict(lora_r=0, gpus=1, seq_len=1, batch=1, images=0)
    flags = dict(batch="batch-size")
    for name, lo in lows.items():
        v = setup[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"--{flags.get(name, name).replace('_', '-')} must be an integer >= {lo}, got {v!r}")
    tw, th = setup["tiles"]
    if min(tw, th) < 1 or tw * th > 64:
        raise ValueError(f"--tiles {tw}x{th}: each side at least 1, at most 64 tiles in all")
    context = cfg.language.max_position_embeddings
    if setup["seq_len"] > context:
        raise ValueError(f"--seq-len {setup['seq_len']} exceeds the model context ({context} tokens)")


def parse_tiles(text: str) -> tuple[int, int]:
    try:
        tw, th = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--tiles must be WxH, e.g. 2x2, got {text!r}") from None
    return tw, th


def main(args) -> int:
    """`mmstack finetune --plan`: print the plan of the parsed flags."""
    if args.task != "understanding":
        raise ValueError("--plan models the understanding task (--task understanding)")
    device = args.device or "cuda"
    plan = memory_plan(args.model, lora_r=args.lora_r, qlora=getattr(args, "qlora", False),
                       lora_targets=args.lora_targets, train=args.train, checkpointing=args.gradient_checkpointing,
                       gpus=args.gpus, parallel=args.parallel, seq_len=args.seq_len, batch=args.batch_size,
                       images=args.images, tiles=parse_tiles(args.tiles), device=device,
                       autocast=(args.dtype != "fp32") if device == "cuda" else args.dtype == "bf16")
    print(plan.to_json() if args.plan_json else plan.table())
    return 0

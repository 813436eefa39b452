"""`TrainArgs`, the options of a fine-tuning run, written once: the `mmstack finetune` flags are generated from
its fields (kebab-case names, types, defaults, help, choices), so a default lives in one place.

    parser = argparse.ArgumentParser()
    add_arguments(parser)                      # --model, --data, ..., --batch-size, --lora-r, ...
    args = from_namespace(parser.parse_args(["--model", "m", "--data", "d.jsonl", "--out", "o"]))

Field metadata (all optional): `help`, `choices`, `nargs`, `flag` (when the flag is not the kebab-case name),
`cli=False` (a Python-only option). Without metadata a field becomes `--its-name` with the type of its
annotation; a field without a default is a required flag; a bool is a switch (`--x` when it defaults to
False, `--no-x` when it defaults to True).
"""
from __future__ import annotations

import argparse
import string
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from .parallel import MODES

TASKS = ("understanding", "vq", "flow", "vq_tokenizer", "mixed")
LORA_TARGETS = "attention,mlp,shared_experts,routed_experts"  # groups and names: apps/lora_targets.py
SAVE = ("merged", "adapter", "both")


def _cli(help: Optional[str] = None, **options: Any) -> dict:
    """The metadata of a field's flag: its help text and any of `choices`, `nargs`, `flag`, `cli`."""
    return {"help": help, **options}


@dataclass
class TrainArgs:
    """The options of `apps.train.run` (and, generated from them, of `mmstack finetune`)."""

    model: str = field(metadata=_cli("model folder to start from (any supported format)"))
    data: list = field(metadata=_cli("LLaVA JSON, ShareGPT JSON/JSONL, messages JSONL, t2i JSONL"))
    out: str = field(metadata=_cli("output folder (checkpoint/, metrics.jsonl, model/)"))
    task: str = field(default="understanding", metadata=_cli(choices=TASKS))
    tokenizer: Optional[str] = None
    steps: int = 100
    batch_size: int = field(default=8, metadata=_cli("global batch (split across torchrun processes)"))
    grad_accum: int = 1
    lr: float = 1e-4
    warmup: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    # comma-separated parts (language, vision, projector, layout, vq, vq_head, ...) or "all"
    train: str = field(default="all", metadata=_cli("parts to train: all, or e.g. language,projector"))
    lora_r: int = field(default=0, metadata=_cli("LoRA rank (0 = full fine-tuning of --train)"))
    lora_alpha: int = 16
    lora_targets: str = field(default=LORA_TARGETS, metadata=_cli(
        "comma-separated LoRA targets: groups attention, mlp (dense), shared_experts, routed_experts (the stacked "
        "experts), or layer names like q_proj, experts.down_proj"))
    save: str = field(default="merged", metadata=_cli(
        "with LoRA: write the merged model (OUT/model), the peft adapter folder (OUT/adapter), or both",
        choices=SAVE))
    qlora: bool = field(default=False, metadata=_cli(
        "LoRA on a 4-bit NF4 base (QLoRA; one CUDA GPU and bitsandbytes: pip install 'mmstack[qlora]')"))
    loss_average: str = field(default="token", metadata=_cli(
        "understanding loss: mean over all answer tokens (token), or each example's mean, then over examples "
        "(sample: short answers weigh as much as long ones)", choices=["token", "sample"]))
    task_weights: str = field(default="", metadata=_cli(
        "how much each task of a step counts, e.g. understanding=1,vq=0.5 (tasks not named weigh 1)"))
    ctc_weight: float = field(default=0.0, metadata=_cli(
        "weight of a CTC auxiliary loss on the vision columns for examples whose answer is one line of "
        "--ctc-charset characters (training only: teaches a from-scratch tower to read; 0 = off)"))
    ctc_charset: str = field(default=string.ascii_uppercase + string.digits, metadata=_cli(
        "the characters the CTC head reads"))
    ctc_frames: int = field(default=4, metadata=_cli("CTC frames per patch column"))
    ctc_init: Optional[str] = field(default=None, metadata=_cli(
        "start the CTC head from this ctc_head.safetensors (an earlier run's folder has one) instead of random"))
    vq_restart_every: int = field(default=0, metadata=_cli(
        "task vq_tokenizer: restart codebook rows unused for this many steps on encoder outputs (0 = never)"))
    gradient_checkpointing: bool = False
    # autocast: default bf16 on CUDA, fp32 on CPU; "bf16" also on CPU, "fp32" off
    dtype: Optional[str] = field(default=None, metadata=_cli(
        "bf16 autocast for the forward (default on CUDA; ~1.8x faster on CPUs with AVX512-BF16/AMX)",
        choices=["bf16", "fp32"]))
    device: Optional[str] = None
    eval_fraction: float = 0.05
    eval_every: int = 0
    save_every: int = 50
    seed: int = 0
    resume: bool = field(default=False, metadata=_cli("continue from OUT/checkpoint"))
    skip_bad: bool = field(default=False, metadata=_cli("drop invalid examples instead of stopping"))
    prompt_dropout: float = 0.1
    log_every: int = field(default=1, metadata=_cli(cli=False))
    # stop (as if killed) after this step: for resume tests
    stop_after: Optional[int] = field(default=None, metadata=_cli(argparse.SUPPRESS))
    # with several processes: "ddp", or "fsdp" (sharded, for models larger than a device)
    parallel: str = field(default="ddp", metadata=_cli(
        "with several torchrun processes: replicate (ddp), or shard weights, gradients and optimizer state "
        "(fsdp, FSDP2) for models larger than one device", choices=MODES))
    extra: dict = field(default_factory=dict, metadata=_cli(cli=False))


def _cli_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def _value_type(annotation) -> Any:
    """`Optional[T]` -> T."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if typing.get_origin(annotation) is typing.Union and len(args) == 1 else annotation


def dataclass_arguments(p: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per command-line field of the dataclass `cls`, in field order (rules: the module docstring)."""
    hints = typing.get_type_hints(cls)
    for f in _cli_fields(cls):
        meta, kind = f.metadata, _value_type(hints[f.name])
        name = f.name.replace("_", "-")
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        options: dict[str, Any] = {"help": meta.get("help")}
        if kind is bool:
            flag = meta.get("flag") or (f"--no-{name}" if default is True else f"--{name}")
            options.update(action="store_false" if default is True else "store_true", dest=f.name)
        else:
            flag = meta.get("flag") or f"--{name}"
            if default is dataclasses.MISSING:
                options["required"] = True
            else:
                options["default"] = default
            if kind is list:
                options["nargs"] = "+"
            elif kind in (int, float):
                options["type"] = kind
            options.update({k: meta[k] for k in ("nargs", "choices") if k in meta})
        p.add_argument(flag, **options)


def dataclass_from_namespace(cls: type, ns: argparse.Namespace):
    """An instance of `cls` from parsed flags: its command-line fields that `ns` holds (other attributes of
    `ns`, like the CLI's `command`, are ignored; fields it lacks keep their defaults)."""
    return cls(**{f.name: getattr(ns, f.name) for f in _cli_fields(cls) if hasattr(ns, f.name)})


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `mmstack finetune` flags: one per command-line field of `TrainArgs`."""
    dataclass_arguments(p, TrainArgs)


def from_namespace(ns: argparse.Namespace) -> TrainArgs:
    """The `TrainArgs` of parsed `mmstack finetune` flags."""
    return dataclass_from_namespace(TrainArgs, ns)

"""`mmstack finetune` flags are generated from `TrainArgs`: each default is written once, every field but the
Python-only ones has its kebab-case flag, and parsing gives back the dataclass."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import pytest

from mmstack.apps.train_args import (TrainArgs, add_arguments, dataclass_arguments, dataclass_from_namespace,
                                     from_namespace)

REQUIRED = ["--model", "m", "--data", "d.jsonl", "--out", "o"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmstack finetune")
    add_arguments(p)
    return p


def test_flags_without_values_give_the_dataclass_defaults():
    assert from_namespace(_parser().parse_args(REQUIRED)) == TrainArgs(model="m", data=["d.jsonl"], out="o")


def test_every_command_line_field_has_its_kebab_case_flag_and_default():
    actions = {a.dest: a for a in _parser()._actions}
    for f in dataclasses.fields(TrainArgs):
        if f.name in ("log_every", "extra"):  # Python-only options
            assert f.name not in actions
            continue
        a = actions[f.name]
        assert a.option_strings == ["--" + f.name.replace("_", "-")]
        if f.default is dataclasses.MISSING:
            assert a.required
        else:
            assert a.default == f.default and not a.required
    assert actions["data"].nargs == "+" and list(actions["parallel"].choices) == ["ddp", "fsdp"]
    assert list(actions["task"].choices) == ["understanding", "vq", "flow", "vq_tokenizer", "mixed"]
    assert "--stop-after" not in _parser().format_help()  # hidden: a testing aid


def test_every_flag_sets_its_field_with_its_type():
    argv = ["--model", "m", "--data", "d.jsonl", "e.jsonl", "--out", "o",
        "--task", "vq", "--tokenizer", "t", "--steps", "3", "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-3",
        "--warmup", "1", "--min-lr-ratio", "0.2", "--weight-decay", "0.1", "--train", "language", "--lora-r", "4",
        "--lora-alpha", "8", "--lora-targets", "q_proj", "--gradient-checkpointing", "--dtype", "bf16", "--device",
        "cpu", "--eval-fraction", "0", "--eval-every", "2", "--save-every", "2", "--seed", "3", "--resume",
        "--skip-bad", "--prompt-dropout", "0.2", "--parallel", "fsdp", "--stop-after", "2"]
    args = from_namespace(_parser().parse_args(argv))
    assert args == TrainArgs(model="m", data=["d.jsonl", "e.jsonl"], out="o", task="vq", tokenizer="t", steps=3,
                             batch_size=2, grad_accum=2, lr=1e-3, warmup=1, min_lr_ratio=0.2, weight_decay=0.1,
                             train="language", lora_r=4, lora_alpha=8, lora_targets="q_proj",
                             gradient_checkpointing=True, dtype="bf16", device="cpu", eval_fraction=0.0,
                             eval_every=2, save_every=2, seed=3, resume=True, skip_bad=True, prompt_dropout=0.2,
                             parallel="fsdp", stop_after=2)
    assert type(args.lr) is float and type(args.steps) is int
    with pytest.raises(SystemExit):
        _parser().parse_args(REQUIRED + ["--parallel", "zero3"])


def test_the_generator_handles_switches_that_default_on_and_factory_defaults():
    @dataclass
    class Options:
        name: str = field(metadata={"help": "who"})
        fast: bool = True
        tags: list = field(default_factory=lambda: ["a"])
        limit: Optional[float] = None
        secret: int = field(default=0, metadata={"cli": False})

    p = argparse.ArgumentParser()
    dataclass_arguments(p, Options)
    assert dataclass_from_namespace(Options, p.parse_args(["--name", "x"])) == Options("x")
    got = dataclass_from_namespace(Options, p.parse_args(["--name", "x", "--no-fast", "--tags", "b", "c",
                                                          "--limit", "2.5"]))
    assert got == Options("x", fast=False, tags=["b", "c"], limit=2.5)
    with pytest.raises(SystemExit):
        p.parse_args(["--name", "x", "--secret", "1"])

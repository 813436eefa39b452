"""`mmstack finetune` / `torchrun --nproc-per-node N -m mmstack.apps.finetune ...`.

The flags are generated from `train_args.TrainArgs` (names, types, defaults and help are written there once), and
from `finetune_plan.PlanArgs` for `--plan` (the memory per GPU of the run, without data or training).
"""
from __future__ import annotations

import argparse
import sys

from . import train_args
from .finetune_plan import PlanArgs
from .train import run
from .train_args import from_namespace

__all__ = ["add_arguments", "main"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `TrainArgs` flags and the `--plan` ones; --data and --out are checked in `main` (--plan needs neither)."""
    train_args.add_arguments(p)
    train_args.dataclass_arguments(p, PlanArgs)
    for action in p._actions:
        if action.dest in ("data", "out"):
            action.required = False


def main(args: argparse.Namespace) -> int:
    """Fine-tune with the parsed flags (or print the plan with --plan); 0 when it finished (errors raise)."""
    if getattr(args, "plan", False):
        from .finetune_plan import main as plan

        return plan(args)
    missing = [f"--{name}" for name in ("data", "out") if getattr(args, name, None) is None]
    if missing:
        raise ValueError(f"the following arguments are required: {', '.join(missing)} (only --plan runs without)")
    run(from_namespace(args))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="mmstack.apps.finetune")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))

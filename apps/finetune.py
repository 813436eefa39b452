"""`mmstack finetune` / `torchrun --nproc-per-node N -m mmstack.apps.finetune ...`.

The flags are generated from `train_args.TrainArgs` (names, types, defaults and help are written there once).
"""
from __future__ import annotations

import argparse
import sys

from .train import run
from .train_args import add_arguments, from_namespace

__all__ = ["add_arguments", "main"]


def main(args: argparse.Namespace) -> int:
    """Fine-tune with the parsed flags; 0 when the run finished (errors raise)."""
    run(from_namespace(args))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="mmstack.apps.finetune")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))

"""`mmstack finetune` / `torchrun --nproc-per-node N -m mmstack.apps.finetune ...`."""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from .train import TrainArgs, run


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder to start from (any supported format)")
    p.add_argument("--data", required=True, nargs="+", help="LLaVA JSON, ShareGPT JSON/JSONL, messages JSONL, t2i JSONL")
    p.add_argument("--out", required=True, help="output folder (checkpoint/, metrics.jsonl, model/)")
    p.add_argument("--task", default="understanding", choices=["understanding", "vq", "flow", "vq_tokenizer", "mixed"])
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8, help="global batch (split across torchrun processes)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--train", default="all", help="parts to train: all, or e.g. language,projector")
    p.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0 = full fine-tuning of --train)")
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-targets", default=TrainArgs.lora_targets)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"],
                   help="bf16 autocast for the forward (default on CUDA; ~1.8x faster on CPUs with AVX512-BF16/AMX)")
    p.add_argument("--device", default=None)
    p.add_argument("--eval-fraction", type=float, default=0.05)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--skip-bad", action="store_true", help="drop invalid examples instead of stopping")
    p.add_argument("--prompt-dropout", type=float, default=0.1)
    p.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"],
                   help="with several torchrun processes: replicate (ddp), or shard weights, gradients and "
                        "optimizer state (fsdp, FSDP2) for models larger than one device")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)


def main(args: argparse.Namespace) -> int:
    names = {f.name for f in fields(TrainArgs)}
    run(TrainArgs(**{k: v for k, v in vars(args).items() if k in names}))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="mmstack.apps.finetune")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))

"""The flags every command that runs a model shares (--model, --device, --dtype, --tokenizer, --quantize, --adapter) and
the `mmstack.load` keyword arguments they stand for. argparse only: importing this loads no model code."""
from __future__ import annotations

import argparse

MODEL_HELP = "model folder (official, transformers or native) or hub id org/name[@revision] (default: the embedded demo model)"


def add_model_arguments(p: argparse.ArgumentParser, model_help: str = MODEL_HELP) -> None:
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or tokenizer.json (default: found in --model)")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="weight-only quantization of the language model at load time (less memory; int8 keeps "
                        "answers closest)")
    p.add_argument("--adapter", default=None,
                   help="LoRA adapter folder (adapter_config.json + adapter_model.safetensors, as `mmstack finetune "
                        "--save adapter` writes) merged into --model's weights at load")


def load_kwargs(args: argparse.Namespace) -> dict:
    """`mmstack.load` keyword arguments from the flags above (the model itself is passed separately)."""
    return dict(device=args.device, dtype=args.dtype, tokenizer=args.tokenizer, quantize=args.quantize,
                adapter=getattr(args, "adapter", None))

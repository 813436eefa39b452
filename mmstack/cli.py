"""The `mmstack` command line. Subcommands are thin wrappers over the Python API.

Exit codes: 0 success, 2 usage error, 1 runtime error (one line on stderr; `--verbose` for a traceback).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable, Optional, Sequence

COMMANDS: dict[str, tuple[Callable, Callable, str]] = {}


def command(name: str, help: str):
    """Register `fn(args) -> int` with its argument builder `configure(parser)`."""

    def deco(configure: Callable):
        def wrap(fn: Callable):
            COMMANDS[name] = (configure, fn, help)
            return fn

        return wrap

    return deco


def _model_args(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    p.add_argument("--model", required=model_required, help="model folder (official, transformers or native format)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or tokenizer.json (default: found in --model)")


def _info_args(p):
    p.add_argument("model", help="model folder")


@command("info", "show how a model folder is read (format, sizes, parts)")(_info_args)
def cmd_info(args) -> int:
    from .formats import read_config

    cfg = read_config(args.model)
    lm = cfg.language
    out = {"source_format": cfg.source_format, "language": {
        "layers": lm.num_layers, "hidden": lm.hidden_size, "heads": lm.num_heads, "attention": lm.attention,
        "moe": None if lm.moe is None else {"experts": lm.moe.n_routed_experts, "top_k": lm.moe.num_experts_per_tok,
                                            "scoring": lm.moe.scoring_func, "method": lm.moe.topk_method},
        "vocab": lm.vocab_size, "kv_values_per_token": lm.kv_values_per_token()}, "parts": sorted(cfg.parts)}
    print(json.dumps(out, indent=2))
    return 0


def _complete_args(p):
    _model_args(p)
    p.add_argument("prompt", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


@command("complete", "continue a text prompt (streams to stdout)")(_complete_args)
def cmd_complete(args) -> int:
    from .api import load

    pipe = load(args.model, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer)
    for delta in pipe.stream(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                             seed=args.seed):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _convert_args(p):
    p.add_argument("source", help="model folder in any supported format")
    p.add_argument("out", help="output folder (native mmstack format)")
    p.add_argument("--tokenizer", default=None, help="tokenizer to copy (default: the source's)")


@command("convert", "convert an official / transformers checkpoint folder to the native format")(_convert_args)
def cmd_convert(args) -> int:
    from pathlib import Path

    from .api import find_tokenizer
    from .loading import load_model, save_pretrained

    model = load_model(args.source, device="cpu")
    tok = args.tokenizer or find_tokenizer(Path(args.source))
    out = save_pretrained(model, args.out, tokenizer_dir=tok)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmstack", description="DeepSeek-VL2 / Janus / JanusFlow in one stack")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging and full tracebacks")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"mmstack {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (configure, _, help) in sorted(COMMANDS.items()):
        configure(sub.add_parser(name, help=help, description=help))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.command:
        parser.print_help()
        return 2
    fn = COMMANDS[args.command][1]
    try:
        return int(fn(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for users; --verbose shows the traceback
        if args.verbose:
            raise
        print(f"mmstack {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

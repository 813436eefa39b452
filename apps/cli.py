"""The `mmstack` command line. Subcommands are thin wrappers over the Python API.

Exit codes: 0 success, 2 usage error, 1 runtime error (one line on stderr; `--verbose` for a traceback).
Commands implemented in `mmstack.apps` are imported only when used (gradio, for one, is heavy).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from .model_args import add_model_arguments, load_kwargs

# name -> (configure(parser), run(args) -> int, help)
COMMANDS: dict[str, tuple[Callable, Callable, str]] = {}
# name -> (module with add_arguments(parser) and main(args), help); imported on use
LAZY_COMMANDS = {
    "demo": ("mmstack.apps.demo", "the web demo (chat, text to image, documents) on a local port"),
    "serve": ("mmstack.apps.serve", "an OpenAI-compatible HTTP server (chat completions, image generations)"),
    "ocr": ("mmstack.apps.ocr", "batch OCR over files, folders, globs, PDFs or a manifest, to JSONL"),
    "chart": ("mmstack.apps.chart", "batch chart-to-table parsing to CSV/JSON"),
    "synth": ("mmstack.apps.synth", "write a deterministic synthetic image-text dataset"),
    "finetune": ("mmstack.apps.finetune", "fine-tune on image-text data (LLaVA, ShareGPT, messages JSONL)"),
    "eval-demo": ("mmstack.apps.eval_demo", "score the embedded demo model on a held-out synthetic set"),
    "build-demo": ("mmstack.apps.recipe", "re-create the embedded demo model from its recipe (synth + finetune)"),
    "bench": ("mmstack.apps.bench", "side-by-side benchmarks against transformers"),
}


def command(name: str, help: str, configure: Callable):
    def wrap(fn: Callable):
        COMMANDS[name] = (configure, fn, help)
        return fn

    return wrap


def model_arguments(p: argparse.ArgumentParser) -> None:
    """--model / --device / --dtype / --tokenizer / --quantize, shared by every command that runs a model."""
    add_model_arguments(p)


def load_pipeline(args):
    from mmstack.api import default_model_dir, load

    model = args.model or default_model_dir()
    return load(model, **load_kwargs(args))


def _sampling_arguments(p, max_new_tokens=512):
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                repetition_penalty=args.repetition_penalty, seed=args.seed)


# ------------------------------------------------------------------------------------------ commands


def _info_args(p):
    p.add_argument("model", nargs="?", default=None,
                   help="model folder or hub id (org/name[@revision]); default: the embedded demo model")


@command("info", "show how a model folder is read (format, sizes, parts) and what it says about itself", _info_args)
def cmd_info(args) -> int:
    from mmstack.api import default_model_dir
    from mmstack.formats import read_config
    from mmstack.hub import resolve_model

    from .model_card import read_card

    folder = resolve_model(args.model) if args.model else default_model_dir()
    cfg = read_config(folder)
    lm = cfg.language
    out = {"source_format": cfg.source_format, "language": {
        "layers": lm.num_layers, "hidden": lm.hidden_size, "heads": lm.num_heads, "attention": lm.attention,
        "moe": None if lm.moe is None else {"experts": lm.moe.n_routed_experts, "top_k": lm.moe.num_experts_per_tok,
                                            "scoring": lm.moe.scoring_func, "method": lm.moe.topk_method},
        "vocab": lm.vocab_size, "kv_values_per_token": lm.kv_values_per_token()}, "parts": sorted(cfg.parts)}
    out.update(read_card(folder, cfg).to_json_dict())
    print(json.dumps(out, indent=2))
    return 0


def _complete_args(p):
    model_arguments(p)
    p.add_argument("prompt", help="text to continue")
    _sampling_arguments(p, 64)


@command("complete", "continue a text prompt (streams to stdout)", _complete_args)
def cmd_complete(args) -> int:
    pipe = load_pipeline(args)
    for delta in pipe.stream(args.prompt, **_sampling(args)):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _describe_args(p):
    model_arguments(p)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--prompt", default=None, help="question (default: describe the image in detail)")
    p.add_argument("--together", action="store_true", help="all images in one turn instead of one answer each")
    _sampling_arguments(p)


@command("describe", "describe images (or answer --prompt about them)", _describe_args)
def cmd_describe(args) -> int:
    pipe = load_pipeline(args)
    groups = [args.images] if args.together else [[i] for i in args.images]
    for group in groups:
        answer = pipe.describe(group, args.prompt, **_sampling(args))
        print(f"{group[0]}: {answer}" if len(groups) > 1 else answer)
    return 0


def _ground_args(p):
    model_arguments(p)
    p.add_argument("image")
    p.add_argument("phrase", help="what to find, e.g. 'the red circle'")
    p.add_argument("--out", default=None, help="write the image with the boxes drawn here")
    p.add_argument("--max-new-tokens", type=int, default=128)


@command("ground", "find a phrase in an image: boxes in image pixels (JSON)", _ground_args)
def cmd_ground(args) -> int:
    from dataclasses import asdict

    pipe = load_pipeline(args)
    boxes = pipe.ground(args.image, args.phrase, max_new_tokens=args.max_new_tokens)
    print(json.dumps([asdict(b) for b in boxes]))
    if args.out:
        from mmstack.vision.grounding import draw_boxes
        from mmstack.vision.image_io import load_image

        _atomic_save(draw_boxes(load_image(args.image, pipe.policy), boxes), Path(args.out))
    return 0


def _generate_args(p):
    model_arguments(p)
    p.add_argument("prompt")
    p.add_argument("-n", type=int, default=1, help="number of images")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--cfg", type=float, default=None, help="guidance weight (default: the model family's)")
    p.add_argument("--temperature", type=float, default=None, help="VQ path")
    p.add_argument("--steps", type=int, default=None, help="flow path")
    p.add_argument("--mode", choices=["vq", "flow"], default=None)
    p.add_argument("--out", default=".", help="output folder")


@command("generate", "text to image; writes PNG files", _generate_args)
def cmd_generate(args) -> int:
    pipe = load_pipeline(args)
    images = pipe.generate(args.prompt, n=args.n, seed=args.seed, cfg=args.cfg, temperature=args.temperature,
                           steps=args.steps, mode=args.mode)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"image-{args.seed}" if args.seed is not None else "image"
    for i, im in enumerate(images):
        path = out / f"{stem}-{i}.png"
        _atomic_save(im, path)
        print(path)
    return 0


def _chat_args(p):
    model_arguments(p)
    _sampling_arguments(p)


@command("chat", "interactive terminal chat; '/image PATH' attaches an image, '/reset', '/quit'", _chat_args)
def cmd_chat(args) -> int:
    pipe = load_pipeline(args)
    history: list = []
    pending: list = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            history, pending = [], []
            continue
        if line.startswith("/image "):
            pending.append({"type": "image", "path": line[len("/image "):].strip()})
            continue
        history.append({"role": "user", "content": pending + [{"type": "text", "text": line}]})
        pending = []
        answer = ""
        try:
            for delta in pipe.chat(history, **_sampling(args)):
                answer += delta
                sys.stdout.write(delta)
                sys.stdout.flush()
        except ValueError as e:  # a bad /image file, a turn over a limit: this turn is dropped, the chat goes on
            history.pop()
            print(f"\nmmstack chat: error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                  "(turn dropped; the conversation goes on)", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": answer})


def _convert_args(p):
    from mmstack.writers import export_formats

    p.add_argument("source", help="model folder in any supported format")
    p.add_argument("out", help="output folder")
    p.add_argument("--to", default="mmstack", choices=export_formats(), metavar="FORMAT",
                   help="output format: mmstack (native, the default), deepseek_vl_v2, janus, janusflow (official), "
                        "hf_deepseek_v2, hf_deepseek_v3, hf_llama, hf_janus (transformers)")
    p.add_argument("--tokenizer", default=None, help="tokenizer to copy (default: the source's)")
    p.add_argument("--dtype", default=None, help="weights dtype (default: the source checkpoint's)")
    p.add_argument("--language-only", action="store_true",
                   help="write only the language model (e.g. a DeepSeek-VL2 or Janus LLM as an hf_* causal LM)")


@command("convert", "convert a checkpoint folder: official / transformers -> native, or back with --to "
                    "(e.g. a fine-tuned native model -> deepseek_vl_v2)", _convert_args)
def cmd_convert(args) -> int:
    from mmstack.api import find_tokenizer
    from mmstack.export import plan_export
    from mmstack.formats import read_config
    from mmstack.loading import checkpoint_dtype, export_pretrained, load_model, resolve_dtype
    from mmstack.hub import resolve_model
    from mmstack.writers import ExportError

    source = resolve_model(args.source)
    cfg = read_config(source)
    tok = args.tokenizer or find_tokenizer(source)
    dtype = resolve_dtype(args.dtype) or checkpoint_dtype(source)
    try:
        if args.to != "mmstack":  # refuse before loading the weights
            plan_export(cfg, args.to, tokenizer_dir=tok, language_only=args.language_only)
        model = load_model(source, device="cpu", dtype=dtype, cfg=cfg)
        out = export_pretrained(model, args.out, args.to, tokenizer_dir=tok, language_only=args.language_only)
    except ExportError as e:  # the format cannot hold this model: a usage error
        print(f"mmstack convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def _atomic_save(image, path: Path) -> None:
    """Write `image` as PNG to `path` atomically (a kill mid-write never leaves a torn file there)."""
    import io

    from mmstack.io.atomic import atomic_write_bytes

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


# ------------------------------------------------------------------------------------------ entry point


def _available_lazy() -> dict:
    out = {}
    for name, (module, help) in LAZY_COMMANDS.items():
        try:
            if importlib.util.find_spec(module) is not None:
                out[name] = (module, help)
        except ModuleNotFoundError:
            continue
    return out


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    from mmstack import __version__

    parser = argparse.ArgumentParser(prog="mmstack", description="DeepSeek-VL2 / Janus / JanusFlow in one stack")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging and full tracebacks")
    parser.add_argument("--version", action="version", version=f"mmstack {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (configure, _, help) in sorted(COMMANDS.items()):
        configure(sub.add_parser(name, help=help, description=help))
    for name, (module, help) in sorted(_available_lazy().items()):
        sp = sub.add_parser(name, help=help, description=help)
        if only == name:  # import the app module only for the command being run
            importlib.import_module(module).add_arguments(sp)
        else:
            sp.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=chosen if chosen in LAZY_COMMANDS else None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.command:
        parser.print_help()
        return 2
    if args.command in COMMANDS:
        fn = COMMANDS[args.command][1]
    else:
        fn = importlib.import_module(LAZY_COMMANDS[args.command][0]).main
    try:
        return int(fn(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for users; --verbose shows the traceback
        if args.verbose:
            raise
        print(error_text(args.command, e), file=sys.stderr)
        return 1


def error_text(command: str, e: BaseException) -> str:
    """One line per error; a data error keeps its `file:line` list (the message already caps it at 20 + a count)."""
    from mmstack.apps.data import DataError

    lines = str(e).splitlines() or [""]
    head = f"mmstack {command}: error: {type(e).__name__}: {lines[0]}"
    return "\n".join([head, *lines[1:22]]) if isinstance(e, DataError) else head


if __name__ == "__main__":
    sys.exit(main())

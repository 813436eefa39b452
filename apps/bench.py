"""`mmstack bench SUITE`: side-by-side benchmarks on random weights, gated by a correctness check.

    mmstack bench janus-t2i --size cpu --json janus.json
    mmstack bench all --size full --device cuda --dtype bfloat16

Method (the same for every suite, see `measure`):
  1. Build both sides from one config with identical random weights: a transformers model is drawn,
     written with `save_pretrained`, and read back by `mmstack.loading.load_model` (the production config
     reader and key table). Suites without a transformers counterpart compare our fast path with our
     plain one (grouped MoE vs the expert loop; prompt-KV reuse vs full recomputation).
  2. Correctness gate, before any timing: greedy tokens identical (fp32) or first-step logits close
     (bf16/fp16: cosine > 0.999). A failed gate prints why and the command exits 1.
  3. Warm up (the gate runs count as the first warm-up), then time `--repeat` (>= 5) runs per side,
     interleaved (ours, theirs, ours, ...) so that drift on a shared machine hits both sides alike,
     with `torch.cuda.synchronize()` around every timed region on CUDA. Medians are reported.
  4. Prefill tokens/s, decode ms/token, end-to-end seconds, peak memory above the resident weights
     (CUDA: `torch.cuda.max_memory_allocated`; not measured on CPU), KV-cache bytes per token (from the
     cache tensors each side actually allocated), and ours/theirs for each.

Sizes: "smoke" (seconds; the tests run it), "cpu" (each suite well under 2 minutes on 2 cores) and
"full" (the released dimensions, for a GPU). Performance claims live in this output only; the tests
check the plumbing, never a timing.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Optional

import torch

from .bench_measure import SIZES, GateError, environment, format_table, measure
from .bench_suites import SUITES

log = logging.getLogger(__name__)


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _lengths(text: str) -> list:
    return [_positive(x) for x in text.split(",")]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `mmstack bench` flags."""
    p.add_argument("suites", nargs="+", metavar="SUITE",
                   help=f"one or more of {', '.join(SUITES)}, {', '.join(OWN_SUITES)}, or all")
    p.add_argument("--size", choices=SIZES, default="cpu", help="smoke (seconds), cpu (minutes), full (released dims, GPU)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--against", choices=["transformers", "none"], default="transformers",
                   help="baseline for suites with a transformers counterpart (the others compare our plain path)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per side (at least 5)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed runs per side after the gate (the gate and 2 warm-ups let the CPU decode step "
                        "settle on eager or compiled before timing)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="mla-moe-decode: a DeepSeek-V2/V3 config.json whose architecture fields replace the size's")
    p.add_argument("--prompts", default=None, metavar="N,N,...", type=_lengths,
                   help="mla-moe-decode: prompt lengths to run, one case each (default: the size's)")
    p.add_argument("--new-tokens", type=_positive, default=None, help="mla-moe-decode: tokens generated per case")
    p.add_argument("--threads", type=_positive, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", default=None, help="write the results here")


def run_suites(names: list[str], size: str = "cpu", device=None, dtype=None, against: str = "transformers",
               repeat: int = 5, warmup: int = 2, threads: Optional[int] = None, config: Optional[str] = None,
               prompts: Optional[list] = None, new_tokens: Optional[int] = None) -> list[dict]:
    """Run suites and return their JSON records (the Python form of the command). `config`, `prompts` and
    `new_tokens` shape the mla-moe-decode cases (`bench_suites.mla_moe_decode`).

    Raises:
        ValueError: an unknown suite or size, fewer than 5 repeats (except at size "smoke"), or a `config` file that
            is not a JSON object (naming the file); ConfigError: its architecture is impossible (naming the field).
        GateError: the two sides of a case disagree (nothing of that suite is timed).
    """
    from mmstack.loading import default_device, default_dtype, resolve_dtype

    if "all" in names:
        names = list(SUITES)
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise ValueError(f"unknown suite(s) {unknown} (known: {', '.join(SUITES)}, all)")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if repeat < 5 and size != "smoke":
        raise ValueError(f"--repeat must be at least 5 (medians of fewer runs are noise), got {repeat}")
    shaped = config is not None or prompts or new_tokens
    if shaped and names != ["mla-moe-decode"]:
        raise ValueError("--config, --prompts and --new-tokens apply to the mla-moe-decode suite alone")
    options = {}
    if shaped:
        options = dict(config=_read_config(config, size) if config else None, prompts=prompts, new_tokens=new_tokens)
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype) or default_dtype(device)
    env = environment(device, torch.get_num_threads())
    results = []
    for name in names:
        log.info("suite %s (%s)", name, size)
        t0 = time.perf_counter()
        cases = SUITES[name](size=size, device=device, dtype=dtype, against=against, **options)
        with torch.inference_mode():
            records = [measure(c, device, repeat, warmup) for c in cases]
        del cases  # free this suite's models before the next one is built
        results.append({"suite": name, "size": size, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                         "repeat": repeat, "env": env, "wall_s": time.perf_counter() - t0, "cases": records})
    return results


def _read_config(path: str, size: str = "cpu") -> dict:
    from mmstack.errors import ConfigError
    from mmstack.formats import read_config
    from mmstack.io.files import UnsafeFileError, read_text

    from .bench_suites import mla_config

    try:
        cfg = json.loads(read_text(path, what="config file"))
    except UnsafeFileError as e:  # a FIFO, a device, a file over the size limit
        raise ValueError(str(e)) from None
    except (ValueError, RecursionError) as e:  # invalid JSON or UTF-8, absurdly deep nesting
        raise ValueError(f"{path}: not JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: a config file holds a JSON object")
    # the architecture the suite would build, validated as a DeepSeek-V2 config.json before transformers builds it
    # (types, ranges, sizes: a zero head count or 10^5 layers is refused here, naming the file and field)
    arch = mla_config(size, cfg)
    try:
        model = read_config({**arch, "model_type": "deepseek_v2"}, where=path)
    except ConfigError as e:
        raise ConfigError(f"{e} (in the architecture --config gives the mla-moe-decode suite)") from None
    if model.language.moe is None or model.language.attention != "mla":  # what transformers' side then builds
        raise ConfigError(f"{path}: the mla-moe-decode suite runs an MLA + MoE model: n_routed_experts must be at least 1 "
                          f"and kv_lora_rank set (got {arch.get('n_routed_experts')!r}, {arch.get('kv_lora_rank')!r})")
    return cfg


# suites with their own measurement and table: engine throughput, HTTP serving
OWN_SUITES = ("engine", "serve", "quant")


def _own_suite(name: str, args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    if name == "engine":
        from . import bench_engine as mod
    elif name == "quant":
        from . import bench_quant as mod
    else:
        from . import bench_serve as mod
    result = mod.run(args.size, args.device, args.dtype, args.repeat)
    print(mod.format_table(result))
    print()
    return result


def main(args) -> int:
    """`mmstack bench`: 0 when every suite ran, 1 when a correctness gate failed."""
    own = [n for n in args.suites if n in OWN_SUITES]
    rest = [n for n in args.suites if n not in OWN_SUITES]
    own_results = []
    try:
        for name in own:
            own_results.append(_own_suite(name, args))
    except RuntimeError as e:  # an output gate of the engine / serve suites
        print(f"mmstack bench: correctness gate failed: {e}")
        return 1
    if not rest:
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump({"results": own_results}, f, indent=2)
        return 0
    try:
        results = run_suites(rest, args.size, args.device, args.dtype, args.against, args.repeat,
                             args.warmup, args.threads, args.config, args.prompts, args.new_tokens)
    except GateError as e:
        print(f"mmstack bench: correctness gate failed, nothing timed: {e}")
        return 1
    for r in results:
        print(format_table(r))
        print()
    env = results[0]["env"] if results else {}
    print(f"machine: {env.get('cpu')}{', ' + env['gpu'] if 'gpu' in env else ''}; torch {env.get('torch')}, "
          f"transformers {env.get('transformers')}, {env.get('torch_threads')} threads; {env.get('date')}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"results": own_results + results}, f, indent=2)
    return 0

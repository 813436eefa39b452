"""`mmstack bench quant`: weight-only int8 / int4 (`mmstack.load(quantize=...)`) against the unquantized model,
in one process, interleaved rounds, medians with the spread (min..max).

Workloads:
    lm      DeepSeek-V2-style MLA + MoE language models (random weights): greedy decode after a prompt.
            Per scheme: language-model weight bytes, prefill seconds, decode ms/token, first-token logits
            against the unquantized model (relative error, cosine) and how many greedy tokens agree. Sizes:
            `smoke`; `cpu` runs a small model (dispatch-bound) and a wider one (weight-bandwidth-bound);
            `full` is DeepSeek-V2-Lite, the language model of DeepSeek-VL2-small. CUDA adds peak memory.
    demo    the embedded trained model: held-out scores per task (`mmstack eval-demo --quick`'s slice) for
            each scheme: what quantization does to answers of a trained model, not a random one.

Random weights give nearly tied logits, so greedy agreement on `lm` understates what trained models keep
(compare `demo`).
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

SCHEMES = (None, "int8", "int4")
WIDE = dict(vocab_size=8192, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=704, num_hidden_layers=4,
            num_attention_heads=8, n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, kv_lora_rank=256,
            qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, prompt=128, new=24)
CONFIGS = {"smoke": ("smoke",), "cpu": ("cpu", "wide"), "full": ("full",)}
DEMO_PER_TASK = {"smoke": 1, "cpu": 12, "full": 12}


def _models(name: str, device, dtype) -> tuple[dict, int, int]:
    """scheme -> language model (the same random weights each time), prompt and answer lengths."""
    from mmstack.quantize import quantize_model

    from .bench_engine import _lm_pipeline

    out = {}
    for scheme in SCHEMES:
        pipe, prompt, new = _lm_pipeline(name, device, dtype, WIDE if name == "wide" else None)
        if scheme:
            quantize_model(pipe.model, scheme, device=device)
        out[scheme] = pipe.model.language
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out, prompt, new


def _decode(lm, ids, new: int, device) -> tuple[list, float, float, int]:
    from mmstack.decoding import SamplingParams, generate_ids

    from .bench_measure import sync

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0, times, toks = time.perf_counter(), [], []
    for tok in generate_ids(lm, SamplingParams(max_new_tokens=new), input_ids=ids):
        sync(device)
        times.append(time.perf_counter())
        toks.append(int(tok.flatten()[0]))
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return toks, times[0] - t0, (times[-1] - times[0]) / max(len(times) - 1, 1) * 1000, peak


def _lm_rows(name: str, device, dtype, repeat: int) -> list[dict]:
    from mmstack.llm.step import TUNE_AFTER_USES
    from mmstack.quantize import weight_bytes

    models, prompt, new = _models(name, device, dtype)
    vocab = models[None].cfg.vocab_size
    ids = torch.randint(3, vocab, (1, prompt), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        first = {s: lm.logits(lm(input_ids=ids)[:, -1]).float() for s, lm in models.items()}
        toks = {s: _decode(lm, ids, new, device)[0] for s, lm in models.items()}
        for _ in range(TUNE_AFTER_USES):  # warm-up: lets the CPU decode step settle on eager or compiled
            for lm in models.values():
                _decode(lm, ids, new, device)
        runs = {s: [] for s in models}
        for _ in range(repeat):
            for s, lm in models.items():  # interleaved
                runs[s].append(_decode(lm, ids, new, device)[1:])
    rows, med = [], statistics.median
    for s, lm in models.items():
        pre, dec, peak = [r[0] for r in runs[s]], [r[1] for r in runs[s]], max(r[2] for r in runs[s])
        ref = first[None]
        rows.append({
            "workload": f"lm {name}", "scheme": s or models[None].dtype.__repr__().replace("torch.", ""),
            "weight_mb": weight_bytes(lm) / 2**20, "prefill_s": med(pre), "decode_ms": med(dec),
            "decode_spread": [min(dec), max(dec)], "peak_mb": peak / 2**20 if peak else None,
            "logits_rel_err": ((first[s] - ref).norm() / ref.norm()).item(),
            "logits_cos": torch.nn.functional.cosine_similarity(first[s], ref, -1).min().item(),
            "greedy_agree": f"{sum(a == b for a, b in zip(toks[s], toks[None]))}/{len(toks[None])}",
            "prompt": prompt, "new": new})
    base = rows[0]
    for r in rows:
        r["decode_speedup"] = base["decode_ms"] / r["decode_ms"]
        r["memory_ratio"] = r["weight_mb"] / base["weight_mb"]
    return rows


def _demo_rows(size: str, device, dtype) -> list[dict]:
    import json

    import mmstack
    import mmstack.assets
    from mmstack.api import default_model_dir
    from mmstack.quantize import weight_bytes

    from . import synth
    from .eval_demo import evaluate

    recipe = json.loads((mmstack.assets.ROOT / "demo-recipe.json").read_text())
    rows = []
    with tempfile.TemporaryDirectory(prefix="mmstack-bench-") as d:
        synth.generate(d, **{**recipe["synth"]["heldout"], "overwrite": True, "progress": False})
        for s in SCHEMES:
            pipe = mmstack.load(default_model_dir(), device=device, dtype=dtype, quantize=s)
            t0 = time.perf_counter()
            got = evaluate(pipe, Path(d), DEMO_PER_TASK[size])
            rows.append({"workload": "demo (embedded model)", "scheme": s or str(dtype).replace("torch.", ""),
                         "weight_mb": weight_bytes(pipe.model.language) / 2**20, "scores": got["scores"],
                         "eval_s": time.perf_counter() - t0})
    return rows


def run(size: str = "cpu", device=None, dtype=None, repeat: int = 5, workloads=("lm", "demo")) -> dict:
    from mmstack.loading import default_device, default_dtype, resolve_dtype

    from .bench_measure import environment

    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype) or default_dtype(device)
    rows = []
    if "lm" in workloads:
        for name in CONFIGS[size]:
            rows += _lm_rows(name, device, dtype, repeat)
    if "demo" in workloads:
        rows += _demo_rows(size, device, dtype)
    return {"suite": "quant", "size": size, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "repeat": repeat, "env": environment(device, torch.get_num_threads()), "rows": rows}


def format_table(result: dict) -> str:
    lines = [f"suite quant (size {result['size']}, {result['device']}, activations {result['dtype']}, median of "
             f"{result['repeat']} interleaved rounds; spread min..max; ratios against the unquantized model)",
             f"{'workload':<14}{'weights':>9}{'LM MB':>9}{'x mem':>7}{'prefill s':>11}{'decode ms/tok':>22}"
             f"{'x speed':>9}{'logits rel':>12}{'min cos':>9}{'greedy':>8}{'peak MB':>9}"]
    for r in result["rows"]:
        if "scores" in r:
            continue
        dec = f"{r['decode_ms']:.2f} ({r['decode_spread'][0]:.2f}..{r['decode_spread'][1]:.2f})"
        peak = f"{r['peak_mb']:.0f}" if r.get("peak_mb") else "-"
        lines.append(f"{r['workload']:<14}{r['scheme']:>9}{r['weight_mb']:>9.1f}{r['memory_ratio']:>7.2f}"
                     f"{r['prefill_s']:>11.3f}{dec:>22}{r['decode_speedup']:>8.2f}x{r['logits_rel_err']:>12.3f}"
                     f"{r['logits_cos']:>9.4f}{r['greedy_agree']:>8}{peak:>9}")
    demo = [r for r in result["rows"] if "scores" in r]
    if demo:
        tasks = list(demo[0]["scores"])
        lines.append("")
        lines.append(f"{'embedded model':<16}{'LM MB':>8}" + "".join(f"{t:>11}" for t in tasks) + f"{'eval s':>9}")
        for r in demo:
            lines.append(f"{r['scheme']:<16}{r['weight_mb']:>8.1f}"
                         + "".join(f"{r['scores'].get(t, 0.0):>11.3f}" for t in tasks) + f"{r['eval_s']:>9.1f}")
    return "\n".join(lines)

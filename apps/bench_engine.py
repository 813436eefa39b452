"""`mmstack bench engine`: throughput of the continuous-batching engine against the same requests run one
after another, in one process, interleaved, medians of `repeat` rounds with the spread (min..max).

Workloads (each a list of identical-shaped requests, outputs checked equal before anything is timed):
    lm      a DeepSeek-V2-style MLA + MoE language model (random weights; `cpu` size, or DeepSeek-V2-Lite at
            `full`): prompts of 128 tokens (512 at full), 32 new tokens each (64 at full), no early stop
    chat    the embedded demo model: an in-domain image + question per request (vision encode, splice, decode)
    vq      the embedded demo model: one seeded image per request (its VQ codes)
    ocr     `mmstack ocr` on in-domain images through the job runner (`--batch-size c` vs 1)

"one at a time" runs each request alone through the same engine (a batch of one), so the ratio is what
batching adds. Requests/s of the baseline do not depend on how many requests it runs, so it runs `base_n`
of them (at most 8) and the concurrent side runs `c` at concurrency c.
"""
from __future__ import annotations

import concurrent.futures as cf
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

CONCURRENCY = {"smoke": (2, 4), "cpu": (4, 16), "full": (4, 16, 32)}
LM = {
    "smoke": dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=16, num_hidden_layers=2,
                  num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                  kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, prompt=16, new=8),
    "cpu": dict(vocab_size=2048, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                num_hidden_layers=4, num_attention_heads=8, n_routed_experts=64, num_experts_per_tok=6,
                n_shared_experts=2, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                prompt=128, new=32),
    # DeepSeek-V2-Lite, the language model of DeepSeek-VL2-small (random weights)
    "full": dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                 num_hidden_layers=27, num_attention_heads=16, n_routed_experts=64, num_experts_per_tok=6,
                 n_shared_experts=2, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                 prompt=512, new=64),
}


def _lm_pipeline(size: str, device, dtype, config: Optional[dict] = None):
    """A random DeepSeek-V2-style model of LM[size] (or `config`, the same keys), its prompt and answer lengths."""
    from mmstack.formats import read_config
    from mmstack.model import build_model
    from mmstack.pipeline import Pipeline
    from mmstack.testing import randomise_weights

    c = dict(config or LM[size])
    prompt, new = c.pop("prompt"), c.pop("new")
    raw = dict(model_type="deepseek_v2", first_k_dense_replace=1, q_lora_rank=None, topk_method="greedy",
               max_position_embeddings=4096, num_key_value_heads=c["num_attention_heads"], **c)
    torch.manual_seed(0)
    model = build_model(read_config(raw), device=device, dtype=dtype)
    randomise_weights(model, min(0.08, c["hidden_size"] ** -0.5))
    model.language.fuse_projections()
    return Pipeline(model.eval(), None, source=f"random DeepSeek-V2 ({size})"), prompt, new


def _workloads(size: str, device, dtype) -> dict[str, tuple]:
    """name -> (pipeline, make(k) -> a zero-argument call that runs request k and returns its output)."""
    import mmstack
    from mmstack.api import default_model_dir
    from mmstack.apps import synth

    from mmstack.engine import EngineConfig

    top = max(CONCURRENCY[size])
    out = {}
    lm, prompt, new = _lm_pipeline(size, device, dtype)
    lm.engine_config = EngineConfig(max_rows=top, max_waiting=4 * top)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, lm.cfg.language.vocab_size, (prompt,), generator=g).tolist() for _ in range(64)]
    out["lm"] = (lm, lambda k: lambda: lm.complete_ids(prompts[k % 64], max_new_tokens=new)[0], new)
    demo = mmstack.load(default_model_dir(), device=device, dtype=dtype)
    demo.engine_config = EngineConfig(max_rows=2 * top, max_waiting=4 * top)  # an image request takes 2 rows
    data = Path(tempfile.mkdtemp(prefix="mmstack-bench-"))
    synth.generate(data, 64, seed=11, kinds=("ocr",), image_size=64, progress=False)
    images = sorted((data / "images").glob("*.png"))
    out["chat"] = (demo, lambda k: lambda: demo.describe(images[k % 64], "Read the text in the image.",
                                                         max_new_tokens=32), None)
    out["vq"] = (demo, lambda k: lambda: demo.generate("a red circle", n=1, seed=k)[0].tobytes(), None)
    out["_images"] = images
    return out


def _concurrent(calls: list[Callable]) -> tuple[list, float]:
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(len(calls)) as ex:
        outs = list(ex.map(lambda f: f(), calls))
    return outs, time.perf_counter() - t0


def _sequential(calls: list[Callable]) -> tuple[list, float]:
    t0 = time.perf_counter()
    outs = [f() for f in calls]
    return outs, time.perf_counter() - t0


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def run(size: str = "cpu", device=None, dtype=None, repeat: int = 5, workloads=("lm", "chat", "vq", "ocr")) -> dict:
    """The engine suite's JSON record: per workload and concurrency, requests/s and tokens/s of both sides
    (medians and spread over `repeat` interleaved rounds) and the ratio."""
    from mmstack.loading import default_device, default_dtype, resolve_dtype

    from .bench_measure import environment, sync

    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype) or default_dtype(device)
    work = _workloads(size, device, dtype)
    rows = []
    for name in [w for w in workloads if w != "ocr"]:
        pipe, make, new = work[name]
        for c in CONCURRENCY[size]:
            calls = [make(k) for k in range(c)]
            base = calls[: min(c, 4 if size == "full" else 8)]
            ref = [f() for f in base]  # the gate: concurrent outputs equal one-at-a-time ones
            got, _ = _concurrent(calls)
            same = sum(_same(a, b) for a, b in zip(got, ref))
            if dtype == torch.float32 and same < len(ref):
                raise RuntimeError(f"engine bench {name} c={c}: batched outputs differ from one-at-a-time ones")
            seq, con = [], []
            for _ in range(repeat):
                sync(device)
                seq.append(len(base) / _sequential(base)[1])
                sync(device)
                con.append(c / _concurrent(calls)[1])
            tokens = new if new else None
            rows.append(_row(name, c, seq, con, tokens))
            # below fp32, a batch's matmuls round differently: greedy outputs may drift apart late (reported)
            rows[-1]["identical_outputs"] = f"{same}/{len(ref)}"
    if "ocr" in workloads:
        rows += _ocr_rows(work, size, repeat)
    return {"suite": "engine", "size": size, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "repeat": repeat, "env": environment(device, torch.get_num_threads()), "rows": rows}


def _row(name: str, c: int, seq: list, con: list, tokens) -> dict:
    med = statistics.median
    r = {"workload": name, "concurrency": c, "one_at_a_time_req_s": med(seq), "engine_req_s": med(con),
         "one_at_a_time_spread": [min(seq), max(seq)], "engine_spread": [min(con), max(con)],
         "speedup": med(con) / med(seq)}
    if tokens:
        r["one_at_a_time_tok_s"], r["engine_tok_s"] = med(seq) * tokens, med(con) * tokens
    return r


def _ocr_rows(work, size: str, repeat: int) -> list:
    from . import ocr

    pipe = work["chat"][0]
    images = work["_images"][:48]
    describe = lambda im, prompt: pipe.describe(im, prompt, max_new_tokens=32)  # noqa: E731
    rows = []
    for c in CONCURRENCY[size][-1:]:
        seq, con = [], []
        for k in range(repeat):
            with tempfile.TemporaryDirectory() as d:
                s1 = ocr.ocr(images, Path(d) / "a.jsonl", describe, prompt="Read the text in the image.",
                             progress=False, batch_size=1)
                s2 = ocr.ocr(images, Path(d) / "b.jsonl", describe, prompt="Read the text in the image.",
                             progress=False, batch_size=c)
                if k == 0:
                    a = [l.split('"seconds"')[0] for l in (Path(d) / "a.jsonl").read_text().splitlines()]  # noqa: E741
                    b = [l.split('"seconds"')[0] for l in (Path(d) / "b.jsonl").read_text().splitlines()]  # noqa: E741
                    if a != b:
                        raise RuntimeError("ocr job: --batch-size lines differ from --batch-size 1 lines")
            seq.append(s1.items_per_s)
            con.append(s2.items_per_s)
        rows.append(_row(f"ocr job ({len(images)} images)", c, seq, con, None))
    return rows


def format_table(result: dict) -> str:
    lines = [f"suite engine (size {result['size']}, {result['device']}, {result['dtype']}, median of "
             f"{result['repeat']} interleaved rounds; spread min..max)",
             f"{'workload':<22}{'conc':>5}{'one-at-a-time req/s':>24}{'engine req/s':>22}{'tok/s (engine)':>16}"
             f"{'speed-up':>10}{'same out':>10}"]
    for r in result["rows"]:
        s1 = f"{r['one_at_a_time_req_s']:.2f} ({r['one_at_a_time_spread'][0]:.2f}..{r['one_at_a_time_spread'][1]:.2f})"
        s2 = f"{r['engine_req_s']:.2f} ({r['engine_spread'][0]:.2f}..{r['engine_spread'][1]:.2f})"
        tok = f"{r['engine_tok_s']:.0f}" if r.get("engine_tok_s") else "-"
        same = r.get("identical_outputs", "-")
        lines.append(f"{r['workload']:<22}{r['concurrency']:>5}{s1:>24}{s2:>22}{tok:>16}{r['speedup']:>9.2f}x"
                     f"{same:>10}")
    return "\n".join(lines)

"""The measuring half of `mmstack bench`: a `Case` of `Contender`s, the correctness gate, interleaved
synchronised timing, medians and ours/theirs ratios, and the plain-text table (the method is described in
`mmstack.apps.bench`).

    record = measure(case, torch.device("cpu"), repeat=5)   # raises GateError when the sides disagree
    print(format_table({"suite": "x", "size": "cpu", "device": "cpu", "dtype": "float32", "repeat": 5,
                        "cases": [record]}))
"""
from __future__ import annotations

import datetime
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

SIZES = ("smoke", "cpu", "full")
METRICS = ("prefill_tok_s", "decode_ms_per_token", "e2e_s", "peak_mem_bytes", "kv_bytes_per_token")


class GateError(RuntimeError):
    """The two sides disagree: nothing is timed."""


# ---------------------------------------------------------------------------------------------- cases


@dataclass
class Contender:
    """One implementation in a case.

    run: does the whole timed job; returns (output for the gate, phases) where phases may hold
        "prefill_s" and "decode_s" measured inside the run (synchronised).
    prefill: optional separate prompt-only job, timed `repeat` times, when the run cannot split phases.
    kv_bytes_per_token: bytes one token occupies in this side's KV cache (all layers, one row).
    """

    name: str
    run: Callable[[], tuple[Any, dict]]
    prefill: Optional[Callable[[], Any]] = None
    kv_bytes_per_token: Optional[int] = None


@dataclass
class Case:
    """One row group of a suite's table: ours against one or more baselines (the best one is the ratio's
    denominator), the work sizes that turn times into rates, and the gate comparing outputs."""

    name: str
    ours: Contender
    theirs: list[Contender]
    gate: Callable[[Any, Any], tuple[bool, str]]
    prefill_tokens: int = 0
    decode_tokens: int = 0
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), wall seconds) with the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def _median(xs: list) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _run_once(c: Contender, device: torch.device, rec: dict) -> Any:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    (out, phases), e2e = timed(device, c.run)
    rec["e2e_s"].append(e2e)
    rec["prefill_s"].append(phases.get("prefill_s"))
    rec["decode_s"].append(phases.get("decode_s"))
    for k, v in phases.items():
        rec["phases"].setdefault(k, []).append(v)
    if device.type == "cuda":
        rec["peak_mem_bytes"].append(torch.cuda.max_memory_allocated(device) - base)
    return out


def measure(case: Case, device: torch.device, repeat: int, warmup: int = 1) -> dict:
    """Gate, warm up, then time `repeat` interleaved runs per side.

    Returns:
        the case's JSON record: gate results, one row of medians per side, ours/theirs ratios, notes.
    Raises:
        GateError: a baseline's output disagrees with ours (raised before anything is timed).
    """
    sides = [case.ours] + case.theirs
    ours_out = case.ours.run()[0]
    gates = []
    for c in case.theirs:
        ok, detail = case.gate(ours_out, c.run()[0])
        gates.append({"against": c.name, "ok": ok, "detail": detail})
        if not ok:
            raise GateError(f"{case.name}: {case.ours.name} vs {c.name}: {detail}")
    for _ in range(max(warmup, 0)):
        for c in sides:
            c.run()
    recs = {c.name: {"e2e_s": [], "prefill_s": [], "decode_s": [], "peak_mem_bytes": [], "prefill_only_s": [],
                       "phases": {}}
            for c in sides}
    for _ in range(repeat):
        for c in sides:
            _run_once(c, device, recs[c.name])
            if c.prefill is not None:
                recs[c.name]["prefill_only_s"].append(timed(device, c.prefill)[1])
    rows = [_summary(c, recs[c.name], case) for c in sides]
    return {"case": case.name, "gate": gates, "rows": rows, "ratio": _ratios(rows), "notes": case.notes}


def _summary(c: Contender, rec: dict, case: Case) -> dict:
    e2e = _median(rec["e2e_s"])
    prefill = _median(rec["prefill_s"]) or _median(rec["prefill_only_s"])
    decode = _median(rec["decode_s"])
    if decode is None and case.decode_tokens and e2e is not None:
        decode = e2e - (prefill or 0.0)  # the run is prompt + decode steps
    return {
        "impl": c.name,
        "prefill_tok_s": case.prefill_tokens / prefill if prefill and case.prefill_tokens else None,
        "decode_ms_per_token": decode / case.decode_tokens * 1e3 if decode and case.decode_tokens else None,
        "e2e_s": e2e,
        "peak_mem_bytes": max(rec["peak_mem_bytes"]) if rec["peak_mem_bytes"] else None,
        "kv_bytes_per_token": c.kv_bytes_per_token,
        "phases_s": {k: _median(v) for k, v in rec["phases"].items()},
        "runs_e2e_s": rec["e2e_s"],
    }


def _ratios(rows: list[dict]) -> dict:
    """ours / best baseline for every metric (best = lowest end-to-end time), and the speed-ups."""
    if len(rows) < 2:
        return {}
    ours, best = rows[0], min(rows[1:], key=lambda r: r["e2e_s"] if r["e2e_s"] is not None else float("inf"))
    out = {"against": best["impl"]}
    for m in METRICS:
        a, b = ours[m], best[m]
        out[m] = a / b if a is not None and b else None
    out["speedup_e2e"] = 1 / out["e2e_s"] if out["e2e_s"] else None
    out["speedup_decode"] = 1 / out["decode_ms_per_token"] if out["decode_ms_per_token"] else None
    return out


# ---------------------------------------------------------------------------------------------- report


def environment(device: torch.device, threads: int) -> dict:
    """Machine, versions and date recorded with every result."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": cpu,
           "torch_threads": threads, "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def _fmt(v, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "bytes":
        return f"{v / 2**20:.1f}M" if v >= 2**20 else f"{v / 1024:.1f}K" if v >= 1024 else f"{v:.0f}"
    if kind == "ratio":
        return f"{v:.2f}"
    return f"{v:.4g}" if v < 1000 else f"{v:.0f}"


_COLUMNS = [("prefill tok/s", "prefill_tok_s", "num"), ("decode ms/tok", "decode_ms_per_token", "num"),
            ("e2e s", "e2e_s", "num"), ("peak mem", "peak_mem_bytes", "bytes"),
            ("KV B/token", "kv_bytes_per_token", "bytes")]


def format_table(result: dict) -> str:
    """One plain-text table per suite: a row per side and an `ours/theirs` row per case."""
    head = ["case", "impl"] + [c[0] for c in _COLUMNS]
    lines = [head]
    for case in result["cases"]:
        for r in case["rows"]:
            lines.append([case["case"], r["impl"]] + [_fmt(r[k], kind) for _, k, kind in _COLUMNS])
        if case["ratio"]:
            ra = case["ratio"]
            lines.append([case["case"], "ours/theirs"] + [_fmt(ra[k], "ratio") for _, k, _ in _COLUMNS])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    out = [f"suite {result['suite']} (size {result['size']}, {result['device']}, {result['dtype']}, "
           f"median of {result['repeat']})"]
    for i, row in enumerate(lines):
        out.append("  ".join(str(c).ljust(w) if j < 2 else str(c).rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    for case in result["cases"]:
        ra = case["ratio"]
        if ra:
            sp = ", ".join(f"{k.split('_')[1]} {ra[k]:.2f}x" for k in ("speedup_e2e", "speedup_decode") if ra.get(k))
            out.append(f"  {case['case']}: against {ra['against']}: speed-up {sp}")
        for note in case["notes"]:
            out.append(f"  note: {note}")
    return "\n".join(out)


def available_bytes(device: torch.device) -> Optional[int]:
    """Memory free for new tensors: the GPU's free memory, or the host's MemAvailable (None when unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_fits(what: str, host_bytes: int, device_bytes: int, device: torch.device) -> None:
    """Refuse, before anything is built, a benchmark whose models would not fit (ValueError with the sizes)."""
    checks = [("host memory", host_bytes + (device_bytes if device.type == "cpu" else 0), torch.device("cpu"))]
    if device.type != "cpu":
        checks.append((f"{device} memory", device_bytes, device))
    for name, need, dev in checks:
        free = available_bytes(dev)
        if free is not None and need > 0.9 * free:
            raise ValueError(f"{what} needs about {need / 2**30:.1f} GiB of {name}, {free / 2**30:.1f} GiB is "
                             "available: choose a smaller config")

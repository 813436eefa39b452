"""`mmstack bench serve`: `mmstack serve` measured through HTTP with streaming chat requests at several
concurrencies: requests/s, time to first token (median and p95) and output tokens/s, for the embedded demo
model (in-domain image + question per request). The server runs in this process (uvicorn on an ephemeral
loopback port); clients are threads speaking the OpenAI streaming API over httpx.
"""
from __future__ import annotations

import base64
import concurrent.futures as cf
import json
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

CONCURRENCY = {"smoke": (1, 4), "cpu": (1, 4, 16), "full": (1, 4, 16, 64)}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(device, dtype, port: int, max_batch: int):
    import argparse

    import uvicorn

    from .serve import add_arguments, build, load_pipeline

    parser = argparse.ArgumentParser()
    add_arguments(parser)  # the real flags and their defaults
    args = parser.parse_args(["--served-model-name", "bench", "--port", str(port), "--device", str(device),
                              "--dtype", str(dtype).replace("torch.", ""), "--max-batch", str(max_batch),
                              "--max-waiting", str(4 * max_batch)])
    asgi, state = build(args)
    state.pipe = load_pipeline(args)
    server = uvicorn.Server(uvicorn.Config(asgi, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    return server, state


def _one(client, url: str, image_uri: str, max_tokens: int) -> tuple[float, float, int]:
    """(time to first token, total seconds, output tokens) of one streamed request."""
    body = {"model": "bench", "stream": True, "max_tokens": max_tokens, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_uri}},
                                                      {"type": "text", "text": "Read the text in the image."}]}]}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    with client.stream("POST", url, json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft or (time.perf_counter() - t0), time.perf_counter() - t0, tokens


def run(size: str = "cpu", device=None, dtype=None, repeat: int = 5) -> dict:
    import httpx

    from mmstack.apps import synth
    from mmstack.loading import default_device, default_dtype, resolve_dtype

    from .bench_measure import environment

    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype) or default_dtype(device)
    data = Path(tempfile.mkdtemp(prefix="mmstack-bench-"))
    synth.generate(data, 64, seed=12, kinds=("ocr",), image_size=64, progress=False)
    uris = ["data:image/png;base64," + base64.b64encode(p.read_bytes()).decode()
            for p in sorted((data / "images").glob("*.png"))]
    port = _port()
    server, state = _start(device, dtype, port, max(CONCURRENCY[size]))
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    rows = []
    try:
        with httpx.Client(limits=httpx.Limits(max_connections=256)) as client:
            _one(client, url, uris[0], 8)  # warm-up
            for c in CONCURRENCY[size]:
                rps, ttfts, tps = [], [], []
                for _ in range(max(1, repeat)):
                    t0 = time.perf_counter()
                    with cf.ThreadPoolExecutor(c) as ex:
                        res = list(ex.map(lambda k: _one(client, url, uris[k % len(uris)], 32), range(c)))
                    wall = time.perf_counter() - t0
                    rps.append(c / wall)
                    tps.append(sum(r[2] for r in res) / wall)
                    ttfts += [r[0] for r in res]
                q = sorted(ttfts)
                rows.append({"concurrency": c, "req_s": statistics.median(rps), "req_s_spread": [min(rps), max(rps)],
                             "tok_s": statistics.median(tps), "ttft_p50_s": statistics.median(q),
                             "ttft_p95_s": q[min(len(q) - 1, int(0.95 * len(q)))]})
    finally:
        server.should_exit = True
        state.pipe.engine.close()
    return {"suite": "serve", "size": size, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "repeat": repeat, "env": environment(device, torch.get_num_threads()), "rows": rows}


def format_table(result: dict) -> str:
    lines = [f"suite serve (embedded model through HTTP, streaming; {result['device']}, {result['dtype']}, median of "
             f"{result['repeat']} rounds)", f"{'conc':>5}{'req/s (spread)':>24}{'tok/s':>10}{'TTFT p50':>11}{'TTFT p95':>11}"]
    for r in result["rows"]:
        s = f"{r['req_s']:.2f} ({r['req_s_spread'][0]:.2f}..{r['req_s_spread'][1]:.2f})"
        lines.append(f"{r['concurrency']:>5}{s:>24}{r['tok_s']:>10.0f}{r['ttft_p50_s']:>10.3f}s{r['ttft_p95_s']:>10.3f}s")
    return "\n".join(lines)

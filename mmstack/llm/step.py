"""One cached decode step (one token per row), run eagerly, captured in a CUDA graph or compiled.

Small models decode at the speed of Python and kernel launches, not of the GPU (Janus-Pro-1B: ~24 layers
x ~15 kernels per token). The graph modes run the step on the static cache (`KVCache.enter_static`:
fixed shapes, device-side write index, no host sync) and replay it: one launch per token. Any failure to
capture or compile falls back to eager with a warning, so a step always runs.

    step = DecodeStep(lm, cache)            # "auto": CUDA graph on CUDA; on CPUs eager or compiled, measured
    h = step(input_ids=tok[:, None])        # [B, H] last hidden state; the cache grew by one token
"""
from __future__ import annotations

import logging
import statistics
import time
from typing import Optional

import torch

log = logging.getLogger(__name__)

MODES = ("auto", "eager", "static", "cuda_graph", "compile")
# CPU "auto": a (batch, input kind, dtype, cache capacity) seen for the TUNE_AFTER_USES-th time is measured:
# TUNE_STEPS eager steps against TUNE_STEPS compiled ones; the faster is kept for that key on that model.
# Earlier generations stay eager, so a one-off answer never waits for a compile (~6 s for a 4-layer model).
TUNE_AFTER_USES = 3
TUNE_STEPS = 8


def prefer_compiled(eager_s: list, compiled_s: list) -> bool:
    """The CPU "auto" choice from step times in seconds: compiled when its median is lower."""
    return statistics.median(compiled_s) < statistics.median(eager_s)


class DecodeStep:
    """Args:
        lm: the `LanguageModel`.
        cache: its `KVCache`, already holding the prompt (dynamic prefill).
        mode: "eager" (dynamic cache, attention over the filled prefix), "static" (static cache, eager:
            the graph modes' computation without capture, for tests), "cuda_graph" (static cache, the step
            captured once with `torch.cuda.CUDAGraph` and replayed), "compile" (static cache,
            `torch.compile(fullgraph=True)`; "reduce-overhead" on CUDA), "auto" ("cuda_graph" on CUDA
            once `capture_after` eager steps have run, so short generations never pay for a capture;
            "eager" elsewhere, where a shape this model decodes again and again is measured eager against
            compiled once (TUNE_AFTER_USES) and the faster kept for it).
        compile_backend: torch.compile backend for mode "compile" (default inductor).
    """

    def __init__(self, lm, cache, mode: str = "auto", compile_backend: Optional[str] = None, capture_after: int = 8):
        if mode not in MODES:
            raise ValueError(f"decode mode must be one of {MODES}, got {mode!r}")
        self._eager_left = 0
        self._tuning: Optional[dict] = None  # CPU "auto": this generation's entry in the model's choices
        if mode == "auto":
            mode = "cuda_graph" if lm.device.type == "cuda" else "eager"
            self._eager_left = capture_after if mode == "cuda_graph" else 0
            self._auto_cpu = mode == "eager"
        else:
            self._auto_cpu = False
        if mode == "cuda_graph" and lm.device.type != "cuda":
            log.warning("decode mode 'cuda_graph' needs a CUDA device (model on %s); running eagerly", lm.device)
            mode = "eager"
        self.lm, self.cache, self.mode = lm, cache, mode
        self.compile_backend = compile_backend
        self._key: Optional[tuple] = None  # (input kind, shape, dtype) the runner was built for
        self._runner = None
        self._static_in: Optional[torch.Tensor] = None

    def __call__(self, input_ids: Optional[torch.Tensor] = None, inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run under no_grad / inference_mode (the generation loops are)."""
        kind, x = ("input_ids", input_ids) if input_ids is not None else ("inputs_embeds", inputs_embeds)
        if self._auto_cpu:
            return self._auto_step(kind, x)
        if self.mode == "eager" or self._eager_left > 0:
            self._eager_left = max(self._eager_left - 1, 0)
            return self.lm(**{kind: x}, cache=self.cache)[:, -1]
        return self._static_step(kind, x)

    def _static_step(self, kind: str, x: torch.Tensor) -> torch.Tensor:
        key = (kind, tuple(x.shape), x.dtype)
        if self._runner is None or key != self._key:
            with torch.no_grad():
                self._build(kind, x, key)
        if self.mode == "eager":  # the build fell back
            if self._tuning is not None:
                self._tuning["choice"] = "eager"
            return self.lm(**{kind: x}, cache=self.cache)[:, -1]
        if self.cache.length >= self.cache.capacity:
            from .cache import CacheFullError

            raise CacheFullError(f"KV cache holds {self.cache.capacity} tokens; all used")
        self._static_in.copy_(x)
        out = self._runner()
        self.cache.length += 1  # host bookkeeping; the device-side index advanced inside the step
        return out.clone()  # the runner's output buffer is reused by the next replay

    # ------------------------------------------------------------------------------------------ CPU auto
    def _auto_step(self, kind: str, x: torch.Tensor) -> torch.Tensor:
        """Eager or compiled, whichever this model measured faster for this key (see TUNE_AFTER_USES)."""
        if self._tuning is None:
            key = (kind, tuple(x.shape), x.dtype, self.cache.capacity)
            choices = self.lm.__dict__.setdefault("_decode_choices", {})
            self._tuning = choices.setdefault(key, {"uses": 0, "choice": None, "eager": [], "compiled": []})
            self._tuning["uses"] += 1
            if self._tuning["choice"] == "compile":
                self._switch("compile")
        t = self._tuning
        measuring = t["choice"] is None and t["uses"] >= TUNE_AFTER_USES
        if self.mode == "eager":
            if not measuring:
                return self.lm(**{kind: x}, cache=self.cache)[:, -1]
            t0 = time.perf_counter()
            out = self.lm(**{kind: x}, cache=self.cache)[:, -1]
            t["eager"].append(time.perf_counter() - t0)
            if len(t["eager"]) >= TUNE_STEPS:
                self._switch("compile")  # a compile that fails falls back to eager and records it
            return out
        t0 = time.perf_counter()
        out = self._static_step(kind, x)
        if measuring:
            t["compiled"].append(time.perf_counter() - t0)
            if len(t["compiled"]) > TUNE_STEPS:  # the first compiled step ran the compile
                fast = prefer_compiled(t["eager"], t["compiled"][1:])
                t["choice"] = "compile" if fast else "eager"
                log.info("decode step on %s, %s: eager %.2f ms, compiled %.2f ms: keeping %s", self.lm.device,
                         x.shape, 1e3 * statistics.median(t["eager"]), 1e3 * statistics.median(t["compiled"][1:]),
                         t["choice"])
                if not fast:
                    self.cache.leave_static()  # the host length and device positions agree after each step
                    self.mode, self._runner = "eager", None
        return out

    def _switch(self, mode: str) -> None:
        """From eager to a static mode, built at the next step."""
        self.mode, self._runner, self._key = mode, None, None

    # ------------------------------------------------------------------------------------------ building
    def _eager_static(self, kind: str):
        lm, cache, x = self.lm, self.cache, self._static_in
        return lambda: lm(**{kind: x}, cache=cache)[:, -1]

    def _snapshot(self):
        c = self.cache
        return c.pos.clone(), c.next_pos.clone(), c.key_valid.clone()

    def _restore(self, snap) -> None:
        c = self.cache
        c.pos.copy_(snap[0])
        c.next_pos.copy_(snap[1])
        c.key_valid.copy_(snap[2])

    def _build(self, kind: str, x: torch.Tensor, key: tuple) -> None:
        self.cache.enter_static()
        self._static_in = x.clone()
        self._key = key
        snap = self._snapshot()
        try:
            if self.mode == "static":
                self._runner = self._eager_static(kind)
            elif self.mode == "cuda_graph":
                self._runner = self._capture(kind, snap)
            else:
                self._runner = self._compile(kind, snap)
        except Exception as e:  # capture/compile problems must never stop generation
            log.warning("decode mode %r failed (%s: %s); running eagerly", self.mode, type(e).__name__, e)
            self._restore(snap)
            self.cache.leave_static()
            self.mode, self._runner = "eager", None

    def _capture(self, kind: str, snap):
        fn = self._eager_static(kind)
        stream = torch.cuda.Stream(device=self.lm.device)
        stream.wait_stream(torch.cuda.current_stream(self.lm.device))
        with torch.cuda.stream(stream):  # warm-up off the default stream, as graph capture requires
            for _ in range(2):
                fn()
                self._restore(snap)
        torch.cuda.current_stream(self.lm.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        self._restore(snap)  # capture records kernels; warm-ups wrote one slot that the real step rewrites

        def replay():
            graph.replay()
            return out

        self._graph = graph
        return replay

    def _compile(self, kind: str, snap):
        lm, cache, x = self.lm, self.cache, self._static_in
        for a, b in cache.layers:  # cache tensors are mutated in place: keep their addresses static
            torch._dynamo.mark_static_address(a)
            torch._dynamo.mark_static_address(b)
        for t in (cache.key_valid, cache.next_pos, cache.pos, x):
            torch._dynamo.mark_static_address(t)
        opts = dict(fullgraph=True, dynamic=False)
        if self.compile_backend is not None:
            opts["backend"] = self.compile_backend
        elif lm.device.type == "cuda":
            opts["mode"] = "reduce-overhead"
        fn = torch.compile(lambda: lm(**{kind: x}, cache=cache)[:, -1], **opts)
        fn()  # compile now, so a failure falls back before any real token is written
        self._restore(snap)
        return fn

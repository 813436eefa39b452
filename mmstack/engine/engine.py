"""The continuous-batching engine: one scheduler owns the model and its preallocated cache rows.

Each engine step, at a step boundary:
  1. finished and cancelled requests leave; their rows are freed and the running rows packed again
     (decoding rows first, then JanusFlow rows, then the prefill in flight);
  2. when no prefill is in flight, waiting requests that fit the free rows are admitted together: their
     prompts are embedded as one batch (vision encode and splice included, `MultimodalModel.embed`);
  3. one chunk (`prefill_chunk` tokens) of the prefill in flight runs, so a long prompt never stalls decodes;
  4. one decode step runs for every decoding row (text tokens and Janus VQ codes together), each request
     sampling with its own parameters and generator;
  5. one Euler step runs for every JanusFlow request.
Requests beyond the free rows wait in a bounded queue; a full queue answers `EngineBusy`.

Determinism: each request keeps its own generator, and rows never see each other's keys, so a greedy (or
seeded) request gives the same output alone or batched (tests/engine).

Notation: N rows, B rows in a step, T tokens, D LLM width.
"""
from __future__ import annotations

import atexit
import collections
import itertools
import logging
import os
import threading
import weakref
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import EngineBusy, GenerationError
from .prefill import PrefillBatch, build_prefill
from .requests import FlowImageRequest, Handle, RequestResult, TextRequest, VQImageRequest
from .slots import SlotCache
from .state import DECODE, FLOW, PREFILL, Active
from .graphs import StaticDecoder
from .steps import decode_step, finish_prefill, flow_step

log = logging.getLogger(__name__)

ORDER = {DECODE: 0, FLOW: 1, PREFILL: 2}  # how running rows are packed
_RUNNING: "weakref.WeakSet[Engine]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    # stop engine threads before the interpreter tears torch down under them
    for engine in list(_RUNNING):
        engine.close()


@dataclass
class EngineConfig:
    """Args:
        max_rows: sequences held at once (a text request takes 1 row, an n-image request 2n).
        max_seq_len: positions per row (default: the model context).
        max_waiting: requests queued beyond the running ones before `submit` answers `EngineBusy`.
        prefill_chunk: prompt tokens per prefill forward.
        max_prefill_tokens: prompt positions admitted into one prefill batch (rows x longest prompt).
        decode_mode: how a decode step runs; every mode gives the same tokens (tests/engine).
        max_cache_bytes: the preallocated cache (rows x positions x bytes per token) stays under this: rows
            hold fewer positions when the model's context would not fit (requests longer than that are refused
            at submit, naming the limit).
    """

    max_rows: int = 32
    max_seq_len: Optional[int] = None
    max_waiting: int = 64
    prefill_chunk: int = 512
    max_prefill_tokens: int = 16384
    decode_mode: str = "auto"  # "eager" | "static" | "cuda_graph" ("auto": CUDA graphs on CUDA, else eager)
    max_cache_bytes: Optional[int] = None  # default: a quarter of RAM (at most 4 GiB) on CPU, half the free GPU memory


class Engine:
    def __init__(self, model, config: Optional[EngineConfig] = None, pad_id: int = 0, background: bool = True):
        """background=False: no thread; the caller drives `step()` / `run_until_idle()` (tests, tools)."""
        self.model = model
        self.background = background
        self.config = cfg = config or EngineConfig()
        lm = model.language
        self.capacity = min(cfg.max_seq_len or lm.cfg.max_position_embeddings, lm.cfg.max_position_embeddings)
        per_row_token = lm.cfg.kv_values_per_token() * torch.empty(0, dtype=lm.dtype).element_size()
        budget = cfg.max_cache_bytes or _default_cache_budget(lm.device)
        fits = budget // max(cfg.max_rows * per_row_token, 1) - 1
        if fits < self.capacity:
            log.warning("engine: %d rows x %d positions would need %.1f GiB of KV cache; rows hold %d positions "
                        "(max_cache_bytes %.1f GiB)", cfg.max_rows, self.capacity,
                        cfg.max_rows * self.capacity * per_row_token / 2**30, max(fits, 0), budget / 2**30)
            self.capacity = max(int(fits), 1)
        self.pad_id = pad_id
        self.cache: Optional[SlotCache] = None  # allocated on first use
        self.occupant: list[Optional[tuple[Active, int]]] = [None] * cfg.max_rows
        self.active: list[Active] = []
        self.waiting: collections.deque = collections.deque()
        self.prefill: Optional[PrefillBatch] = None
        self._ids = itertools.count(1)
        self._cv = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self.steps = 0
        self._static = None

    # ------------------------------------------------------------------------------ callers
    def submit(self, request) -> Handle:
        """Queue a request; returns its `Handle` at once.

        Raises:
            GenerationError: a request that can never run here (more rows or positions than the engine has).
            EngineBusy: the waiting queue is full.
        """
        if request.rows > self.config.max_rows:
            raise GenerationError(f"the request needs {request.rows} cache rows; the engine has "
                                  f"max_rows={self.config.max_rows}")
        if request.positions_needed > self.capacity:
            raise GenerationError(f"the request needs {request.positions_needed} positions; the engine's rows hold "
                                  f"{self.capacity} (max_seq_len / the model context)")
        handle = Handle(request, next(self._ids))
        with self._cv:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if len(self.waiting) >= self.config.max_waiting:
                raise EngineBusy(f"busy: {len(self.waiting)} requests are waiting (max_waiting="
                                 f"{self.config.max_waiting}); try again later")
            self.waiting.append(handle)
            if self.background:
                self._ensure_thread()
            self._cv.notify()
        return handle

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def load(self) -> dict:
        """Running / waiting counts and rows in use (for health checks and tests)."""
        return {"running": len(self.active), "waiting": len(self.waiting),
                "rows_used": sum(o is not None for o in self.occupant), "rows": self.config.max_rows}

    # ------------------------------------------------------------------------------ the loop
    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="mmstack-engine", daemon=True)
            self._thread.start()
            _RUNNING.add(self)

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._closed and not self.waiting and not self.active:
                        self._cv.wait()
                    if self._closed:
                        self._fail_all(RuntimeError("the engine was closed"))
                        return
                try:
                    self.step()
                except Exception as e:  # a broken step must not hang the callers: fail what is in flight
                    log.exception("engine step failed")
                    self._fail_all(e)

    def run_until_idle(self) -> None:
        """Run steps in the calling thread until nothing is left (an engine made with background=False)."""
        if self.background:
            raise RuntimeError("this engine steps in its own thread; wait on the handles instead")
        with torch.inference_mode():
            while self.waiting or self.active:
                self.step()

    def step(self) -> None:
        self.steps += 1
        self._reap()
        if self.prefill is None:
            self._admit()
        if self.prefill is not None:
            self._prefill_chunk()
            self._reap()  # requests that ended on their first token leave before the decode step
        decoding = [a for a in self.active if a.phase == DECODE and not a.done]
        if decoding:
            decode_step(self.model, self.cache, decoding, self._region(DECODE), self._static_decoder())
        flowing = [a for a in self.active if a.phase == FLOW and not a.done]
        if flowing:
            flow_step(self.model, self.cache, flowing, self._region(FLOW))
        self._reap()

    def _static_decoder(self):
        mode = self.config.decode_mode
        if mode == "auto":
            mode = "cuda_graph" if self.model.device.type == "cuda" else "eager"
        if mode == "eager":
            return None
        if self._static is None:
            if mode == "cuda_graph" and self.model.device.type != "cuda":
                log.warning("decode_mode 'cuda_graph' needs a CUDA device; decoding eagerly")
                self.config.decode_mode = "eager"
                return None
            self._static = StaticDecoder(self.model, self.cache, mode)
        return self._static

    # ------------------------------------------------------------------------------ admission
    def _free_rows(self) -> int:
        return sum(o is None for o in self.occupant)

    def _admit(self) -> None:
        admitted: list[Active] = []
        free, tokens = self._free_rows(), 0
        vocab = self.model.cfg.language.vocab_size
        with self._cv:
            while self.waiting:
                h = self.waiting[0]
                if h.cancelled:
                    self.waiting.popleft()
                    h._finish(RequestResult(finish_reason="cancelled"))
                    continue
                req = h.request
                cost = req.rows * req.prompt_len
                if req.rows > free or (admitted and tokens + cost > self.config.max_prefill_tokens):
                    break  # first come, first served: later requests wait behind this one
                self.waiting.popleft()
                free -= req.rows
                tokens += cost
                admitted.append(Active(h, self.model.device, vocab))
        if not admitted:
            return
        if self.cache is None:
            lm = self.model.language
            self.cache = SlotCache(lm.cfg, self.config.max_rows, self.capacity, device=lm.device, dtype=lm.dtype)
        row = sum(o is not None for o in self.occupant)  # rows are packed and no prefill is in flight
        start = row
        for a in admitted:
            for k in range(a.req.rows):
                a.rows.append(row)
                self.occupant[row] = (a, k)
                self.cache.reset(row)
                row += 1
        self.active.extend(admitted)
        for a in admitted:
            if isinstance(a.req, TextRequest) and a.req.params.max_new_tokens == 0:
                a.finish_reason = "length"  # nothing to generate; it still takes part in the prefill batch
        try:
            self.prefill = build_prefill(self.model, admitted, start)
        except Exception as e:  # e.g. an image the model cannot embed: fail these requests only
            for a in admitted:
                a.finish_reason = "error"
                a.handle._finish(error=e)
            self._release(admitted)
            self._pack()

    def _prefill_chunk(self) -> None:
        p = self.prefill
        done = p.run_chunk(self.model, self.cache, self.config.prefill_chunk)
        if done:
            self.prefill = None
            finish_prefill(self.model, self.cache, p)

    # ------------------------------------------------------------------------------ leaving, packing
    def _reap(self) -> None:
        leaving = []
        for a in self.active:
            if a.handle.cancelled and not a.done:
                a.finish_reason = "cancelled"
            if a.done and a.phase != PREFILL:  # a request in the prefill in flight leaves when it completes
                leaving.append(a)
        if not leaving:
            return
        for a in leaving:
            if not a.handle.finished:
                a.handle._finish(a.result())
        self._release(leaving)
        self._pack()

    def _release(self, leaving: list) -> None:
        gone = set(map(id, leaving))
        for row, occ in enumerate(self.occupant):
            if occ is not None and id(occ[0]) in gone:
                self.occupant[row] = None
                if self.cache is not None:
                    self.cache.reset(row)
        self.active = [a for a in self.active if id(a) not in gone]

    def _pack(self) -> None:
        """Move rows so that occupied rows are [0, n) in the order decode | flow | prefill."""
        occupied = [(ORDER[occ[0].phase], row) for row, occ in enumerate(self.occupant) if occ is not None]
        target = {row: i for i, (_, row) in enumerate(sorted(occupied))}
        if all(row == i for row, i in target.items()):
            return
        spare = None
        pending = {src: dst for src, dst in target.items() if src != dst}
        while pending:
            src, dst = next(iter(pending.items()))
            if self.occupant[dst] is None:  # destination free: plain move
                self._move(src, dst)
                del pending[src]
                continue
            # the destination holds a row that moves too: park it in a free row first
            spare = next(r for r in range(len(self.occupant) - 1, -1, -1)
                         if self.occupant[r] is None and r not in pending.values())
            blocker_dst = pending.pop(dst)
            self._move(dst, spare)
            pending[spare] = blocker_dst
        if self.prefill is not None:
            self.prefill.start = self._region(PREFILL)[0]

    def _move(self, src: int, dst: int) -> None:
        a, k = self.occupant[src]
        self.cache.move(src, dst)
        self.occupant[dst], self.occupant[src] = (a, k), None
        a.rows[k] = dst

    def _region(self, phase: str) -> tuple[int, int]:
        rows = [r for r, occ in enumerate(self.occupant) if occ is not None and occ[0].phase == phase]
        if not rows:
            return (0, 0)
        lo, hi = min(rows), max(rows) + 1
        assert hi - lo == len(rows), f"{phase} rows are not contiguous"
        return lo, hi

    def _fail_all(self, error: BaseException) -> None:
        with self._cv:
            waiting = list(self.waiting)
            self.waiting.clear()
        for a in self.active:
            if not a.handle.finished:
                a.handle._finish(error=error)
        for h in waiting:
            h._finish(error=error)
        self.active = []
        self.occupant = [None] * self.config.max_rows
        self.prefill = None
        if self.cache is not None:
            for r in range(self.config.max_rows):
                self.cache.reset(r)


def _default_cache_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 16 << 30
    return min(4 << 30, ram // 4)


__all__ = ["Engine", "EngineConfig", "EngineBusy", "TextRequest", "VQImageRequest", "FlowImageRequest"]

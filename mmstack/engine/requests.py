"""What callers submit to the engine, and the handle they read results from.

Three kinds of request share the engine's rows and steps:
- `TextRequest`: a prompt (token ids, or a `MultimodalBatch` of one sample whose images the engine encodes
  in its batched prefill) decoded token by token with its own sampling parameters and generator;
- `VQImageRequest`: Janus image tokens, one conditional and one unconditional row per image (CFG);
- `FlowImageRequest`: JanusFlow rectified flow, the same two rows per image, one Euler step per engine step.

A `Handle` streams the request's events, can cancel it, and waits for its result:

    h = engine.submit(TextRequest(prompt_ids=[...], params=SamplingParams(max_new_tokens=32)))
    for ev in h: print(ev.text, end="")          # events: new tokens / text deltas, then the end
    h.result()                                    # RequestResult(token_ids, text, finish_reason, ...)
"""
from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..batch import MultimodalBatch
from ..decoding import SamplingParams


@dataclass
class TextRequest:
    """Args:
        prompt_ids: the prompt's token ids (text prompts), or
        batch: one sample's `MultimodalBatch` (unpadded; images are embedded in the engine's prefill).
        params: sampling parameters (stop ids include the tokenizer's EOS already).
        tokenizer: turns ids into text deltas and checks stop strings (None: ids only).
    """

    params: SamplingParams
    prompt_ids: Optional[list] = None
    batch: Optional[MultimodalBatch] = None
    tokenizer: Any = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids) if self.prompt_ids is not None else self.batch.input_ids.shape[1]

    @property
    def rows(self) -> int:
        return 1

    @property
    def positions_needed(self) -> int:
        return self.prompt_len + self.params.max_new_tokens


@dataclass
class VQImageRequest:
    """`n` images of `num_tokens` codes each; `rows_ids` [2n, L] are the CFG prompt rows (official layout)."""

    rows_ids: torch.Tensor
    n: int
    num_tokens: int
    cfg_weight: float
    temperature: float
    seed: Optional[int] = None
    top_k: Optional[int] = None
    row_layout: str = "interleaved"

    @property
    def prompt_len(self) -> int:
        return self.rows_ids.shape[1]

    @property
    def rows(self) -> int:
        return 2 * self.n

    @property
    def positions_needed(self) -> int:
        return self.prompt_len + self.num_tokens


@dataclass
class FlowImageRequest:
    """`n` images by `steps` Euler steps; `rows_ids` [2n, L] (cond rows first, uncond rows see BOS only),
    `prompt_mask` [2n, L-1] over the kept prompt tokens (the last is dropped: t_emb takes its slot)."""

    rows_ids: torch.Tensor
    prompt_mask: torch.Tensor
    n: int
    steps: int
    cfg_weight: float
    z0: torch.Tensor  # [n, C, H, W] starting noise
    image_tokens: int  # 1 + g*g positions fed every step

    @property
    def prompt_len(self) -> int:
        return self.rows_ids.shape[1] - 1

    @property
    def rows(self) -> int:
        return 2 * self.n

    @property
    def positions_needed(self) -> int:
        return self.prompt_len + self.image_tokens


@dataclass
class Event:
    """One step of a request: new token ids and text (text requests), progress (image requests)."""

    token_ids: list = field(default_factory=list)
    text: str = ""
    done: int = 0
    total: int = 0
    stop_token: Optional[int] = None  # the stop id that ended a text request (not part of its output)


@dataclass
class RequestResult:
    """token_ids / text for text requests; `codes` [n, N] (VQ) or `latents` [n, C, H, W] (flow) for images.
    finish_reason: "stop" (a stop id or string), "length" (max_new_tokens), "cancelled"."""

    token_ids: list = field(default_factory=list)
    text: str = ""
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    codes: Optional[torch.Tensor] = None
    latents: Optional[torch.Tensor] = None


class Handle:
    """The caller's side of a submitted request (thread-safe): iterate its events, `cancel()`, `result()`."""

    _END = object()

    def __init__(self, request, request_id: int):
        self.request, self.id = request, request_id
        self._events: "queue.Queue" = queue.Queue()
        self._lock = threading.Lock()
        self._async: Optional[tuple] = None  # (event loop, asyncio.Queue) once an async reader attached
        self._done = threading.Event()
        self._result: Optional[RequestResult] = None
        self._error: Optional[BaseException] = None
        self.cancelled = False

    # engine side
    def _put(self, item) -> None:
        with self._lock:
            if self._async is None:
                self._events.put(item)
            else:
                loop, aq = self._async
                try:
                    loop.call_soon_threadsafe(aq.put_nowait, item)
                except RuntimeError:  # the reader's loop is gone (a closed server): nobody is listening
                    self.cancelled = True

    def _emit(self, event: Event) -> None:
        self._put(event)

    def _finish(self, result: Optional[RequestResult] = None, error: Optional[BaseException] = None) -> None:
        self._result, self._error = result, error
        self._done.set()
        self._put(self._END)

    # caller side
    def cancel(self) -> None:
        """Stop the request at the next step boundary; its rows are freed (result: finish_reason "cancelled")."""
        self.cancelled = True

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def __iter__(self):
        while True:
            ev = self._events.get()
            if ev is self._END:
                if self._error is not None:
                    raise self._error
                return
            yield ev

    async def aevents(self):
        """The events, for an asyncio reader (a server): the engine hands them to the reader's loop."""
        aq: asyncio.Queue = asyncio.Queue()
        with self._lock:
            while True:  # what was emitted before the reader attached
                try:
                    aq.put_nowait(self._events.get_nowait())
                except queue.Empty:
                    break
            self._async = (asyncio.get_running_loop(), aq)
        while True:
            ev = await aq.get()
            if ev is self._END:
                if self._error is not None:
                    raise self._error
                return
            yield ev

    async def aresult(self) -> RequestResult:
        """Wait for the end without blocking the event loop."""
        async for _ in self.aevents():
            pass
        return self.result()

    def result(self, timeout: Optional[float] = None) -> RequestResult:
        """Wait for the end; raises the request's error, or TimeoutError."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result

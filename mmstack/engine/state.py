"""The engine's per-request state: which rows a request holds, where it is (prefill, decode, flow), and what
its sampling needs between steps (generator, seen tokens, text stream, codes, latents).

Notation: n images, R = 2n rows (CFG pairs), V vocab, K codebook size.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import kernels
from ..decoding import TextStream, make_generator
from ..kernels.sampling import apply_repetition_penalty, cfg_combine
from .requests import Event, FlowImageRequest, Handle, RequestResult, TextRequest, VQImageRequest

PREFILL, DECODE, FLOW = "prefill", "decode", "flow"


class Active:
    """A request the engine has admitted. `rows` lists its cache rows in the request's own row order."""

    def __init__(self, handle: Handle, device: torch.device, vocab: int):
        self.handle = handle
        self.req = handle.request
        self.rows: list[int] = []
        self.phase = PREFILL
        self.finish_reason: Optional[str] = None
        req = self.req
        if isinstance(req, TextRequest):
            p = req.params
            self.kind = "text"
            self.gen = make_generator(p.seed)
            self.stops = set(p.stop_token_ids)
            self.stream = TextStream(req.tokenizer, 1, p.stop_strings, p.stop_token_ids) if req.tokenizer else None
            self.tokens: list[int] = []
            self.last: Optional[int] = None
            self.seen = None
            if p.repetition_penalty != 1.0:
                self.seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
                if req.prompt_ids is not None:  # the prompt counts too (transformers semantics)
                    self.seen[0, torch.tensor(req.prompt_ids, device=device).clamp(0, vocab - 1)] = True
        elif isinstance(req, VQImageRequest):
            self.kind = "vq"
            self.gen = make_generator(req.seed)
            self.codes: list[torch.Tensor] = []
        elif isinstance(req, FlowImageRequest):
            self.kind = "flow"
            from mmstack.generation.flow import RectifiedFlowScheduler

            self.z = req.z0.to(device, torch.float32)
            self.scheduler = RectifiedFlowScheduler()
            self.timesteps = self.scheduler.set_timesteps(req.steps)
            self.step = 0
        else:
            raise TypeError(f"unknown request type {type(req).__name__}")

    @property
    def prompt_lengths(self) -> list[int]:
        return [self.req.prompt_len] * self.req.rows

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    # ------------------------------------------------------------------------------ text
    def take_token(self, logits: torch.Tensor) -> None:
        """Sample this text request's next token from its logits [1, V] and emit it."""
        p = self.req.params
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, p.repetition_penalty)
        tok = int(kernels.sample(logits, p.temperature, p.top_k, p.top_p, self.gen)[0])
        self.push_token(tok)

    def push_token(self, tok: int) -> None:
        p = self.req.params
        if self.seen is not None:
            self.seen[0, tok] = True
        if tok in self.stops:
            self.finish_reason = "stop"
            self.handle._emit(Event(stop_token=tok))
            return
        self.tokens.append(tok)
        self.last = tok
        text = ""
        if self.stream is not None:
            text = self.stream.push(torch.tensor([tok]))[0]
            if self.stream.finished[0]:
                self.finish_reason = "stop"
        self.handle._emit(Event(token_ids=[tok], text=text))
        if self.finish_reason is None and len(self.tokens) >= p.max_new_tokens:
            self.finish_reason = "length"

    # ------------------------------------------------------------------------------ VQ images
    def take_codes(self, logits: torch.Tensor) -> None:
        """logits [R, K] of this request's rows -> the next code of each image."""
        req = self.req
        cond, unc = (logits[0::2], logits[1::2]) if req.row_layout == "interleaved" else (logits[: req.n], logits[req.n:])
        tok = kernels.sample(cfg_combine(cond, unc, req.cfg_weight), req.temperature, req.top_k, None, self.gen)
        self.codes.append(tok)
        self.handle._emit(Event(done=len(self.codes), total=req.num_tokens))
        if len(self.codes) >= req.num_tokens:
            self.finish_reason = "length"

    def code_rows(self) -> torch.Tensor:
        """The last codes as one input per row [R]."""
        tok = self.codes[-1]
        return tok.repeat_interleave(2, 0) if self.req.row_layout == "interleaved" else torch.cat([tok, tok])

    # ------------------------------------------------------------------------------ flow images
    def result(self) -> RequestResult:
        if self.kind == "text":
            text = self.stream.text[0] if self.stream is not None else ""
            return RequestResult(token_ids=list(self.tokens), text=text, finish_reason=self.finish_reason or "stop",
                                 prompt_tokens=self.req.prompt_len)
        if self.kind == "vq":
            codes = torch.stack(self.codes, 1).to(torch.long) if self.codes else None
            return RequestResult(finish_reason=self.finish_reason or "stop", codes=codes, prompt_tokens=self.req.prompt_len)
        return RequestResult(finish_reason=self.finish_reason or "stop", latents=self.z, prompt_tokens=self.req.prompt_len)

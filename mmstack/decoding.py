"""Text decoding on the shared backbone: prefill (optionally chunked), then one cached step per token.

Sampling is `mmstack.kernels.sample`; the loop is a generator so callers can stream.
Notation: B batch, T prompt tokens, H hidden, V vocab.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Optional, Sequence

import torch

from . import kernels
from .errors import GenerationError  # noqa: F401  (its old home; re-exported)
from .kernels.sampling import apply_repetition_penalty
from .llm import DecodeStep, KVCache, LanguageModel


@dataclass
class SamplingParams:
    """Decoding settings. temperature 0 (default) is greedy; a seed makes sampling reproducible."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    repetition_penalty: float = 1.0
    stop_token_ids: Sequence[int] = field(default_factory=tuple)
    stop_strings: Sequence[str] = field(default_factory=tuple)
    seed: Optional[int] = None

    def validate(self, max_limit: int = 1 << 20) -> "SamplingParams":
        """Raise `GenerationError` naming the first option of the wrong type or out of range (NaN included)."""
        def number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or not 0 <= self.max_new_tokens <= max_limit:
            raise GenerationError(f"max_new_tokens must be an integer in 0..{max_limit}, got {self.max_new_tokens!r}")
        if not number(self.temperature) or not 0 <= self.temperature <= 1000:
            raise GenerationError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0):
            raise GenerationError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.top_p is not None and (not number(self.top_p) or not 0 < self.top_p <= 1):
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not number(self.repetition_penalty) or not self.repetition_penalty > 0:
            raise GenerationError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise GenerationError(f"seed must be an integer in 0..2**63-1, got {self.seed!r}")
        for name in ("stop_token_ids", "stop_strings"):
            v = getattr(self, name)
            if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)) or len(v) > 64:
                raise GenerationError(f"{name} must be a list of at most 64 items, got {v!r:.60}")
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.stop_token_ids):
            raise GenerationError(f"stop_token_ids must be non-negative integers, got {list(self.stop_token_ids)[:5]}")
        if any(not isinstance(s, str) or len(s) > 1000 for s in self.stop_strings):
            raise GenerationError("stop strings must be strings of at most 1000 characters")
        return self

    def updated(self, **kw) -> "SamplingParams":
        """A copy with options replaced (None keeps the current value). The names transformers and the OpenAI
        API use are accepted too: `max_tokens` (max_new_tokens), `stop` (stop_strings: a str or a list),
        `stop_ids` (stop_token_ids), `do_sample` (False: greedy; True: temperature 1.0 unless one is given)."""
        kw = dict(kw)
        for alias, name in (("max_tokens", "max_new_tokens"), ("stop", "stop_strings"), ("stop_ids", "stop_token_ids")):
            if alias in kw:
                value = kw.pop(alias)
                if name in kw and kw[name] is not None and value is not None and kw[name] != value:
                    raise GenerationError(f"both {alias} and {name} are given, with different values")
                kw.setdefault(name, value)
                kw[name] = value if kw[name] is None else kw[name]
        if isinstance(kw.get("stop_strings"), str):
            kw["stop_strings"] = (kw["stop_strings"],)
        if "do_sample" in kw:
            do_sample = kw.pop("do_sample")
            if do_sample is False:
                kw["temperature"] = 0.0
            elif do_sample and not kw.get("temperature") and not self.temperature:
                kw["temperature"] = 1.0
        unknown = set(kw) - set(self.__dataclass_fields__)
        if unknown:
            raise GenerationError(f"unknown sampling options {sorted(unknown)} (known: {sorted(self.__dataclass_fields__)}"
                                  " and max_tokens, stop, stop_ids, do_sample)")
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


def make_generator(seed: Optional[int]) -> Optional[torch.Generator]:
    """A CPU generator: the same seed gives the same draws on any device the model runs on."""
    return None if seed is None else torch.Generator(device="cpu").manual_seed(int(seed))


@torch.no_grad()
def prefill(
    lm: LanguageModel,
    cache: KVCache,
    input_ids: Optional[torch.Tensor] = None,
    inputs_embeds: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
    chunk: Optional[int] = None,
) -> torch.Tensor:
    """Run the prompt through the model in chunks of `chunk` tokens; returns the last hidden [B, H]."""
    t = (input_ids if input_ids is not None else inputs_embeds).shape[1]
    step = chunk or t
    if step <= 0:
        raise GenerationError(f"prefill chunk must be positive, got {chunk}")
    h = None
    for s in range(0, t, step):
        e = min(s + step, t)
        h = lm(
            input_ids=None if input_ids is None else input_ids[:, s:e],
            inputs_embeds=None if inputs_embeds is None else inputs_embeds[:, s:e],
            attention_mask=None if attention_mask is None else attention_mask[:, s:e],
            cache=cache,
        )
    return h[:, -1]


CACHE_STEP = 256


@torch.no_grad()
def generate_ids(
    lm: LanguageModel,
    params: SamplingParams,
    input_ids: Optional[torch.Tensor] = None,
    inputs_embeds: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
    prefill_chunk: Optional[int] = None,
    stop_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    pad_id: int = 0,
    decode_mode: str = "auto",
) -> Iterator[torch.Tensor]:
    """Yield the next token ids [B] step by step (rows that finished yield `pad_id`).

    A row finishes on a stop token id or when `stop_fn(tokens) -> bool[B]` says so (stop strings are
    checked by the text layer). Iteration ends when every row finished or after max_new_tokens.
    `decode_mode` picks how one cached step runs ("auto", "eager", "cuda_graph", "compile"; see
    `mmstack.llm.DecodeStep`); every mode gives the same tokens.
    """
    params.validate()
    ref = input_ids if input_ids is not None else inputs_embeds
    if ref is None or ref.shape[1] == 0:
        raise GenerationError("empty prompt: at least one token is needed")
    b, t = ref.shape[:2]
    if t + params.max_new_tokens > lm.cfg.max_position_embeddings:
        raise GenerationError(
            f"prompt ({t} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the model context "
            f"({lm.cfg.max_position_embeddings} tokens)"
        )
    if params.max_new_tokens == 0:
        return
    device = lm.device
    # capacity in steps of CACHE_STEP, so prompts of similar length share compiled / captured decode steps
    cache = lm.new_cache(b, min(-(-(t + params.max_new_tokens) // CACHE_STEP) * CACHE_STEP,
                                lm.cfg.max_position_embeddings))
    gen = make_generator(params.seed)
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(b, lm.cfg.vocab_size, dtype=torch.bool, device=device)
        if input_ids is not None:  # the prompt counts too (transformers semantics); padding does not
            valid = torch.ones_like(input_ids) if attention_mask is None else (attention_mask != 0).long()
            counts = torch.zeros(b, lm.cfg.vocab_size, dtype=torch.long, device=device)
            counts.scatter_reduce_(1, input_ids.clamp(0, lm.cfg.vocab_size - 1), valid, "amax")
            seen = counts.bool()
    stops = torch.tensor(sorted(set(params.stop_token_ids)), dtype=torch.long, device=device)
    # without stop criteria no row can finish early: skip the per-step bookkeeping and its host sync
    can_stop = bool(stops.numel()) or stop_fn is not None
    done = torch.zeros(b, dtype=torch.bool, device=device)
    h = prefill(lm, cache, input_ids, inputs_embeds, attention_mask, prefill_chunk)
    step = DecodeStep(lm, cache, mode=decode_mode)
    for i in range(params.max_new_tokens):
        logits = lm.logits(h)  # [B,V] fp32
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
        tok = kernels.sample(logits, params.temperature, params.top_k, params.top_p, gen)
        if can_stop:
            tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        yield tok
        if seen is not None:
            seen.scatter_(1, tok[:, None], True)
        if stops.numel():
            done |= torch.isin(tok, stops)
        if stop_fn is not None:
            done |= stop_fn(tok).to(device)
        if can_stop and bool(done.all()):
            return
        if i + 1 < params.max_new_tokens:
            h = step(input_ids=tok[:, None])


class TextStream:
    """Incremental detokenisation with stop strings, one row per prompt.

    `push(tokens)` appends one token per row and returns the new text per row ('' when nothing is
    printable yet: an incomplete UTF-8 sequence is held back until it completes).
    """

    def __init__(self, tokenizer, batch: int, stop_strings: Sequence[str] = (), stop_ids: Sequence[int] = ()):
        self.tok = tokenizer
        self.ids: list[list[int]] = [[] for _ in range(batch)]
        self.text = [""] * batch
        self.finished = [False] * batch
        self.stop_strings = [s for s in stop_strings if s]
        self.stop_ids = set(stop_ids)

    def push(self, tokens: torch.Tensor) -> list[str]:
        deltas = []
        for i, t in enumerate(tokens.tolist()):
            if self.finished[i]:
                deltas.append("")
                continue
            if t in self.stop_ids:
                self.finished[i] = True
                deltas.append("")
                continue
            self.ids[i].append(t)
            full = self.tok.decode_answer(self.ids[i])
            if full.endswith("\ufffd"):
                deltas.append("")  # wait for the rest of a multi-byte character
                continue
            for s in self.stop_strings:
                k = full.find(s)
                if k >= 0:
                    full = full[:k]
                    self.finished[i] = True
            delta = full[len(self.text[i]) :] if full.startswith(self.text[i]) else full
            self.text[i] = full
            deltas.append(delta)
        return deltas

    def stop_mask(self) -> torch.Tensor:
        return torch.tensor(self.finished, dtype=torch.bool)

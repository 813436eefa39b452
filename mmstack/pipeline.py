"""`Pipeline`: a loaded model, its tokenizer, and the parts it was composed of: an understanding part
(`mmstack.vision.understanding.Understanding`) and a generation part
(`mmstack.generation.generator.ImageGenerator`), either `None` when the model lacks it. Create with
`mmstack.load`. Every model offers `logits` and `complete`; `capabilities` says what else it can do.

Request limits (attributes; None means the model context, `max_position_embeddings`): `max_prompt_tokens`
bounds a prompt (image tokens included) and `max_new_tokens_limit` the `max_new_tokens` a call may ask for;
`max_images` the images of one request and `max_images_per_call` the images of one `generate`. All are checked
before anything is embedded or a cache allocated: an over-long request raises `GenerationError` naming the
limit, never a truncated or silently wrong answer.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Iterator, Optional, Sequence, Union

import torch

from .config import ModelConfig
from .decoding import GenerationError, SamplingParams
from .engine import Engine, EngineConfig, Handle, TextRequest
from .errors import TokenizerError
from .model import MultimodalModel
from .pipeline_chat import ChatMixin
from .pipeline_images import ImagesMixin
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

Prompt = Union[str, Sequence[int], torch.Tensor]
MAX_IMAGES = 16
MAX_IMAGES_PER_CALL = 16


class Pipeline(ChatMixin, ImagesMixin):
    """A model with its tokenizer and parts; text here, chat (`pipeline_chat`) and images (`pipeline_images`)
    in the mixins."""

    max_images_per_call = MAX_IMAGES_PER_CALL

    def __init__(self, model: MultimodalModel, tokenizer: Optional[Tokenizer] = None, source: Optional[str] = None,
                 understanding=None, generation=None, prefill_chunk: Optional[int] = 512,
                 engine_config: Optional[EngineConfig] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.source = source
        self.understanding = understanding
        self.generation = generation
        self.prefill_chunk = prefill_chunk
        self.defaults = SamplingParams()
        self.max_prompt_tokens: Optional[int] = None
        self.max_new_tokens_limit: Optional[int] = None
        self.max_images = MAX_IMAGES
        self.engine_config = engine_config or EngineConfig()
        self._engine: Optional[Engine] = None

    # ------------------------------------------------------------------------------ what it is
    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def capabilities(self) -> frozenset:
        """What this pipeline can do: "text" always; "understanding" (describe, chat) and "grounding" with an
        understanding part; "vq" / "flow" with a generation part of that kind."""
        caps = {"text"}
        if self.understanding is not None:
            caps.add("understanding")
            if self.understanding.can_ground:
                caps.add("grounding")
        if self.generation is not None:
            caps.update(self.generation.modes)
        return frozenset(caps)

    # understanding internals, kept reachable from the pipeline for tests and tools
    @property
    def processor(self):
        return self._understanding("process images").processor

    @property
    def chat_cfg(self):
        return self.understanding.chat_cfg if self.understanding is not None else self.cfg.chat

    @property
    def policy(self):
        """The image policy (`mmstack.vision.image_io.ImagePolicy`): alpha, EXIF and the per-image limits."""
        return self._understanding("load images").policy

    @policy.setter
    def policy(self, value) -> None:
        self._understanding("load images").policy = value

    # ------------------------------------------------------------------------------ limits
    @property
    def context(self) -> int:
        """Positions the model can attend over (prompt + new tokens)."""
        return self.cfg.language.max_position_embeddings

    def prompt_token_limit(self) -> int:
        """The longest accepted prompt: `max_prompt_tokens`, never more than the context."""
        return min(self.max_prompt_tokens or self.context, self.context)

    def prompt_char_limit(self) -> int:
        """No prompt longer than this many characters can fit: the context times the longest token's text
        (a token covers at most that many characters). Checked before anything is tokenized."""
        per_token = self.tokenizer.max_token_chars if self.tokenizer is not None else 1
        return self.prompt_token_limit() * max(per_token, 1)

    def check_prompt_chars(self, prompt) -> None:
        """Raise `GenerationError` when the text of `prompt` (a str, or messages) has more characters than any
        prompt the context can hold, before tokenizing it (a multi-megabyte prompt is refused in microseconds)."""
        if isinstance(prompt, str):
            n = len(prompt)
        else:
            n = 0
            for m in prompt if isinstance(prompt, (list, tuple)) else ():
                content = m.get("content") if isinstance(m, dict) else None
                if isinstance(content, str):
                    n += len(content)
                elif isinstance(content, (list, tuple)):
                    n += sum(len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
        limit = self.prompt_char_limit()
        if n > limit:
            raise GenerationError(f"the prompt has {n} characters; no prompt over {limit} characters fits the limit of "
                                  f"{self.prompt_token_limit()} tokens")

    def check_prompt_length(self, n_tokens: int, max_new_tokens: int = 0, what: str = "max_new_tokens") -> None:
        """Raise `GenerationError` naming the limit when a prompt of `n_tokens` (image tokens included) is
        longer than `max_prompt_tokens`, or when it and `max_new_tokens` do not fit the context."""
        limit = self.prompt_token_limit()
        if n_tokens > limit and limit < self.context:
            raise GenerationError(f"the prompt has {n_tokens} tokens; the limit is max_prompt_tokens={limit}")
        if n_tokens + max_new_tokens > self.context:
            if what != "max_new_tokens":
                raise GenerationError(f"prompt ({n_tokens} tokens) + {max_new_tokens} {what} exceeds the context "
                                      f"({self.context})")
            raise GenerationError(
                f"prompt ({n_tokens} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model context "
                f"({self.context} tokens): shorten the prompt or ask for fewer new tokens"
            )

    def _params(self, sampling: dict) -> SamplingParams:
        params = self.defaults.updated(**sampling)
        n, limit = params.max_new_tokens, min(self.max_new_tokens_limit or self.context, self.context)
        if isinstance(n, int) and n > limit:
            if limit < self.context:
                raise GenerationError(f"max_new_tokens={n} exceeds the limit max_new_tokens_limit={limit}")
            raise GenerationError(f"max_new_tokens={n} exceeds the model context ({self.context} tokens)")
        params.validate()
        stops = list(params.stop_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_id is not None and self.tokenizer.eos_id not in stops:
            stops.append(self.tokenizer.eos_id)
        return params.updated(stop_token_ids=tuple(stops))

    def _pad_id(self) -> int:
        tk = self.tokenizer
        if tk is not None:
            for i in (tk.pad_id, tk.eos_id):
                if i is not None:
                    return i
        return 0

    # ------------------------------------------------------------------------------ text
    def _ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise TokenizerError(
                    f"{self.source or 'this model'} has no tokenizer: pass token ids, or load with tokenizer=DIR"
                )
            self.check_prompt_chars(prompt)
            return self.check_vocab(self.tokenizer.encode(prompt))
        ids = prompt.tolist() if isinstance(prompt, torch.Tensor) else list(prompt)
        if not ids:
            raise GenerationError("empty prompt: at least one token is needed")
        vocab = self.cfg.language.vocab_size
        bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < vocab]
        if bad:
            raise GenerationError(f"token ids out of range 0..{vocab - 1}: {bad[:5]}")
        return ids

    def check_vocab(self, ids):
        """`ids` (a list or a tensor) if every id is inside the model's vocabulary; a tokenizer larger than the
        model (a mismatched tokenizer) is a `TokenizerError` naming both, not an index error in the embedding."""
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        top = max(values, default=-1)
        if top >= self.cfg.language.vocab_size:
            raise TokenizerError(f"the tokenizer gave id {top}, beyond the model's vocabulary of "
                                 f"{self.cfg.language.vocab_size}: this tokenizer does not belong to this model")
        return ids

    @torch.no_grad()
    def logits(self, input_ids: Union[torch.Tensor, Sequence], attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One full forward. input_ids [B, T] (or [T]) -> float32 logits [B, T, V]."""
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.numel() == 0:
            raise GenerationError("empty input_ids")
        lm = self.model.language
        h = lm(input_ids=ids.to(self.device), attention_mask=None if attention_mask is None else attention_mask.to(self.device))
        return lm.logits(h)

    @staticmethod
    def _is_batch(prompt) -> bool:
        if isinstance(prompt, torch.Tensor):
            return prompt.dim() == 2 and prompt.shape[0] != 1
        return isinstance(prompt, (list, tuple)) and bool(prompt) and not isinstance(prompt[0], int)

    @staticmethod
    def _rows(prompt) -> list:
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() > 2:
                raise GenerationError(f"token ids must be [T] or [B, T], got shape {list(prompt.shape)}")
            return list(prompt) if prompt.dim() == 2 else [prompt]
        return list(prompt) if Pipeline._is_batch(prompt) else [prompt]

    # ------------------------------------------------------------------------------ the engine
    @property
    def engine(self) -> Engine:
        """The continuous-batching engine every request of this pipeline runs on (created on first use)."""
        if self._engine is None:
            cfg = self.engine_config
            if self.prefill_chunk and cfg.prefill_chunk != self.prefill_chunk:
                cfg = dataclasses.replace(cfg, prefill_chunk=self.prefill_chunk)
            self._engine = Engine(self.model, cfg, pad_id=self._pad_id())
        return self._engine

    def _text_request(self, params: SamplingParams, prompt_ids=None, batch=None) -> TextRequest:
        return TextRequest(params=params, prompt_ids=prompt_ids, batch=batch, tokenizer=self.tokenizer)

    def _run(self, requests: list) -> list[Handle]:
        """Submit requests together (they batch), cancelling what was submitted if one is refused."""
        handles: list[Handle] = []
        try:
            for r in requests:
                handles.append(self.engine.submit(r))
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        return handles

    def _text_ids(self, prompt, sampling: dict) -> tuple[list[list[int]], SamplingParams]:
        seqs = [self._ids(p) for p in self._rows(prompt)]
        params = self._params(sampling)
        self.check_prompt_length(max(len(s) for s in seqs), params.max_new_tokens)
        return seqs, params

    def stream_ids(self, prompt: Union[Prompt, Sequence[Prompt]], **sampling) -> Iterator[torch.Tensor]:
        """Yield next-token ids [B] per step for one prompt or a batch; a finished row yields the pad id."""
        seqs, params = self._text_ids(prompt, sampling)
        handles = self._run([self._text_request(params, prompt_ids=s) for s in seqs])
        streams = [iter(h) for h in handles]
        pad = self._pad_id()
        try:
            for _ in range(params.max_new_tokens):
                step, alive = [], False
                for it in streams:
                    ev = next(it, None) if it is not None else None
                    tok = None if ev is None else (ev.token_ids[0] if ev.token_ids else ev.stop_token)
                    alive |= ev is not None
                    step.append(pad if tok is None else tok)
                if not alive:
                    return
                yield torch.tensor(step, dtype=torch.long)
        finally:
            for h in handles:
                h.cancel()

    def complete_ids(self, prompt: Union[Prompt, Sequence[Prompt]], **sampling) -> list[list[int]]:
        """New token ids per prompt (stop tokens excluded)."""
        seqs, params = self._text_ids(prompt, sampling)
        handles = self._run([self._text_request(params, prompt_ids=s) for s in seqs])
        return [h.result().token_ids for h in handles]

    def stream(self, prompt: Prompt, **sampling) -> Iterator[str]:
        """Yield text deltas for one prompt; stop strings and stop ids end the stream."""
        if self.tokenizer is None:
            raise TokenizerError(f"{self.source or 'this model'} has no tokenizer; use stream_ids")
        if self._is_batch(prompt):
            raise GenerationError("stream takes one prompt; use complete for a batch")
        seqs, params = self._text_ids(prompt, sampling)
        return self._deltas(self._run([self._text_request(params, prompt_ids=seqs[0])])[0])

    @staticmethod
    def _deltas(handle: Handle) -> Iterator[str]:
        try:
            for ev in handle:
                if ev.text:
                    yield ev.text
        finally:
            handle.cancel()  # a caller that stops reading frees the rows at the next step

    def complete(self, prompt: Union[Prompt, Sequence[Prompt]], max_new_tokens: Optional[int] = None, **sampling):
        """Continue a prompt (text or token ids) or a list of prompts.

        Returns the new text (a list for a list of prompts or a [B, T] tensor with B > 1). Without a
        tokenizer, returns token ids. Sampling options: temperature, top_k, top_p, repetition_penalty,
        stop_token_ids (or stop_ids), stop_strings (or stop), seed, max_new_tokens (or max_tokens), do_sample.
        """
        if max_new_tokens is not None:
            sampling["max_new_tokens"] = max_new_tokens
        single = not self._is_batch(prompt)
        seqs, params = self._text_ids(prompt, sampling)
        results = [h.result() for h in self._run([self._text_request(params, prompt_ids=s) for s in seqs])]
        out = [r.token_ids for r in results] if self.tokenizer is None else [r.text for r in results]
        return out[0] if single else out

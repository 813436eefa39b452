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
from typing import Callable, Iterator, Optional, Sequence, Union

import torch

from mmstack.generation.flow import flow_prompt
from mmstack.generation.sampler import cfg_rows

from .config import ModelConfig
from .decoding import GenerationError, SamplingParams
from .engine import Engine, EngineConfig, FlowImageRequest, Handle, TextRequest, VQImageRequest
from .errors import CapabilityError, TokenizerError
from .model import MultimodalModel
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

Prompt = Union[str, Sequence[int], torch.Tensor]
MAX_IMAGES = 16
MAX_IMAGES_PER_CALL = 16


class Pipeline:
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
            return self.tokenizer.encode(prompt)
        ids = prompt.tolist() if isinstance(prompt, torch.Tensor) else list(prompt)
        if not ids:
            raise GenerationError("empty prompt: at least one token is needed")
        vocab = self.cfg.language.vocab_size
        bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < vocab]
        if bad:
            raise GenerationError(f"token ids out of range 0..{vocab - 1}: {bad[:5]}")
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

    # ------------------------------------------------------------------------------ understanding
    def _understanding(self, what: str):
        if self.understanding is None:
            raise CapabilityError(f"{self.source or 'this model'} cannot {what}: it has no image-understanding path")
        return self.understanding

    @torch.no_grad()
    def encode(self, conversations: Sequence[Sequence[dict]], max_new_tokens: int = 0):
        """Conversations -> (inputs_embeds [B,T,D], attention_mask [B,T], the loaded images per sample).

        Raises:
            GenerationError: a prompt over `max_prompt_tokens`, or one that leaves no room in the context
                for `max_new_tokens`; checked on the token ids, before anything is embedded.
        """
        u = self._understanding("chat about images")
        batch, imgs = u.prepare(conversations, self.prompt_token_limit(), max_images=self.max_images)
        self.check_prompt_length(batch.input_ids.shape[1], max_new_tokens)
        batch = batch.to(self.device)
        return self.model.embed(batch), batch.attention_mask, imgs

    def _prepare(self, messages: Sequence[dict], max_new_tokens: int) -> tuple:
        u = self._understanding("chat about images")
        batch, imgs = u.prepare([messages], self.prompt_token_limit(), max_images=self.max_images)
        self.check_prompt_length(batch.input_ids.shape[1], max_new_tokens)
        return batch, imgs

    def _submit_chat(self, messages: Sequence[dict], sampling: dict) -> Handle:
        params = self._params(sampling)
        batch, _ = self._prepare(messages, params.max_new_tokens)
        return self._run([self._text_request(params, batch=batch)])[0]

    def chat(self, messages: Sequence[dict], stream: bool = True, **sampling) -> Union[Iterator[str], str]:
        """Answer the last user turn of `messages`. stream=True yields text deltas; False returns the text.

        Messages use the transformers / OpenAI shapes (see `mmstack.vision.messages`); the request is checked
        (limits, images) before this returns, also when streaming."""
        handle = self._submit_chat(messages, sampling)
        return self._deltas(handle) if stream else handle.result().text

    def chat_batch(self, conversations: Sequence[Sequence[dict]], **sampling) -> list[str]:
        """Answer many conversations at once (they run batched on the engine); returns the texts in order."""
        params = self._params(sampling)
        reqs = [self._text_request(params, batch=self._prepare(c, params.max_new_tokens)[0]) for c in conversations]
        return [h.result().text for h in self._run(reqs)]

    def describe(self, image_or_images, prompt: Optional[str] = None, **sampling) -> str:
        """Describe one image (or several, in one turn). Returns the answer text."""
        u = self._understanding("describe images")
        images = list(image_or_images) if isinstance(image_or_images, (list, tuple)) else [image_or_images]
        if not images:
            raise GenerationError("describe needs at least one image")
        return self.chat(u.describe_messages(images, prompt), stream=False, **sampling)

    def describe_batch(self, images: Sequence, prompts=None, **sampling) -> list[str]:
        """One answer per image (each its own request, batched on the engine). `prompts`: one str for all,
        or one per image (None: describe in detail)."""
        u = self._understanding("describe images")
        images = list(images)
        prompts = [prompts] * len(images) if prompts is None or isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(images):
            raise GenerationError(f"describe_batch got {len(images)} images but {len(prompts)} prompts")
        return self.chat_batch([u.describe_messages([im], p) for im, p in zip(images, prompts)], **sampling)

    def ground(self, image, phrase: str, **sampling):
        """Boxes for `phrase` in original-image pixels (DeepSeek-VL2 `<|ref|>` / `<|det|>` grounding)."""
        u = self._understanding("ground phrases")
        if not u.can_ground:
            raise CapabilityError(f"{self.source}: this model's tokenizer has no grounding tokens (<|ref|>, <|det|>)")
        if not isinstance(phrase, str) or not phrase.strip():
            raise GenerationError("ground needs a non-empty phrase")
        msgs, img = u.grounding_messages(image, phrase)
        sampling.setdefault("max_new_tokens", 128)
        result = self._submit_chat(msgs, sampling).result()
        return u.boxes(self.tokenizer.decode(result.token_ids, skip_special_tokens=False), img, phrase)

    # ------------------------------------------------------------------------------ generation
    @property
    def generation_modes(self) -> list[str]:
        return self.generation.modes if self.generation is not None else []

    def _generation(self):
        if self.generation is None:
            raise CapabilityError(f"{self.source or 'this model'} cannot generate images: it has no image-generation path")
        return self.generation

    def generation_prompt_ids(self, prompt: str, mode: str) -> list[int]:
        """The official generation prompt ids (`{user}: {prompt}\n\n{assistant}:` + the start tag, with BOS)."""
        return self._generation().prompt_ids(prompt, mode)

    def vae(self):
        """JanusFlow's VAE (`load(..., vae=DIR)`, else found in the model folder)."""
        return self._generation().vae()

    def generate(self, prompt: str, n: int = 1, seed: Optional[int] = None, cfg: Optional[float] = None,
                 temperature: Optional[float] = None, steps: Optional[int] = None, size=None,
                 mode: Optional[str] = None, progress: Optional[Callable[[int, int], None]] = None):
        """Generate `n` images for `prompt`.

        Args:
            seed: same seed -> same images on a given device.
            cfg: classifier-free guidance weight (Janus 5.0, JanusFlow 2.0 by default).
            temperature: VQ path only (default 1.0; 0 = greedy codes).
            steps: flow path only (Euler steps, default 30).
            size: the model's native square size only (384 for the released models).
            mode: "vq" or "flow" when a model has both (default: the first available).
            progress: called as progress(done, total) during generation.
        Returns:
            a list of n PIL RGB images.
        Raises:
            CapabilityError: the model has no (such) generation path; GenerationError: a bad request.
        """
        g = self._generation()
        req = g.request(prompt, n, seed, cfg, temperature, steps, size, mode, max_images=self.max_images_per_call)
        self.check_prompt_length(len(req.prompt_ids), req.image_tokens, what="image tokens")
        if req.mode == "vq":
            head = self.cfg.vq_head
            rows = cfg_rows(req.prompt_ids, n, g.pad_id(), head.row_layout, head.uncond)
            handle = self._run([VQImageRequest(rows, n, req.image_tokens, req.cfg_weight, req.temperature, seed,
                                               head.image_top_k, head.row_layout)])[0]
        else:
            rows, mask = flow_prompt(req.prompt_ids, n, g.pad_id())
            fh = self.cfg.flow_head
            side = fh.image_size // fh.vae_downsample
            gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
            z0 = torch.randn(n, fh.latent_channels, side, side, generator=gen)
            handle = self._run([FlowImageRequest(rows, mask, n, req.steps, req.cfg_weight, z0, req.image_tokens)])[0]
        try:
            for ev in handle:
                if progress is not None:
                    progress(ev.done, ev.total)
        finally:
            handle.cancel()
        result = handle.result()
        if req.mode == "vq":
            return g.decode_codes(self.model.vq, result.codes)
        return g.decode_latents(result.latents)

"""The public API: `load(dir)` returns a `Pipeline` offering what the checkpoint can do.

Every model offers `logits` and `complete`; the understanding and generation layers add `describe`,
`chat`, `ground` and `generate` to pipelines whose model has those parts.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch

from .config import ModelConfig
from .decoding import GenerationError, SamplingParams, TextStream, generate_ids
from .formats import read_config
from .loading import default_device, default_dtype, load_model, resolve_dtype
from .model import MultimodalModel
from .tokenizer import Tokenizer, TokenizerError

log = logging.getLogger(__name__)

Prompt = Union[str, Sequence[int], torch.Tensor]


class CapabilityError(RuntimeError):
    """The loaded model has no path for the requested task (e.g. `describe` on a text-only model)."""


def find_tokenizer(model_dir: Path) -> Optional[Path]:
    """`dir/tokenizer.json`, then `dir/tokenizer/tokenizer.json`; None if neither exists."""
    for cand in (model_dir / "tokenizer.json", model_dir / "tokenizer" / "tokenizer.json"):
        if cand.exists():
            return cand.parent
    return None


class Pipeline:
    """A loaded model plus its tokenizer. Create with `mmstack.load`.

    Request limits (attributes; None means the model context, `max_position_embeddings`): `max_prompt_tokens`
    bounds a prompt (image tokens included) and `max_new_tokens_limit` the `max_new_tokens` a call may ask
    for. Both are checked before anything is embedded or a cache allocated, and a prompt plus its
    `max_new_tokens` must also fit the context: an over-long request raises `GenerationError` naming the
    limit, never a truncated or silently wrong answer.
    """

    def __init__(self, model: MultimodalModel, tokenizer: Optional[Tokenizer] = None, source: Optional[str] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.source = source
        self.defaults = SamplingParams()
        self.max_prompt_tokens: Optional[int] = None
        self.max_new_tokens_limit: Optional[int] = None

    @property
    def context(self) -> int:
        """Positions the model can attend over (prompt + new tokens)."""
        return self.cfg.language.max_position_embeddings

    def prompt_token_limit(self) -> int:
        """The longest accepted prompt: `max_prompt_tokens`, never more than the context."""
        return min(self.max_prompt_tokens or self.context, self.context)

    def check_prompt_length(self, n_tokens: int, max_new_tokens: int = 0) -> None:
        """Raise `GenerationError` naming the limit when a prompt of `n_tokens` (image tokens included) is
        longer than `max_prompt_tokens`, or when it and `max_new_tokens` do not fit the context."""
        limit = self.prompt_token_limit()
        if n_tokens > limit and limit < self.context:
            raise GenerationError(f"the prompt has {n_tokens} tokens; the limit is max_prompt_tokens={limit}")
        if n_tokens + max_new_tokens > self.context:
            raise GenerationError(
                f"prompt ({n_tokens} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model context "
                f"({self.context} tokens): shorten the prompt or ask for fewer new tokens"
            )

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    @property
    def device(self) -> torch.device:
        return self.model.device

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
        bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < vocab]
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

    def stream_ids(self, prompt: Union[Prompt, Sequence[Prompt]], **sampling) -> Iterator[torch.Tensor]:
        """Yield next-token ids [B] per step for one prompt or a batch (left padded)."""
        batch = prompt if isinstance(prompt, (list, tuple)) and prompt and not isinstance(prompt[0], int) else [prompt]
        seqs = [self._ids(p) for p in batch]
        params = self._params(sampling)
        self.check_prompt_length(max(len(s) for s in seqs), params.max_new_tokens)
        pad = self._pad_id()
        t = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), t), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), t), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, t - len(s):] = torch.tensor(s)
            mask[i, t - len(s):] = 1
        yield from generate_ids(self.model.language, params, input_ids=ids.to(self.device),
                                attention_mask=None if bool(mask.all()) else mask.to(self.device), pad_id=pad)

    def complete_ids(self, prompt: Union[Prompt, Sequence[Prompt]], **sampling) -> list[list[int]]:
        """New token ids per prompt (stop tokens excluded)."""
        params = self._params(sampling)
        stops = set(params.stop_token_ids)
        out: Optional[list[list[int]]] = None
        done: list[bool] = []
        for tok in self.stream_ids(prompt, **sampling):
            if out is None:
                out, done = [[] for _ in range(tok.shape[0])], [False] * tok.shape[0]
            for i, t in enumerate(tok.tolist()):
                if done[i]:
                    continue
                if t in stops:
                    done[i] = True
                else:
                    out[i].append(t)
        return out or []

    def stream(self, prompt: Prompt, **sampling) -> Iterator[str]:
        """Yield text deltas for one prompt; stop strings and stop ids end the stream."""
        if self.tokenizer is None:
            raise TokenizerError(f"{self.source or 'this model'} has no tokenizer; use stream_ids")
        params = self._params(sampling)
        ts = TextStream(self.tokenizer, 1, params.stop_strings, params.stop_token_ids)
        for tok in self.stream_ids(prompt, **sampling):
            delta = ts.push(tok)[0]
            if delta:
                yield delta
            if ts.finished[0]:
                return

    def complete(self, prompt: Union[Prompt, Sequence[Prompt]], max_new_tokens: Optional[int] = None, **sampling):
        """Continue a prompt (text or token ids) or a list of prompts.

        Returns the new text (a list for a list of prompts). Without a tokenizer, returns token ids.
        Sampling options: temperature, top_k, top_p, repetition_penalty, stop_token_ids, stop_strings, seed.
        """
        if max_new_tokens is not None:
            sampling["max_new_tokens"] = max_new_tokens
        single = not (isinstance(prompt, (list, tuple)) and prompt and not isinstance(prompt[0], int))
        if self.tokenizer is None:
            ids = self.complete_ids(prompt, **sampling)
            return ids[0] if single else ids
        params = self._params(sampling)
        batch = [prompt] if single else list(prompt)
        ts = TextStream(self.tokenizer, len(batch), params.stop_strings, params.stop_token_ids)
        for tok in self.stream_ids(batch, **sampling):
            ts.push(tok)
            if all(ts.finished):
                break
        return ts.text[0] if single else ts.text

    # ------------------------------------------------------------------------------ multimodal (later layers)
    def _missing(self, what: str, part: str) -> CapabilityError:
        return CapabilityError(f"{self.source or 'this model'} cannot {what}: it has no {part} path")

    def describe(self, *args, **kwargs):
        raise self._missing("describe images", "image-understanding")

    def chat(self, *args, **kwargs):
        raise self._missing("chat about images", "image-understanding")

    def ground(self, *args, **kwargs):
        raise self._missing("ground phrases", "image-understanding")

    def generate(self, *args, **kwargs):
        raise self._missing("generate images", "image-generation")


# Pipeline subclasses chosen by capability (registered by mmstack.vision / mmstack.generation).
PIPELINE_FACTORIES: list = []


def load(name_or_dir: Union[str, Path], device=None, dtype=None, tokenizer: Optional[Union[str, Path, Tokenizer]] = None,
         **options) -> Pipeline:
    """Load a model folder of any supported format and return a `Pipeline`.

    Args:
        name_or_dir: a folder with config.json + weights (official DeepSeek-VL2 / Janus / JanusFlow,
            transformers deepseek_v2 / deepseek_v3 / llama / janus, or native mmstack).
        device: "cpu", "cuda", ... (default: CUDA if available).
        dtype: torch dtype or name (default: bf16 on CUDA, fp32 on CPU).
        tokenizer: a folder / tokenizer.json / Tokenizer; default `dir/tokenizer.json` then `dir/tokenizer/`.
    Returns:
        a Pipeline with `logits` and `complete`, plus the multimodal methods the checkpoint supports.
    """
    d = Path(name_or_dir)
    if not d.exists():
        raise FileNotFoundError(f"{d}: no such model folder")
    cfg = read_config(d)
    device = torch.device(device) if device is not None else default_device()
    model = load_model(d, device=device, dtype=resolve_dtype(dtype) or default_dtype(device), cfg=cfg)
    if isinstance(tokenizer, Tokenizer):
        tk = tokenizer
    elif tokenizer is not None:
        tk = Tokenizer.from_dir(tokenizer)
    else:
        found = find_tokenizer(d)
        tk = Tokenizer.from_dir(found) if found else None
    for factory in PIPELINE_FACTORIES:
        pipe = factory(model, tk, str(d), **options)
        if pipe is not None:
            return pipe
    if options:
        raise TypeError(f"unknown load options {sorted(options)}")
    return Pipeline(model, tk, source=str(d))


_DEFAULT: dict = {}


def default_model_dir() -> Path:
    """The embedded demo model shipped as package data (`mmstack.assets/demo-model`)."""
    from mmstack.assets import ROOT

    d = ROOT / "demo-model"
    if not (d / "config.json").exists():
        raise FileNotFoundError(
            f"the embedded demo model is not in this installation ({d}); pass a model folder to mmstack.load instead"
        )
    return d


def default_pipeline(device=None) -> Pipeline:
    key = str(device)
    if key not in _DEFAULT:
        _DEFAULT[key] = load(default_model_dir(), device=device)
    return _DEFAULT[key]


def describe(image, prompt: Optional[str] = None, **sampling) -> str:
    """Describe an image with the embedded default model."""
    return default_pipeline().describe(image, prompt, **sampling)


def generate(prompt: str, **options):
    """Generate images for `prompt` with the embedded default model (returns a list of PIL images)."""
    return default_pipeline().generate(prompt, **options)

"""The public API: `load(name_or_dir)` returns a `Pipeline` composed of what the checkpoint can do, and
`describe` / `generate` on the embedded demo model.

    pipe = mmstack.load("path/to/model")        # or a hub id, "org/name[@revision]"
    pipe.capabilities                            # frozenset({"text", "understanding", "grounding", "vq"})
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Union

import torch

from mmstack.generation.generator import ImageGenerator
from mmstack.vision.understanding import Understanding

from .errors import CapabilityError  # noqa: F401  (its old home; re-exported)
from .formats import read_config
from .hub import resolve_model
from .loading import default_device, default_dtype, load_model, resolve_dtype
from .pipeline import Pipeline
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

__all__ = ["load", "describe", "generate", "Pipeline", "CapabilityError", "default_model_dir", "find_tokenizer"]


def find_tokenizer(model_dir: Path) -> Optional[Path]:
    """`dir/tokenizer.json`, then `dir/tokenizer/tokenizer.json`; None if neither exists."""
    for cand in (model_dir / "tokenizer.json", model_dir / "tokenizer" / "tokenizer.json"):
        if cand.exists():
            return cand.parent
    return None


LOAD_OPTIONS = ("chat_format", "image_policy", "prefill_chunk", "vae", "quantize", "adapter")


def load(name_or_dir: Union[str, Path], device=None, dtype=None, tokenizer: Optional[Union[str, Path, Tokenizer]] = None,
         chat_format: Optional[str] = None, image_policy: Optional[str] = None, prefill_chunk: Optional[int] = 512,
         vae: Optional[Union[str, Path]] = None, quantize: Optional[str] = None,
         adapter: Optional[Union[str, Path]] = None) -> Pipeline:
    """Load a model folder of any supported format and return a `Pipeline`.

    Args:
        name_or_dir: a folder with config.json + weights (official DeepSeek-VL2 / Janus / JanusFlow,
            transformers deepseek_v2 / deepseek_v3 / llama / janus, or native mmstack), or a hub id
            `org/name[@revision]` resolved through the Hugging Face cache (`mmstack.hub`).
        device: "cpu", "cuda", ... (default: CUDA if available).
        dtype: torch dtype or name (default: bf16 on CUDA, fp32 on CPU).
        tokenizer: a folder / tokenizer.json / Tokenizer; default `dir/tokenizer.json` then `dir/tokenizer/`.
        chat_format: a named chat format ("janus-1.3b" for the original Janus role strings).
        image_policy: "official" (the official loaders: convert("RGB"), no EXIF) or "native".
        prefill_chunk: prompt tokens per prefill forward (long prompts are chunked).
        vae: the SDXL-type VAE folder (or hub id) JanusFlow decodes with, when it is not inside the model folder.
        quantize: "int8" or "int4" for weight-only quantization of the language model's linear and expert
            weights (inference only; `mmstack.quantize` says what is and is not quantized).
        adapter: a LoRA adapter folder (or hub id) in peft's format, as `mmstack finetune --save adapter`
            writes: merged into the base weights at load (before `quantize`, which then quantizes the merged
            weights), so the pipeline runs as fast as the base model.
    Returns:
        a Pipeline with `logits` and `complete`, plus the multimodal methods the checkpoint supports
        (`pipe.capabilities`).
    Raises:
        FileNotFoundError (`mmstack.hub.ModelNotFoundError`): no such folder or hub id; ConfigError /
            CheckpointError / TokenizerError for a bad folder; AdapterError for an adapter that is malformed or
            was trained on another model (naming the file and key).
    """
    d = resolve_model(name_or_dir)
    cfg = read_config(d)
    device = torch.device(device) if device is not None else default_device()
    adapter_dir = None if adapter is None else resolve_model(adapter, "adapter")
    model = load_model(d, device=device, dtype=resolve_dtype(dtype) or default_dtype(device), cfg=cfg,
                       quantize=quantize, adapter=adapter_dir)
    if isinstance(tokenizer, Tokenizer):
        tk = tokenizer
    elif tokenizer is not None:
        tk = Tokenizer.from_dir(tokenizer)
    else:
        found = find_tokenizer(d)
        tk = Tokenizer.from_dir(found) if found else None
    understanding = None
    if cfg.vision is not None:
        if tk is None:
            raise CapabilityError(f"{d}: an understanding model needs a tokenizer (tokenizer.json or tokenizer=)")
        understanding = Understanding(cfg, tk, chat_format=chat_format, image_policy=image_policy)
    elif chat_format is not None or image_policy is not None:
        raise TypeError("chat_format and image_policy apply to models with a vision tower")
    generation = None
    if cfg.vq_head is not None or cfg.flow_head is not None:
        chat = understanding.chat_cfg if understanding is not None else None
        vae_dir = None if vae is None else str(resolve_model(vae, "VAE"))
        generation = ImageGenerator(cfg, tk, chat, source=str(d), vae_path=vae_dir,
                                    device=model.device, dtype=model.dtype)
    elif vae is not None:
        raise TypeError("vae applies to models with a flow generation path")
    return Pipeline(model, tk, source=str(d), understanding=understanding, generation=generation,
                    prefill_chunk=prefill_chunk)


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

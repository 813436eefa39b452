"""The generation part of a pipeline: text-to-image on whichever path the checkpoint has (Janus VQ tokens,
JanusFlow rectified flow), with each family's official defaults: the prompt ids, the request checks, and the
decoding of codes / latents to PIL images. `mmstack.pipeline.Pipeline.generate` runs the sampling itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from PIL import Image

from mmstack.config import ModelConfig
from mmstack.errors import CapabilityError, GenerationError

from .vq import to_uint8

MAX_IMAGES_PER_CALL = 16


def generation_prompt_ids(tokenizer, chat, prompt: str, mode: str) -> list[int]:
    """The official generation prompt: chat template without system prompt + the start tag, with BOS."""
    tag = chat.image_start_tag if mode == "vq" else (chat.gen_tag or chat.image_start_tag)
    tokenizer.token_id(tag)  # a clear error if the tokenizer lacks it
    content = tokenizer.protect(prompt) if hasattr(tokenizer, "protect") else prompt  # user text stays text
    text = chat.prompt([{"role": "user", "content": content}], system_prompt="").strip() + tag
    return tokenizer.encode(text)


@dataclass
class ImageRequest:
    """A checked text-to-image request, ready for sampling."""

    mode: str  # "vq" | "flow"
    prompt_ids: list
    n: int
    seed: Optional[int]
    cfg_weight: float
    temperature: Optional[float]  # vq
    steps: Optional[int]  # flow
    image_tokens: int  # positions the image occupies after the prompt (VQ codes; flow t_emb + latent tokens)


class ImageGenerator:
    """Args:
        cfg: the model config (vq / vq_head or flow_* sections, and chat for the prompt).
        tokenizer: the model's tokenizer.
        chat: the chat format in use (the understanding part's, when the model has one).
        vae_path: where JanusFlow's SDXL-type VAE lives when it is not inside the model folder.
    """

    def __init__(self, cfg: ModelConfig, tokenizer, chat=None, source: Optional[str] = None,
                 vae_path: Optional[str] = None, device=None, dtype: Optional[torch.dtype] = None):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.device, self.dtype = torch.device(device or "cpu"), dtype or torch.float32
        self.chat = chat or cfg.chat
        self.source, self.vae_path = source, vae_path
        self._vae = None

    @property
    def modes(self) -> list[str]:
        return [m for m, part in (("vq", "vq_head"), ("flow", "flow_head")) if getattr(self.cfg, part) is not None]

    def prompt_ids(self, prompt: str, mode: str) -> list[int]:
        """`{user}: {prompt}\\n\\n{assistant}:` + the generation start tag, with BOS (no system prompt)."""
        if self.tokenizer is None:
            raise CapabilityError(f"{self.source}: generation needs a tokenizer")
        if self.chat is None:
            raise CapabilityError(f"{self.source}: the model has no chat format section for generation prompts")
        return generation_prompt_ids(self.tokenizer, self.chat, prompt, mode)

    def pad_id(self) -> int:
        return self.tokenizer.token_id(self.chat.pad_tag)

    def image_size(self, mode: str) -> int:
        return self.cfg.vq_head.image_size if mode == "vq" else self.cfg.flow_head.image_size

    def grid(self, mode: str) -> int:
        """Image tokens per side: VQ codes, or flow latent tokens."""
        if mode == "vq":
            return self.cfg.vq_head.image_size // self.cfg.vq.downsample
        fh = self.cfg.flow_head
        return fh.image_size // fh.vae_downsample // self.cfg.flow_encoder.stride

    def request(self, prompt: str, n: int = 1, seed: Optional[int] = None, cfg: Optional[float] = None,
                temperature: Optional[float] = None, steps: Optional[int] = None, size=None,
                mode: Optional[str] = None, max_images: int = MAX_IMAGES_PER_CALL) -> ImageRequest:
        """Check a request and build its prompt (see `Pipeline.generate` for the arguments).

        Raises:
            CapabilityError: no generation path, or the asked `mode` is not this model's.
            GenerationError: an empty prompt, n / cfg / temperature / steps / size out of range.
        """
        modes = self.modes
        if not modes:
            raise CapabilityError(f"{self.source or 'this model'} cannot generate images: it has no image-generation path")
        mode = mode or modes[0]
        if mode not in modes:
            raise CapabilityError(f"{self.source}: generation mode {mode!r} unavailable (this model has {modes})")
        if not isinstance(prompt, str) or not prompt.strip():
            raise GenerationError("empty prompt: describe the image to generate")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= max_images:
            raise GenerationError(f"n must be an integer in 1..{max_images}, got {n!r}")
        _check_number("cfg", cfg, 0.0, 1000.0)
        if mode == "vq":
            if steps is not None:
                raise GenerationError("steps applies to flow generation; the VQ path takes temperature")
            _check_number("temperature", temperature, 0.0, 100.0)
        else:
            if temperature is not None:
                raise GenerationError("temperature applies to VQ generation; the flow path takes steps")
            if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000):
                raise GenerationError(f"steps must be an integer in 1..1000, got {steps!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
            raise GenerationError(f"seed must be a non-negative integer, got {seed!r}")
        side = self.image_size(mode)
        if size is not None:
            w, h = (size, size) if isinstance(size, int) else tuple(size)
            if w != h:
                raise GenerationError(f"size must be square, got {w}x{h}")
            if w != side:
                raise GenerationError(f"this model generates {side}x{side} images only, got size={w}")
        ids = self.prompt_ids(prompt, mode)
        g = self.grid(mode)
        if mode == "vq":
            head = self.cfg.vq_head
            return ImageRequest("vq", ids, n, seed, head.cfg_weight if cfg is None else float(cfg),
                                head.temperature if temperature is None else float(temperature), None, g * g)
        fh = self.cfg.flow_head
        self.vae()  # before any sampling: a missing VAE fails fast
        return ImageRequest("flow", ids, n, seed, fh.cfg_weight if cfg is None else float(cfg), None,
                            fh.steps if steps is None else steps, g * g + 1)

    # ------------------------------------------------------------------------------ outputs
    @torch.no_grad()
    def decode_codes(self, vq, codes: torch.Tensor) -> list[Image.Image]:
        """VQ codes [n, N] -> n PIL images."""
        g = self.grid("vq")
        images = vq.decode_code(codes, shape=(codes.shape[0], vq.cfg.codebook_embed_dim, g, g))
        return [Image.fromarray(a.numpy()) for a in to_uint8(images)]

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> list[Image.Image]:
        """Flow latents [n, C, H, W] -> n PIL images through the VAE."""
        from .vae import decode_latents

        images = decode_latents(self.vae(), z).clamp(-1, 1)
        return [Image.fromarray(a.numpy()) for a in to_uint8(images)]

    def vae(self):
        """The JanusFlow VAE: `load(..., vae=DIR)`, else one found in the model folder."""
        if self._vae is None:
            from .vae import find_vae, load_vae

            where = self.vae_path or self.source
            if where is None or find_vae(Path(where)) is None:
                raise CapabilityError(
                    f"{self.source}: JanusFlow decodes latents with an SDXL-type VAE, and none was found; put it in "
                    "the model folder (vae/config.json + vae/diffusion_pytorch_model.safetensors) or pass vae=DIR to load"
                )
            self._vae = load_vae(where, device=self.device, dtype=self.dtype)
        return self._vae


def _check_number(name: str, value, lo: float, hi: float) -> None:
    import math

    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not lo <= value <= hi:
        raise GenerationError(f"{name} must be a number in {lo:g}..{hi:g}, got {value!r}")

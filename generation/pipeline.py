"""`generate(prompt)`: text-to-image on whichever path the checkpoint has (Janus VQ tokens, JanusFlow
rectified flow), with each family's official defaults, returning PIL images."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
from PIL import Image

from mmstack.api import CapabilityError, Pipeline
from mmstack.decoding import GenerationError

from .vq import to_uint8

MAX_IMAGES_PER_CALL = 16


def generation_prompt_ids(tokenizer, chat, prompt: str, mode: str) -> list[int]:
    """The official generation prompt: chat template without system prompt + the start tag, with BOS."""
    tag = chat.image_start_tag if mode == "vq" else (chat.gen_tag or chat.image_start_tag)
    tokenizer.token_id(tag)  # a clear error if the tokenizer lacks it
    text = chat.prompt([{"role": "user", "content": prompt}], system_prompt="").strip() + tag
    return tokenizer.encode(text)


class GenerationMixin:
    """Adds `generate` to a Pipeline whose model has a VQ (`vq_head`) or flow (`flow_head`) path."""

    max_images_per_call = MAX_IMAGES_PER_CALL
    vae_path: Optional[str] = None
    _vae = None

    @property
    def generation_modes(self) -> list[str]:
        return [m for m, part in (("vq", "vq_head"), ("flow", "flow_head")) if self.model.has_part(part)]

    def _gen_chat(self):
        chat = getattr(self, "chat_cfg", None) or self.model.cfg.parts.get("chat")
        if chat is None:
            raise CapabilityError(f"{self.source}: the model has no chat format section for generation prompts")
        return chat

    def generation_prompt_ids(self, prompt: str, mode: str) -> list[int]:
        """`{user}: {prompt}\\n\\n{assistant}:` + the generation start tag, with BOS (no system prompt)."""
        if self.tokenizer is None:
            raise CapabilityError(f"{self.source}: generation needs a tokenizer")
        return generation_prompt_ids(self.tokenizer, self._gen_chat(), prompt, mode)

    def _check(self, prompt, n, cfg, temperature, steps, size, image_size):
        if not isinstance(prompt, str) or not prompt.strip():
            raise GenerationError("empty prompt: describe the image to generate")
        if not isinstance(n, int) or not 1 <= n <= self.max_images_per_call:
            raise GenerationError(f"n must be an integer in 1..{self.max_images_per_call}, got {n!r}")
        if cfg is not None and cfg < 0:
            raise GenerationError(f"cfg must be >= 0, got {cfg}")
        if temperature is not None and temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {temperature}")
        if steps is not None and (not isinstance(steps, int) or not 1 <= steps <= 1000):
            raise GenerationError(f"steps must be an integer in 1..1000, got {steps!r}")
        if size is not None:
            w, h = (size, size) if isinstance(size, int) else tuple(size)
            if w != h:
                raise GenerationError(f"size must be square, got {w}x{h}")
            if w != image_size:
                raise GenerationError(f"this model generates {image_size}x{image_size} images only, got size={w}")

    def generate(self, prompt: str, n: int = 1, seed: Optional[int] = None, cfg: Optional[float] = None,
                 temperature: Optional[float] = None, steps: Optional[int] = None, size=None,
                 mode: Optional[str] = None, progress: Optional[Callable[[int, int], None]] = None) -> list[Image.Image]:
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
        """
        modes = self.generation_modes
        if not modes:
            raise CapabilityError(f"{self.source or 'this model'} cannot generate images: it has no image-generation path")
        mode = mode or modes[0]
        if mode not in modes:
            raise CapabilityError(f"{self.source}: generation mode {mode!r} unavailable (this model has {modes})")
        if mode == "vq":
            return self._generate_vq(prompt, n, seed, cfg, temperature, steps, size, progress)
        return self._generate_flow(prompt, n, seed, cfg, temperature, steps, size, progress)

    def _context_check(self, ids: list[int], extra: int) -> None:
        limit = self.model.cfg.language.max_position_embeddings
        if len(ids) > self.prompt_token_limit() and self.prompt_token_limit() < limit:
            raise GenerationError(f"the prompt has {len(ids)} tokens; "
                                  f"the limit is max_prompt_tokens={self.prompt_token_limit()}")
        if len(ids) + extra > limit:
            raise GenerationError(f"prompt ({len(ids)} tokens) + {extra} image tokens exceeds the context ({limit})")

    def _generate_vq(self, prompt, n, seed, cfg, temperature, steps, size, progress):
        from .sampler import generate_codes

        head = self.model.cfg.parts["vq_head"]
        vq = self.model.vq
        grid = head.image_size // vq.cfg.downsample
        self._check(prompt, n, cfg, temperature, None, size, head.image_size)
        if steps is not None:
            raise GenerationError("steps applies to flow generation; the VQ path takes temperature")
        ids = self.generation_prompt_ids(prompt, "vq")
        self._context_check(ids, grid * grid)
        pad = self.tokenizer.token_id(self._gen_chat().pad_tag)
        codes = generate_codes(self.model, ids, n, grid * grid, pad, head.cfg_weight if cfg is None else cfg,
                               head.temperature if temperature is None else temperature, seed, head.image_top_k,
                               head.row_layout, head.uncond, progress=progress)
        with torch.no_grad():
            images = vq.decode_code(codes, shape=(n, vq.cfg.codebook_embed_dim, grid, grid))
        return [Image.fromarray(a.numpy()) for a in to_uint8(images)]

    def _generate_flow(self, prompt, n, seed, cfg, temperature, steps, size, progress):
        from .flow import generate_latents
        from .vae import decode_latents

        fh = self.model.cfg.parts["flow_head"]
        self._check(prompt, n, cfg, None, steps, size, fh.image_size)
        if temperature is not None:
            raise GenerationError("temperature applies to VQ generation; the flow path takes steps")
        vae = self.vae()  # before the loop: a missing VAE fails fast
        ids = self.generation_prompt_ids(prompt, "flow")
        g = fh.image_size // fh.vae_downsample // self.model.cfg.parts["flow_encoder"].stride
        self._context_check(ids, g * g + 1)
        pad = self.tokenizer.token_id(self._gen_chat().pad_tag)
        z = generate_latents(self.model, ids, n, pad, fh.steps if steps is None else steps,
                             fh.cfg_weight if cfg is None else cfg, seed, progress=progress)
        images = decode_latents(vae, z).clamp(-1, 1)
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
            self._vae = load_vae(where, device=self.device, dtype=self.model.dtype)
        return self._vae


class GenerationPipeline(GenerationMixin, Pipeline):
    """A Pipeline for a model that generates images but has no understanding path."""


def _factory(model, tokenizer, source, **options):
    if not (model.has_part("vq_head") or model.has_part("flow_head")):
        return None
    vae = options.pop("vae", None)
    if model.has_part("vision"):
        from mmstack.vision.pipeline import UnderstandingPipeline

        cls = type("MultimodalPipeline", (GenerationMixin, UnderstandingPipeline), {})
        pipe = cls(model, tokenizer, source, **options)
    else:
        if options:
            raise TypeError(f"unknown load options {sorted(options)}")
        pipe = GenerationPipeline(model, tokenizer, source)
    pipe.vae_path = str(vae) if vae is not None else None
    return pipe


def register() -> None:
    from mmstack.api import PIPELINE_FACTORIES

    if _factory not in PIPELINE_FACTORIES:
        PIPELINE_FACTORIES.insert(0, _factory)

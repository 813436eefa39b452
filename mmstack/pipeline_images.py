"""The text-to-image methods of `mmstack.pipeline.Pipeline`, on its generation part and engine (Janus VQ codes
with CFG, JanusFlow rectified flow). A mixin: it uses the pipeline's attributes and nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from mmstack.generation.flow import flow_prompt
from mmstack.generation.sampler import cfg_rows

from .engine import FlowImageRequest, Handle, VQImageRequest
from .errors import CapabilityError


@dataclass
class ImageJob:
    """A submitted text-to-image request: `handle` (progress events, cancel) and `images()` (waits, decodes)."""

    handle: Handle
    mode: str
    pipe: object

    def images(self, result=None) -> list:
        result = result if result is not None else self.handle.result()
        g = self.pipe.generation
        if self.mode == "vq":
            return g.decode_codes(self.pipe.model.vq, result.codes)
        return g.decode_latents(result.latents)


class ImagesMixin:
    @property
    def generation_modes(self) -> list[str]:
        return self.generation.modes if self.generation is not None else []

    def _generation(self):
        if self.generation is None:
            raise CapabilityError(f"{self.source or 'this model'} cannot generate images: it has no image-generation path")
        return self.generation

    def generation_prompt_ids(self, prompt: str, mode: str) -> list[int]:
        """The official generation prompt ids (`{user}: {prompt}\\n\\n{assistant}:` + the start tag, with BOS)."""
        return self._generation().prompt_ids(prompt, mode)

    def vae(self):
        """JanusFlow's VAE (`load(..., vae=DIR)`, else found in the model folder)."""
        return self._generation().vae()

    def submit_generate(self, prompt: str, n: int = 1, seed: Optional[int] = None, cfg: Optional[float] = None,
                        temperature: Optional[float] = None, steps: Optional[int] = None, size=None,
                        mode: Optional[str] = None) -> ImageJob:
        """Check a text-to-image request and submit it to the engine (arguments as `generate`)."""
        g = self._generation()
        if isinstance(prompt, str):
            self.check_prompt_chars([{"role": "user", "content": prompt}])
        req = g.request(prompt, n, seed, cfg, temperature, steps, size, mode, max_images=self.max_images_per_call)
        self.check_prompt_length(len(req.prompt_ids), req.image_tokens, what="image tokens")
        self.check_vocab(req.prompt_ids)
        if req.mode == "vq":
            head = self.cfg.vq_head
            rows = cfg_rows(req.prompt_ids, n, g.pad_id(), head.row_layout, head.uncond)
            request = VQImageRequest(rows, n, req.image_tokens, req.cfg_weight, req.temperature, seed,
                                     head.image_top_k, head.row_layout)
        else:
            rows, mask = flow_prompt(req.prompt_ids, n, g.pad_id())
            fh = self.cfg.flow_head
            side = fh.image_size // fh.vae_downsample
            gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
            z0 = torch.randn(n, fh.latent_channels, side, side, generator=gen)
            request = FlowImageRequest(rows, mask, n, req.steps, req.cfg_weight, z0, req.image_tokens)
        return ImageJob(self._run([request])[0], req.mode, self)

    def generate(self, prompt: str, n: int = 1, seed: Optional[int] = None, cfg: Optional[float] = None,
                 temperature: Optional[float] = None, steps: Optional[int] = None, size=None,
                 mode: Optional[str] = None, progress: Optional[Callable[[int, int], None]] = None):
        """Generate `n` images for `prompt`.

        Args:
            seed: same seed -> same images on a given device (alone or batched with other requests).
            cfg: classifier-free guidance weight (Janus 5.0, JanusFlow 2.0 by default).
            temperature: VQ path only (default 1.0; 0 = greedy codes).
            steps: flow path only (Euler steps, default 30).
            size: the model's native square size only (384 for the released models).
            mode: "vq" or "flow" when a model has both (default: the first available).
            progress: called as progress(done, total) during generation.
        Returns:
            a list of n PIL RGB images.
        Raises:
            CapabilityError: the model has no (such) generation path; GenerationError: a bad request;
            EngineBusy: the engine's queue is full.
        """
        job = self.submit_generate(prompt, n, seed, cfg, temperature, steps, size, mode)
        try:
            for ev in job.handle:
                if progress is not None:
                    progress(ev.done, ev.total)
        finally:
            job.handle.cancel()  # an interrupted caller frees the rows
        return job.images()

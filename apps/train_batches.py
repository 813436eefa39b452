"""Training batches: examples turned into the inputs of each fine-tuning task through the pipeline's own
processors (understanding: tokens, images, assistant mask; vq: prompts with condition dropout and image
codes; flow: prompts and VAE latents; vq_tokenizer: pixels).

The model math lives next to what it mirrors: the processors (`Understanding.prepare_tagged`) and the
generation batch pieces (`mmstack.generation.batches`); this module only picks examples' fields.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from mmstack.generation.batches import dropout_prompts, generation_pixels, vae_latents

from .train_args import TrainArgs


class Batcher:
    """Turns examples into model batches for each task, through the pipeline's own parts: the understanding
    part's processor (tokens, images, assistant mask) and the generation batch pieces
    (`mmstack.generation.batches`: condition dropout rows, [-1, 1] pixels, VAE latents)."""

    def __init__(self, pipe, args: TrainArgs):
        self.pipe, self.args = pipe, args
        self.model = pipe.model
        self._codes: dict = {}

    def understanding(self, examples):
        """A training `MultimodalBatch` (assistant mask included) of the examples' conversations."""
        batch, _ = self.pipe.understanding.prepare_tagged([ex.messages for ex in examples],
                                                          [ex.images for ex in examples])
        return batch.to(self.pipe.device)

    def _prompts(self, examples, mode: str, gen: torch.Generator):
        gp = self.pipe.generation
        drop = (torch.rand(len(examples), generator=gen) < self.args.prompt_dropout).tolist()
        ids, mask = dropout_prompts([gp.prompt_ids(ex.prompt, mode) for ex in examples], drop, gp.pad_id(), mode)
        return ids.to(self.pipe.device), mask.to(self.pipe.device)

    def pixels(self, examples, mode: str) -> torch.Tensor:
        """The examples' first images as [B, 3, S, S] pixels in [-1, 1] at the generation size."""
        from mmstack.vision import image_io

        size = self.pipe.generation.image_size(mode)
        policy = self.pipe.policy if self.pipe.understanding is not None else image_io.NATIVE
        return torch.stack([generation_pixels(image_io.load_image(ex.images[0], policy), size) for ex in examples])

    def flow(self, examples, gen: torch.Generator):
        ids, mask = self._prompts(examples, "flow", gen)
        return ids, mask, vae_latents(self.pipe.generation.vae(), self.pixels(examples, "flow")), gen

    def codes(self, examples) -> "ImageCodes":
        missing = [ex for ex in examples if ex.id not in self._codes]
        pixels = self.pixels(missing, "vq") if missing else None
        return ImageCodes([ex.id for ex in examples], pixels, self._codes, self.pipe.device)

    def vq(self, examples, gen: torch.Generator):
        ids, mask = self._prompts(examples, "vq", gen)
        return ids, mask, self.codes(examples)


@dataclass
class ImageCodes:
    """The VQ codes of a batch's images: those encoded before (`cache`, by example id) and the pixels of
    the rest [M,3,S,S], which `LossModule.forward` encodes: only there does FSDP hold the VQ weights whole."""

    keys: list
    pixels: Optional[torch.Tensor]
    cache: dict
    device: torch.device

    @torch.no_grad()
    def resolve(self, model) -> torch.Tensor:
        """Encode what is missing (adding it to the cache); returns codes [B, N]."""
        missing = [k for k in self.keys if k not in self.cache]
        if missing:
            with torch.autocast(self.device.type, enabled=False):  # the codes do not depend on --dtype
                _, idx = model.vq.encode(self.pixels.to(self.device, model.dtype))
            for k, c in zip(missing, idx.view(len(missing), -1).cpu()):
                self.cache[k] = c
        return torch.stack([self.cache[k] for k in self.keys]).to(self.device)


def make_batch(batcher: Batcher, task: str, examples, gen: torch.Generator):
    """The batch of `task` for `examples`, in the form `LossModule.forward` takes for that task."""
    if task == "understanding":
        return batcher.understanding(examples)
    if task == "vq":
        return batcher.vq(examples, gen)
    if task == "vq_tokenizer":
        return batcher.pixels(examples, "vq").to(batcher.pipe.device)
    if task == "flow":
        return batcher.flow(examples, gen)
    raise ValueError(task)

"""Training batches: examples turned into the inputs of each fine-tuning task through the pipeline's own
processors (understanding: tokens, images, assistant mask; vq: prompts with condition dropout and image
codes; flow: prompts and VAE latents; vq_tokenizer: pixels).

One cohesive class, `Batcher`, so that its model math (pixel normalisation, VAE scaling, dropout rows) can
move next to the processors and samplers it mirrors in one step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .train_args import TrainArgs


class Batcher:
    """Turns examples into model batches for each task, through the pipeline's own processors."""

    def __init__(self, pipe, args: TrainArgs):
        self.pipe, self.args = pipe, args
        self.model = pipe.model
        self._codes: dict = {}

    # understanding ---------------------------------------------------------------------------
    def understanding(self, examples) -> dict:
        from mmstack.vision import image_io

        pipe = self.pipe
        images = [image_io.load_images(ex.images, pipe.policy) for ex in examples]
        tag = pipe.chat_cfg.image_tag
        convs = [[{"role": m["role"], "content": m["content"].replace("<image>", tag)} for m in ex.messages]
                 for ex in examples]
        if pipe.ip.kind == "vl2_tiling":
            batch = pipe.processor(convs, images, inference_mode=False)
        else:
            batch = self._janus(convs, images)
        return {k: (v.to(pipe.device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def _janus(self, convs, images) -> dict:
        """Janus-style string template: assistant spans from tokenising prefixes (checked to be stable)."""
        proc = self.pipe.processor
        batch = proc(convs, images)
        mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        for b, conv in enumerate(convs):
            full = proc.tokens(conv)
            t = batch["input_ids"].shape[1]
            off = t - len(full)
            for k, m in enumerate(conv):
                if m["role"] != "assistant":
                    continue
                before = proc.tokens(conv[:k])  # ends with "{assistant}:" (a generation prompt)
                upto = proc.tokens(conv[: k + 1])
                if upto[: len(before)] != before:
                    raise ValueError("the chat template does not tokenise prefix-stably; cannot mask assistant turns")
                mask[b, off + len(before) : off + len(upto)] = True
        batch["assistant_mask"] = mask
        return batch

    # generation ------------------------------------------------------------------------------
    def flow(self, examples, gen: torch.Generator):
        drop = torch.rand(len(examples), generator=gen) < self.args.prompt_dropout
        ids, mask = self._prompts([ex.prompt for ex in examples], "flow", drop)
        return ids, mask, self.latents(examples), gen

    @torch.no_grad()
    def latents(self, examples) -> torch.Tensor:
        vae = self.pipe.vae()
        size = self.model.cfg.parts["flow_head"].image_size
        x = torch.stack([self._pixels(ex.images[0], size) for ex in examples]).to(self.pipe.device)
        p = next(vae.parameters())
        return vae.encode(x.to(p.dtype)).latent_dist.mean.float() * vae.config.scaling_factor

    def _prompts(self, prompts: list[str], mode: str, drop: torch.Tensor):
        from mmstack.generation.pipeline import generation_prompt_ids

        pipe = self.pipe
        chat = pipe._gen_chat()
        pad = pipe.tokenizer.token_id(chat.pad_tag)
        seqs = []
        masks = []
        for p, d in zip(prompts, drop.tolist()):
            ids = generation_prompt_ids(pipe.tokenizer, chat, p, mode)
            m = [1] * len(ids)
            if d and mode == "vq":  # condition dropout = the unconditional rows of sampling (pads attended)
                ids = [ids[0]] + [pad] * (len(ids) - 2) + [ids[-1]]
            elif d:  # JanusFlow: everything after BOS is pad and masked out
                ids = [ids[0]] + [pad] * (len(ids) - 1)
                m = [1] + [0] * (len(ids) - 1)
            seqs.append(ids)
            masks.append(m)
        t = max(map(len, seqs))
        ids = torch.full((len(seqs), t), pad, dtype=torch.long)
        mask = torch.zeros(len(seqs), t, dtype=torch.long)
        for i, (s, m) in enumerate(zip(seqs, masks)):
            ids[i, t - len(s):] = torch.tensor(s)
            mask[i, t - len(s):] = torch.tensor(m)
        return ids.to(pipe.device), mask.to(pipe.device)

    def _pixels(self, path: str, size: int) -> torch.Tensor:
        from PIL import Image

        from mmstack.vision import image_io

        img = image_io.load_image(path, self.pipe.policy).resize((size, size), Image.BICUBIC)
        x = torch.from_numpy(__import__("numpy").asarray(img, dtype="float32")).permute(2, 0, 1) / 127.5 - 1
        return x

    def codes(self, examples) -> "ImageCodes":
        size = self.model.cfg.parts["vq_head"].image_size
        missing = [ex for ex in examples if ex.id not in self._codes]
        pixels = torch.stack([self._pixels(ex.images[0], size) for ex in missing]) if missing else None
        return ImageCodes([ex.id for ex in examples], pixels, self._codes, self.pipe.device)

    def vq(self, examples, gen: torch.Generator):
        drop = torch.rand(len(examples), generator=gen) < self.args.prompt_dropout
        ids, mask = self._prompts([ex.prompt for ex in examples], "vq", drop)
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
        size = batcher.model.cfg.parts["vq_head"].image_size
        return torch.stack([batcher._pixels(ex.images[0], size) for ex in examples]).to(batcher.pipe.device)
    if task == "flow":
        return batcher.flow(examples, gen)
    raise ValueError(task)

"""Janus / Janus-Pro / JanusFlow understanding inputs: one square view per image and the prompt with
`<image_placeholder>` expanded to BOI + N placeholders + EOI.

Pixels follow the official `VLMImageProcessor`: resize the long side to S (torchvision bicubic with
antialias; short side `max(int(s / long * S), min_size)`), paste centred on an S x S canvas of the mean
colour (`expand2square`), then x/255 and (x - mean)/std. JanusFlow also splices its `begin_embed` at BOI.

Notation: B batch, T tokens, n images, N image tokens per image, S image side.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from mmstack.batch import MultimodalBatch
from mmstack.chat import ChatConfig
from mmstack.errors import GenerationError
from mmstack.tokenizer import Tokenizer


def square_pad(img: Image.Image, size: int, min_size: int, background: tuple) -> Image.Image:
    import torchvision.transforms.functional as TF

    w, h = img.size
    m = max(w, h)
    new_hw = [max(int(h / m * size), min_size), max(int(w / m * size), min_size)]
    img = TF.resize(img, new_hw, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), background)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


class JanusProcessor:
    def __init__(self, tokenizer: Tokenizer, chat: ChatConfig, image_size: int, mean: Sequence[float],
                 std: Sequence[float], min_size: int = 14, begin_embed: bool = False):
        self.tk, self.chat = tokenizer, chat
        self.size, self.min_size = image_size, min_size
        self.mean = np.asarray(mean, dtype=np.float32)[:, None, None]
        self.std = np.asarray(std, dtype=np.float32)[:, None, None]
        self.background = tuple(int(m * 255) for m in mean)
        self.begin_embed = begin_embed  # JanusFlow: BOI's slot takes the learned begin embedding
        self.image_id = tokenizer.token_id(chat.image_tag)
        self.boi_id = tokenizer.token_id(chat.image_start_tag)
        self.eoi_id = tokenizer.token_id(chat.image_end_tag)
        self.pad_id = tokenizer.token_id(chat.pad_tag)

    def pixels(self, img: Image.Image) -> torch.Tensor:
        """RGB PIL image -> [3, S, S] float32."""
        x = np.asarray(square_pad(img, self.size, self.min_size, self.background), dtype=np.uint8)
        x = (x.transpose(2, 0, 1).astype(np.float64) / 255.0).astype(np.float32)
        return torch.from_numpy((x - self.mean) / self.std)

    def tokens(self, messages: list[dict], system_prompt=None, max_prompt_tokens: Optional[int] = None) -> list[int]:
        """Token ids of a conversation whose text contains one image tag per image.

        Raises:
            ValueError: malformed messages (`ChatConfig.prompt`).
            GenerationError: more than `max_prompt_tokens` ids once every tag is expanded to its image span; checked
                before the span is built (each tag becomes `num_image_tokens + 2` ids).
        """
        ids = self.tk.encode(self.chat.prompt(messages, system_prompt).strip())
        n = self.chat.num_image_tokens
        total = len(ids) + ids.count(self.image_id) * (n + 1)
        if max_prompt_tokens is not None and total > max_prompt_tokens:
            raise GenerationError(f"the prompt has {total} tokens (image tokens included); "
                                  f"the limit is {max_prompt_tokens}")
        out: list[int] = []
        for t in ids:
            out.extend([self.boi_id] + [self.image_id] * n + [self.eoi_id] if t == self.image_id else [t])
        return out

    def __call__(self, conversations: Sequence[list[dict]], images: Sequence[Sequence[Image.Image]],
                 system_prompt=None, max_prompt_tokens: Optional[int] = None) -> dict:
        """A batch of conversations (left padded) with their images in tag order.

        Returns input_ids / attention_mask [B,T], pixel_values [B,n,3,S,S], images_seq_mask [B,T],
        images_emb_mask [B,n,K] (K = N, or N + 1 with the begin embedding).
        Raises:
            ValueError: malformed messages or a number of tags different from the images.
            GenerationError: a conversation longer than `max_prompt_tokens` (see `tokens`).
        """
        seqs = [self.tokens(c, system_prompt, max_prompt_tokens) for c in conversations]
        n_max = max((len(i) for i in images), default=0)
        for k, (s, ims) in enumerate(zip(seqs, images)):
            have = s.count(self.boi_id) if self.chat.num_image_tokens else 0
            if have != len(ims):
                raise ValueError(f"conversation {k} has {have} image tags ({self.chat.image_tag}) but {len(ims)} images")
        b, t = len(seqs), max(len(s) for s in seqs)
        k = self.chat.num_image_tokens + (1 if self.begin_embed else 0)
        ids = torch.full((b, t), self.pad_id, dtype=torch.long)
        mask = torch.zeros(b, t, dtype=torch.long)
        pix = torch.zeros(b, n_max, 3, self.size, self.size)
        emb_mask = torch.zeros(b, n_max, k, dtype=torch.bool)
        for i, (s, ims) in enumerate(zip(seqs, images)):
            ids[i, t - len(s):] = torch.tensor(s)
            mask[i, t - len(s):] = 1
            for j, im in enumerate(ims):
                pix[i, j] = self.pixels(im)
                emb_mask[i, j] = True
        seq_mask = ids == self.image_id
        if self.begin_embed:
            seq_mask |= ids == self.boi_id
        seq_mask &= mask.bool()
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pix, "images_seq_mask": seq_mask,
                "images_emb_mask": emb_mask}

    def batch(self, conversations: Sequence[list[dict]], images: Sequence[Sequence[Image.Image]], system_prompt=None,
              max_prompt_tokens: Optional[int] = None, training: bool = False) -> MultimodalBatch:
        """A left-padded `MultimodalBatch`; with `training`, it carries the assistant mask (`assistant_mask`)."""
        out = self(conversations, images, system_prompt, max_prompt_tokens)
        batch = MultimodalBatch.from_janus(out["input_ids"], out["pixel_values"], out["images_seq_mask"],
                                           out["images_emb_mask"], out["attention_mask"])
        if training:
            t = out["input_ids"].shape[1]
            batch.assistant_mask = torch.stack([self.assistant_mask(c, t, system_prompt) for c in conversations])
        return batch

    def assistant_mask(self, conversation: list[dict], length: int, system_prompt=None) -> torch.Tensor:
        """[length] bool, True on each assistant answer and its end token, for a conversation left-padded to
        `length`. The "deepseek" template is a string template: answer spans come from tokenising the
        prefixes up to and after each answer, checked to tokenise stably."""
        full = self.tokens(conversation, system_prompt)
        off = length - len(full)
        mask = torch.zeros(length, dtype=torch.bool)
        for k, m in enumerate(conversation):
            if m["role"] != "assistant":
                continue
            before = self.tokens(conversation[:k], system_prompt)  # ends with "{assistant}:" (a generation prompt)
            upto = self.tokens(conversation[: k + 1], system_prompt)
            if upto[: len(before)] != before:
                raise ValueError("the chat template does not tokenise prefix-stably; cannot mask assistant turns")
            mask[off + len(before): off + len(upto)] = True
        return mask

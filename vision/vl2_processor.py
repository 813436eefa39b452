"""DeepSeek-VL2 processor: chat template, `<image>` token spans and batched tiles.

Token-for-token the official `DeepseekVLV2Processor` (`format_messages_v2`, `tokenize_with_images`,
`batchify`, sft_format "deepseek") in
https://github.com/deepseek-ai/DeepSeek-VL2/blob/ef9f91e2/deepseek_vl2/models/processing_deepseek_vl_v2.py

# B batch, T tokens, N tiles per sample (global + locals of every image), S tile side, I images,
# tw x th local tiles of one image, h = w tokens per tile side.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

import torch
from PIL import Image

from mmstack.batch import MultimodalBatch
from mmstack.tokenizer import Tokenizer

from .tiling import TilingConfig, tile_image

Message = dict  # {"role": "<|User|>" | "user" | "<|Assistant|>" | "assistant" | "system", "content": str}
Conversation = Union[str, Sequence[Message]]  # a str is a raw prompt, tokenized without the template

USER, ASSISTANT = "<|User|>", "<|Assistant|>"  # roles of the official "deepseek" conversation template
SEP = "\n\n"  # template sep after a user turn; sep2 (after an assistant turn) is the EOS token


@dataclass
class VL2Tokens:
    """One sample's token layout, computed from image sizes only (no pixels)."""

    input_ids: list[int] = field(default_factory=list)  # [T]
    images_seq_mask: list[bool] = field(default_factory=list)  # [T], True on every image-span slot
    images_spatial_crop: list[tuple[int, int]] = field(default_factory=list)  # [I] of (tw, th)
    num_image_tokens: list[int] = field(default_factory=list)  # [I]
    assistant_mask: list[bool] = field(default_factory=list)  # [T], True on assistant content + its EOS


class VL2Processor:
    """Conversation + PIL images -> DeepSeek-VL2 model inputs.

    Args:
        tokenizer: `mmstack.tokenizer.Tokenizer` holding `<image>`, `<|User|>`, `<|Assistant|>`.
        tiling_config: processor settings (`TilingConfig.from_processor_config`).
        image_token: the placeholder in the text, and the id every image-span slot holds.

    Examples:
        >>> proc = VL2Processor.from_pretrained("golden/vl2_tiny_mla_moe", "golden/vl2_tokenizer")  # doctest: +SKIP
        >>> conv = [{"role": "user", "content": "<image>\\nDescribe."}, {"role": "assistant", "content": ""}]
        >>> out = proc(conv, [img])  # doctest: +SKIP
        >>> out["input_ids"].shape, out["images"].shape  # doctest: +SKIP
        (torch.Size([1, T]), torch.Size([1, 1 + tw*th, 3, S, S]))
    """

    def __init__(self, tokenizer: Tokenizer, tiling_config: TilingConfig, image_token: str = "<image>"):
        self.tokenizer, self.cfg, self.image_token = tokenizer, tiling_config, image_token
        self.image_token_id = tokenizer.token_id(image_token)
        for role in (USER, ASSISTANT):
            tokenizer.token_id(role)  # raises if the tokenizer lacks the chat tokens
        missing = [n for n in ("bos_id", "eos_id", "pad_id") if getattr(tokenizer, n) is None]
        if missing:
            raise ValueError(f"VL2Processor: tokenizer {tokenizer.source} has no {', '.join(missing)}")

    @classmethod
    def from_pretrained(cls, model_dir: Union[str, Path], tokenizer_dir: Union[str, Path, None] = None):
        """Read `model_dir/processor_config.json` and the tokenizer (default: `model_dir`)."""
        cfg = json.loads((Path(model_dir) / "processor_config.json").read_text(encoding="utf-8"))
        if cfg.get("sft_format", "deepseek") != "deepseek":
            raise ValueError(f"{model_dir}: only sft_format 'deepseek' is supported, got {cfg['sft_format']!r}")
        tok = Tokenizer.from_dir(tokenizer_dir if tokenizer_dir is not None else model_dir)
        return cls(tok, TilingConfig.from_processor_config(cfg), cfg.get("image_token", "<image>"))

    # ------------------------------------------------------------------------------ tokens (no pixels)
    def image_span_len(self, tw: int, th: int) -> int:
        """Slots of one image: global h rows of (w + 1 newline), 1 view separator, th*h rows of (tw*w + 1); a
        global view alone (0, 0, `TilingConfig.single_tile_global_only`) has no local rows."""
        h = w = self.cfg.tokens_per_side
        return h * (w + 1) + 1 + (th * h) * (tw * w + 1)

    def tokenize(self, conversation: Conversation, image_sizes: Sequence[tuple[int, int]],
                 inference_mode: bool = True) -> VL2Tokens:
        """Token layout of one conversation whose images have sizes `image_sizes` ((w, h) each).

        A final empty assistant turn is the generation prompt: with `inference_mode` the trailing EOS
        is dropped (official `process_one`). A raw prompt string gets BOS and, outside inference
        mode, EOS, with no template.
        Raises:
            ValueError: a message that is not a dict with `role` and `content`, unknown role, misplaced
                system message, `<image>` outside user turns, an image size that is not two positive
                integers, or a number of `<image>` tags different from `len(image_sizes)`.
        """
        for size in image_sizes:
            if (not isinstance(size, (tuple, list)) or len(size) != 2
                    or not all(isinstance(v, int) and v > 0 for v in size)):
                raise ValueError(f"VL2Processor: an image size must be (width, height) > 0, got {size!r:.40}")
        if isinstance(conversation, str):
            turns = [(conversation, True, True)]  # (text, images allowed, EOS after)
        else:
            turns = self._turns(conversation)
        n_tags = sum(text.count(self.image_token) for text, _, _ in turns)
        if n_tags != len(image_sizes):
            raise ValueError(f"VL2Processor: the conversation has {n_tags} {self.image_token} tag(s) "
                             f"but {len(image_sizes)} image(s) were given")
        cropping = len(image_sizes) <= 2  # official: tiling only for at most 2 images per conversation
        out, sizes = VL2Tokens(), iter(image_sizes)
        self._add(out, [self.tokenizer.bos_id], False)
        for text, _, eos in turns:
            answer = eos and not isinstance(conversation, str)  # assistant turns end with EOS
            for k, piece in enumerate(text.split(self.image_token)):
                if k:
                    tw, th = self.cfg.tiles_for(next(sizes), cropping)
                    n = self.image_span_len(tw, th)
                    self._add(out, [self.image_token_id] * n, True)
                    out.images_spatial_crop.append((tw, th))
                    out.num_image_tokens.append(n)
                self._add(out, self.tokenizer.encode(piece, bos=False), False, answer)
            if eos:
                self._add(out, [self.tokenizer.eos_id], False, answer)
        if inference_mode and out.input_ids[-1] == self.tokenizer.eos_id and len(out.input_ids) > 1:
            out.input_ids.pop()
            out.images_seq_mask.pop()
            out.assistant_mask.pop()
        return out

    def _turns(self, messages: Sequence[Message]) -> list[tuple[str, bool, bool]]:
        """Messages -> (text, images allowed, EOS after) per turn, as `format_messages_v2` builds them."""
        turns = []
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise ValueError(f"VL2Processor: a conversation is a str or a list of messages, "
                             f"got {type(messages).__name__}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"VL2Processor: message {i} must be a dict with 'role' and 'content', got {m!r:.80}")
            role, content = m["role"], str(m["content"]).strip()
            if role in (USER, "user"):
                # template get_prompt(): "role: msg" + sep for a non-empty message, bare "role:" otherwise
                turns.append((f"{USER}: {content}{SEP}{ASSISTANT}:" if content else f"{USER}:{ASSISTANT}:", True, False))
            elif role in (ASSISTANT, "assistant", "system", "deepseekapi-sys"):
                if role in ("system", "deepseekapi-sys") and i != 0:
                    raise ValueError(f"VL2Processor: a system message may only be the first message (got it at {i})")
                if self.image_token in content:
                    raise ValueError(f"VL2Processor: {self.image_token} may only appear in user turns, not {role!r}")
                turns.append((content, False, role in (ASSISTANT, "assistant")))
            else:
                raise ValueError(f"VL2Processor: unknown role {role!r}")
        return turns

    @staticmethod
    def _add(out: VL2Tokens, ids: list[int], is_image: bool, is_answer: bool = False) -> None:
        out.input_ids += ids
        out.images_seq_mask += [is_image] * len(ids)
        out.assistant_mask += [is_answer] * len(ids)

    # ------------------------------------------------------------------------------ pixels + batching
    def __call__(self, conversations, images=None, inference_mode: bool = True) -> dict:
        """Process one conversation (B=1) or a list of them (left-padded batch).

        Args:
            conversations: a conversation (list of messages, or a raw prompt str), or a list of those.
            images: PIL RGB images in `<image>` order; for a batch, one list per conversation.
        Returns: dict with
            input_ids [B,T] long, attention_mask [B,T] long, images_seq_mask [B,T] bool,
            images [B,N_max,3,S,S] float32 (per image: global tile then its locals; zero tiles pad),
            images_spatial_crop [B,I_max,2] long of (tw, th) (zero rows pad),
            num_image_tokens: list (per sample) of lists (per image) of int.
        Raises:
            ValueError: image count mismatch or an image that is not RGB; a processor with
                `single_tile_global_only` (the official tensors read a (0, 0) crop row as padding: use `batch`);
                TypeError for a non-image.
        """
        if self.cfg.single_tile_global_only:
            raise ValueError("VL2Processor: the official tensors cannot hold a single-view image (a (0, 0) crop row "
                             "is padding there); use .batch() with single_tile_global_only")
        single = isinstance(conversations, str) or (len(conversations) > 0 and isinstance(conversations[0], dict))
        convs = [conversations] if single else list(conversations)
        imgs = [list(images or [])] if single else [list(x or []) for x in (images or [[]] * len(convs))]
        if len(imgs) != len(convs):
            raise ValueError(f"VL2Processor: {len(convs)} conversations but {len(imgs)} image lists")
        samples = [self._one(c, ims, inference_mode) for c, ims in zip(convs, imgs)]
        return self._batchify(samples)

    def batch(self, conversations: Sequence[Conversation], images: Sequence[Sequence[Image.Image]],
              training: bool = False) -> MultimodalBatch:
        """A left-padded `MultimodalBatch` of conversations (one image list each); with `training`, the trailing
        EOS of an answer is kept and the batch carries the assistant mask."""
        if len(images) != len(conversations):
            raise ValueError(f"VL2Processor: {len(conversations)} conversations but {len(images)} image lists")
        samples = [self._one(c, list(ims), not training) for c, ims in zip(conversations, images)]
        t = max(len(toks.input_ids) for toks, _, _ in samples)
        b = len(samples)
        ids = torch.full((b, t), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros(b, t, dtype=torch.long)
        seq = torch.zeros(b, t, dtype=torch.bool)
        answer = torch.zeros(b, t, dtype=torch.bool)
        views, tiles, counts = [], [], []
        for i, (toks, pixels, _) in enumerate(samples):
            n = len(toks.input_ids)
            ids[i, t - n:] = torch.tensor(toks.input_ids, dtype=torch.long)
            mask[i, t - n:] = 1
            seq[i, t - n:] = torch.tensor(toks.images_seq_mask, dtype=torch.bool)
            answer[i, t - n:] = torch.tensor(toks.assistant_mask, dtype=torch.bool)
            if toks.images_spatial_crop:
                views.append(pixels)
                tiles += list(toks.images_spatial_crop)
            counts.append(len(toks.images_spatial_crop))
        return MultimodalBatch(ids, mask, seq, torch.cat(views) if views else None, tiles, counts,
                               answer if training else None)

    def _one(self, conversation: Conversation, images: list, inference_mode: bool):
        for i, im in enumerate(images):
            if not isinstance(im, Image.Image):
                raise TypeError(f"VL2Processor: image {i} is a {type(im).__name__}, expected a PIL image")
            if im.mode != "RGB":
                raise ValueError(f"VL2Processor: image {i} has mode {im.mode!r}; pass img.convert('RGB')")
        toks = self.tokenize(conversation, [im.size for im in images], inference_mode)
        S = self.cfg.image_size
        tiles = [tile_image(im, self.cfg, crop) for im, crop in zip(images, toks.images_spatial_crop)]
        # official: a sample without images still carries one zero tile and one (0, 0) crop row
        pixels = torch.cat(tiles) if tiles else torch.zeros(1, 3, S, S)  # [N, 3, S, S]
        crops = toks.images_spatial_crop or [(0, 0)]
        return toks, pixels, crops

    def _batchify(self, samples) -> dict:
        B = len(samples)
        T = max(len(t.input_ids) for t, _, _ in samples)
        N = max(p.shape[0] for _, p, _ in samples)
        I = max(len(c) for _, _, c in samples)
        S = self.cfg.image_size
        input_ids = torch.full((B, T), self.tokenizer.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(B, T, dtype=torch.long)
        seq_mask = torch.zeros(B, T, dtype=torch.bool)
        answer = torch.zeros(B, T, dtype=torch.bool)
        images = torch.zeros(B, N, 3, S, S, dtype=torch.float32)
        crops = torch.zeros(B, I, 2, dtype=torch.long)
        for b, (toks, pixels, crop) in enumerate(samples):
            L = len(toks.input_ids)  # left padding: real tokens sit at the end
            input_ids[b, T - L:] = torch.tensor(toks.input_ids, dtype=torch.long)
            attention_mask[b, T - L:] = 1
            seq_mask[b, T - L:] = torch.tensor(toks.images_seq_mask, dtype=torch.bool)
            answer[b, T - L:] = torch.tensor(toks.assistant_mask, dtype=torch.bool)
            images[b, : pixels.shape[0]] = pixels
            crops[b, : len(crop)] = torch.tensor(crop, dtype=torch.long)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "images": images,
            "images_seq_mask": seq_mask,
            "images_spatial_crop": crops,
            "assistant_mask": answer,
            "num_image_tokens": [t.num_image_tokens for t, _, _ in samples],
        }

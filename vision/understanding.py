"""The understanding part of a pipeline: chat messages with images -> a `MultimodalBatch`, through the family's
processor (DeepSeek-VL2 dynamic tiling, or the Janus square view), and grounding prompts / answers.

It holds no model: `mmstack.pipeline.Pipeline` embeds the batch (`MultimodalModel.embed`) and decodes.

    u = Understanding(cfg, tokenizer)
    batch, images = u.prepare([messages], prompt_limit=4096)      # MultimodalBatch, loaded PIL images
"""
from __future__ import annotations

import functools
from dataclasses import replace
from typing import Optional, Sequence

from PIL import Image

from mmstack.batch import MultimodalBatch
from mmstack.config import ModelConfig
from mmstack.errors import CapabilityError

from . import image_io
from .grounding import MARKUP as GROUNDING_MARKUP
from .grounding import Box, grounding_prompt, parse_boxes
from .messages import split_messages

DEFAULT_PROMPT = "Describe this image in detail."
MAX_IMAGES = 16  # per request; configurable per pipeline (`pipe.max_images`)


class Understanding:
    """Args:
        cfg: the model config (its vision, image_processing, layout and chat sections are used).
        tokenizer: `mmstack.tokenizer.Tokenizer` with the family's image and chat tokens.
        chat_format: a named chat format (`mmstack.chat.CHAT_FORMATS`) instead of the config's.
        image_policy: "official" (convert("RGB"), no EXIF) or "native" (composite alpha, honour EXIF);
            default: the config's.
    """

    def __init__(self, cfg: ModelConfig, tokenizer, chat_format: Optional[str] = None,
                 image_policy: Optional[str] = None):
        if tokenizer is None:
            raise CapabilityError("an understanding model needs a tokenizer (tokenizer.json or tokenizer=)")
        self.tokenizer = tokenizer
        self.chat_cfg = cfg.chat.with_format(chat_format) if chat_format else cfg.chat
        self.ip = cfg.image_processing
        policy = image_policy or self.ip.policy
        if policy not in ("official", "native"):
            raise ValueError(f"image_policy must be 'official' or 'native', got {policy!r}")
        self.policy = image_io.OFFICIAL if policy == "official" else replace(image_io.NATIVE, background=self.ip.background)
        if self.ip.kind == "vl2_tiling":
            from .tiling import TilingConfig
            from .vl2_processor import VL2Processor

            tc = TilingConfig.from_processor_config({
                "candidate_resolutions": self.ip.candidate_resolutions, "patch_size": self.ip.patch_size,
                "downsample_ratio": self.ip.downsample_ratio, "image_mean": self.ip.image_mean,
                "image_std": self.ip.image_std})
            if self.ip.fit_size is not None:  # a native model trained at one size: every image fitted to it
                tc = replace(tc, fit_size=tuple(self.ip.fit_size))
            if self.ip.single_tile_global_only:  # a native model: a one-tile image is its global view alone
                tc = replace(tc, single_tile_global_only=True)
            self.processor = VL2Processor(tokenizer, tc, self.chat_cfg.image_tag)
        else:
            from .janus_processor import JanusProcessor

            self.processor = JanusProcessor(tokenizer, self.chat_cfg, self.ip.image_size, self.ip.image_mean,
                                            self.ip.image_std, self.ip.min_size,
                                            begin_embed=cfg.layout.kind == "janusflow")

    @property
    def can_ground(self) -> bool:
        tk = self.tokenizer
        return tk.token_id("<|ref|>", required=False) is not None and tk.token_id("<|det|>", required=False) is not None

    # ------------------------------------------------------------------------------ inputs
    def split(self, messages: Sequence[dict], max_images: int = MAX_IMAGES, allow_remote: bool = False
              ) -> tuple[list[dict], list]:
        """transformers-style messages -> template messages with image tags, and the image sources in order."""
        protect = functools.partial(self.tokenizer.protect, allow=GROUNDING_MARKUP)
        return split_messages(messages, self.chat_cfg.image_tag, max_images, allow_remote, protect)

    def load_images(self, sources: Sequence) -> list[Image.Image]:
        return image_io.load_images(sources, self.policy)

    def _vl2_conversation(self, msgs: list[dict]) -> list[dict]:
        roles = {"user": self.chat_cfg.user_role, "assistant": self.chat_cfg.assistant_role, "system": "system"}
        conv = [{"role": roles[m["role"]], "content": m["content"]} for m in msgs]
        if conv and conv[-1]["role"] != self.chat_cfg.assistant_role:
            conv.append({"role": self.chat_cfg.assistant_role, "content": ""})
        return conv

    def prepare(self, conversations: Sequence[Sequence[dict]], prompt_limit: Optional[int] = None,
                training: bool = False, max_images: int = MAX_IMAGES) -> tuple[MultimodalBatch, list[list[Image.Image]]]:
        """Conversations -> (a left-padded `MultimodalBatch`, the loaded images of each conversation).

        With `training`, the batch carries the assistant mask (answer tokens and their end token) and a final
        assistant turn is kept as an answer rather than opened as a generation prompt.
        Raises:
            ValueError: malformed messages, too many images; `ImageError` for an unreadable image;
            GenerationError: a Janus prompt over `prompt_limit` tokens, checked before its image spans are built.
        """
        return self._process([self.split(c, max_images) for c in conversations], prompt_limit, training)

    def prepare_tagged(self, conversations: Sequence[Sequence[dict]], images: Sequence[Sequence], training: bool = True,
                       tag: str = "<image>") -> tuple[MultimodalBatch, list[list[Image.Image]]]:
        """Training-data conversations whose text marks each image with `tag` (LLaVA / ShareGPT style), with
        their image sources in order -> as `prepare`. The tag becomes the family's image tag, the text is kept."""
        family = self.chat_cfg.image_tag
        prepared = [([{"role": m["role"], "content": str(m["content"]).replace(tag, family)} for m in conv], list(srcs))
                    for conv, srcs in zip(conversations, images)]
        return self._process(prepared, None, training)

    def count_tokens(self, messages: Sequence[dict], images: Sequence, tag: str = "<image>") -> int:
        """Prompt tokens (image slots included) of a training conversation, from the images' headers only (no
        pixels decoded): bounds an example against the context before training loads it."""
        family = self.chat_cfg.image_tag
        msgs = [{"role": m["role"], "content": str(m["content"]).replace(tag, family)} for m in messages]
        if self.ip.kind == "vl2_tiling":
            sizes = [tuple(image_io.image_size(im, self.policy)) for im in images]
            return len(self.processor.tokenize(msgs, sizes, inference_mode=False).input_ids)
        system = msgs[0]["content"] if msgs and msgs[0]["role"] == "system" else None
        return len(self.processor.tokens(msgs[1:] if system is not None else msgs, system))

    def _process(self, prepared, prompt_limit, training):
        imgs = [self.load_images(srcs) for _, srcs in prepared]
        if self.ip.kind == "vl2_tiling":
            convs = [m if training else self._vl2_conversation(m) for m, _ in prepared]
            return self.processor.batch(convs, imgs, training=training), imgs
        system = None
        msgs_list = []
        for msgs, _ in prepared:
            if msgs and msgs[0]["role"] == "system":
                system = msgs[0]["content"]
                msgs = msgs[1:]
            msgs_list.append(msgs)
        batch = self.processor.batch(msgs_list, imgs, system_prompt=system, max_prompt_tokens=prompt_limit,
                                     training=training)
        return batch, imgs

    def describe_messages(self, images: Sequence, prompt: Optional[str] = None) -> list[dict]:
        """One user turn: the images, then the prompt (default: describe in detail)."""
        content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": prompt or DEFAULT_PROMPT}]
        return [{"role": "user", "content": content}]

    # ------------------------------------------------------------------------------ grounding
    def grounding_messages(self, image, phrase: str) -> tuple[list[dict], Image.Image]:
        """The official referring-expression request for `phrase` on `image` (loaded here: its size maps the
        0..999 grid back to pixels)."""
        if not self.can_ground:
            raise CapabilityError("this model's tokenizer has no grounding tokens (<|ref|>, <|det|>)")
        if not isinstance(phrase, str) or not phrase.strip():
            raise ValueError("ground needs a non-empty phrase")
        img = image_io.load_image(image, self.policy)
        msgs = [{"role": "user", "content": [{"type": "image", "image": img},
                                             {"type": "text", "text": grounding_prompt(phrase.strip())}]}]
        return msgs, img

    def boxes(self, answer: str, img: Image.Image, phrase: str = "") -> list[Box]:
        """The boxes of a grounding answer in `img`'s pixels, unlabelled ones labelled with `phrase`. A model with
        a fit size answers in the frame the image was fitted to: its boxes are mapped back out of the padding."""
        fit = getattr(getattr(self.processor, "cfg", None), "fit_size", None)
        if fit is None:
            boxes = parse_boxes(answer, img.width, img.height)
        else:
            from .tiling import fitted_region

            x0, y0, w, h = fitted_region(img.size, fit)
            sx, sy = img.width / w, img.height / h

            def back(v, o, s, hi):
                return min(max((v - o) * s, 0.0), float(hi))

            boxes = [replace(b, x1=back(b.x1, x0, sx, img.width), y1=back(b.y1, y0, sy, img.height),
                             x2=back(b.x2, x0, sx, img.width), y2=back(b.y2, y0, sy, img.height))
                     for b in parse_boxes(answer, *fit)]
        return [b if b.label else replace(b, label=phrase.strip()) for b in boxes]

"""Understanding on top of the text pipeline: `describe`, `chat` (streaming), `ground`.

Messages use the transformers format: {"role": "user"|"assistant"|"system", "content": str | [parts]}
with parts {"type": "text", "text": ...} and {"type": "image", "image"|"path"|"url": ...} (a path, bytes,
PIL image or array). Images are consumed in order; each becomes the family's image tag in the prompt.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterator, Optional, Sequence, Union

import torch

from mmstack.api import CapabilityError, Pipeline
from mmstack.decoding import GenerationError, TextStream, generate_ids

from . import image_io
from .embed import embed_janus, embed_vl2
from .grounding import Box, grounding_prompt, parse_boxes

DEFAULT_PROMPT = "Describe this image in detail."
MAX_IMAGES = 16  # per request; configurable per pipeline


class UnderstandingPipeline(Pipeline):
    """A Pipeline whose model has a vision tower. Create with `mmstack.load`."""

    def __init__(self, model, tokenizer, source=None, chat_format: Optional[str] = None,
                 image_policy: Optional[str] = None, prefill_chunk: Optional[int] = 512,
                 max_images: int = MAX_IMAGES):
        super().__init__(model, tokenizer, source)
        if tokenizer is None:
            raise CapabilityError(f"{source}: an understanding model needs a tokenizer (tokenizer.json or tokenizer=)")
        parts = model.cfg.parts
        self.chat_cfg = parts["chat"].with_format(chat_format) if chat_format else parts["chat"]
        self.ip = parts["image_processing"]
        policy = image_policy or self.ip.policy
        if policy not in ("official", "native"):
            raise ValueError(f"image_policy must be 'official' or 'native', got {policy!r}")
        self.policy = image_io.OFFICIAL if policy == "official" else replace(image_io.NATIVE, background=self.ip.background)
        self.prefill_chunk = prefill_chunk
        self.max_images = max_images
        if self.ip.kind == "vl2_tiling":
            from .tiling import TilingConfig
            from .vl2_processor import VL2Processor

            tc = TilingConfig.from_processor_config({
                "candidate_resolutions": self.ip.candidate_resolutions, "patch_size": self.ip.patch_size,
                "downsample_ratio": self.ip.downsample_ratio, "image_mean": self.ip.image_mean,
                "image_std": self.ip.image_std})
            self.processor = VL2Processor(tokenizer, tc, self.chat_cfg.image_tag)
        else:
            from .janus_processor import JanusProcessor

            self.processor = JanusProcessor(tokenizer, self.chat_cfg, self.ip.image_size, self.ip.image_mean,
                                            self.ip.image_std, self.ip.min_size,
                                            begin_embed=self.model.cfg.parts["layout"].kind == "janusflow")

    # ------------------------------------------------------------------------------ inputs
    def _split(self, messages: Sequence[dict]) -> tuple[list[dict], list]:
        """transformers-style messages -> template messages with image tags, and the images in order."""
        out, images = [], []
        tag = self.chat_cfg.image_tag
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r:.80}")
            role = m["role"]
            if role not in ("user", "assistant", "system"):
                raise ValueError(f"message {i}: role must be user, assistant or system, got {role!r}")
            content = m["content"]
            if isinstance(content, str):
                text = content
            elif isinstance(content, (list, tuple)):
                text = ""
                for part in content:
                    if not isinstance(part, dict):
                        raise ValueError(f"message {i}: a content part must be a dict, got {part!r:.80}")
                    kind = part.get("type")
                    if kind == "text":
                        if not isinstance(part.get("text", ""), str):
                            raise ValueError(f"message {i}: a text part's 'text' must be a str")
                        text += part.get("text", "")
                    elif kind == "image":
                        src = next((part[k] for k in ("image", "path", "url") if k in part), None)
                        if src is None:
                            raise ValueError(f"message {i}: image part without 'image', 'path' or 'url'")
                        images.append(src)
                        text += tag + "\n"
                    else:
                        raise ValueError(f"message {i}: unknown content part type {kind!r}")
            else:
                raise ValueError(f"message {i}: content must be a str or a list of parts, got {type(content).__name__}")
            if role != "user" and tag in text:
                raise ValueError(f"message {i}: images belong in user turns")
            out.append({"role": role, "content": text})
        if len(images) > self.max_images:
            raise ValueError(f"{len(images)} images in one request; the limit is {self.max_images}")
        return out, images

    def _vl2_conversation(self, msgs: list[dict]) -> list[dict]:
        roles = {"user": self.chat_cfg.user_role, "assistant": self.chat_cfg.assistant_role, "system": "system"}
        conv = [{"role": roles[m["role"]], "content": m["content"]} for m in msgs]
        if conv and conv[-1]["role"] != self.chat_cfg.assistant_role:
            conv.append({"role": self.chat_cfg.assistant_role, "content": ""})
        return conv

    @torch.no_grad()
    def encode(self, conversations: Sequence[Sequence[dict]], max_new_tokens: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Conversations -> (inputs_embeds [B,T,D], attention_mask [B,T], the loaded images per sample).

        Raises:
            GenerationError: a prompt over `max_prompt_tokens`, or one that leaves no room in the context
                for `max_new_tokens`; checked on the token ids, before anything is embedded.
        """
        prepared = [self._split(c) for c in conversations]
        imgs = [image_io.load_images(srcs, self.policy) for _, srcs in prepared]
        dev, m = self.device, self.model
        if self.ip.kind == "vl2_tiling":
            batch = self.processor([self._vl2_conversation(msgs) for msgs, _ in prepared], imgs)
            self.check_prompt_length(batch["input_ids"].shape[1], max_new_tokens)
            emb = embed_vl2(m, batch["input_ids"].to(dev), batch["images"].to(dev),
                            batch["images_seq_mask"].to(dev), batch["images_spatial_crop"].to(dev))
        else:
            system = None
            msgs_list = []
            for msgs, _ in prepared:
                if msgs and msgs[0]["role"] == "system":
                    system = msgs[0]["content"]
                    msgs = msgs[1:]
                msgs_list.append(msgs)
            batch = self.processor(msgs_list, imgs, system_prompt=system,
                                   max_prompt_tokens=self.prompt_token_limit())
            self.check_prompt_length(batch["input_ids"].shape[1], max_new_tokens)
            emb = embed_janus(m, batch["input_ids"].to(dev), batch["pixel_values"].to(dev),
                              batch["images_seq_mask"].to(dev), batch["images_emb_mask"].to(dev))
        return emb, batch["attention_mask"].to(dev), imgs

    # ------------------------------------------------------------------------------ public
    def _stream(self, conversations, **sampling) -> Iterator[list[str]]:
        params = self._params(sampling)
        emb, mask, _ = self.encode(conversations, params.max_new_tokens)
        ts = TextStream(self.tokenizer, emb.shape[0], params.stop_strings, params.stop_token_ids)
        stop_fn = lambda tok: ts.stop_mask()  # noqa: E731  (stop strings end a row)
        for tok in generate_ids(self.model.language, params, inputs_embeds=emb,
                                attention_mask=None if bool(mask.all()) else mask, prefill_chunk=self.prefill_chunk,
                                stop_fn=stop_fn, pad_id=self._pad_id()):
            yield ts.push(tok)

    def chat(self, messages: Sequence[dict], stream: bool = True, **sampling) -> Union[Iterator[str], str]:
        """Answer the last user turn of `messages`. stream=True yields text deltas; False returns the text."""
        def deltas():
            for d in self._stream([messages], **sampling):
                if d[0]:
                    yield d[0]

        return deltas() if stream else "".join(deltas())

    def describe(self, image_or_images, prompt: Optional[str] = None, **sampling) -> str:
        """Describe one image (or several, in one turn). Returns the answer text."""
        images = list(image_or_images) if isinstance(image_or_images, (list, tuple)) else [image_or_images]
        if not images:
            raise GenerationError("describe needs at least one image")
        content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": prompt or DEFAULT_PROMPT}]
        return self.chat([{"role": "user", "content": content}], stream=False, **sampling)

    def ground(self, image, phrase: str, **sampling) -> list[Box]:
        """Boxes for `phrase` in original-image pixels (DeepSeek-VL2 `<|ref|>` / `<|det|>` grounding)."""
        if self.tokenizer.token_id("<|ref|>", required=False) is None or self.tokenizer.token_id("<|det|>", required=False) is None:
            raise CapabilityError(f"{self.source}: this model's tokenizer has no grounding tokens (<|ref|>, <|det|>)")
        if not phrase or not phrase.strip():
            raise GenerationError("ground needs a non-empty phrase")
        img = image_io.load_image(image, self.policy)
        msgs = [{"role": "user", "content": [{"type": "image", "image": img},
                                             {"type": "text", "text": grounding_prompt(phrase.strip())}]}]
        sampling.setdefault("max_new_tokens", 128)
        params = self._params(sampling)
        emb, mask, _ = self.encode([msgs], params.max_new_tokens)
        ids = [int(t[0]) for t in generate_ids(self.model.language, params, inputs_embeds=emb,
                                               prefill_chunk=self.prefill_chunk, pad_id=self._pad_id())]
        ids = ids[: next((k for k, t in enumerate(ids) if t in set(params.stop_token_ids)), len(ids))]
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        boxes = parse_boxes(text, img.width, img.height)
        return [b if b.label else replace(b, label=phrase.strip()) for b in boxes]


def _factory(model, tokenizer, source, **options):
    if not model.has_part("vision"):
        return None
    return UnderstandingPipeline(model, tokenizer, source, **options)


def register() -> None:
    from mmstack.api import PIPELINE_FACTORIES

    if _factory not in PIPELINE_FACTORIES:
        PIPELINE_FACTORIES.append(_factory)

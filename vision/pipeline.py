"""Kept for one release: understanding is a part of `mmstack.pipeline.Pipeline` (`pipe.understanding`, an
`mmstack.vision.understanding.Understanding`); `mmstack.load` composes it."""
from __future__ import annotations

from typing import Optional

from mmstack.pipeline import Pipeline

from .understanding import DEFAULT_PROMPT, MAX_IMAGES, Understanding

__all__ = ["UnderstandingPipeline", "DEFAULT_PROMPT", "MAX_IMAGES"]


class UnderstandingPipeline(Pipeline):
    """A `Pipeline` with an understanding part, built from a loaded model (prefer `mmstack.load`)."""

    def __init__(self, model, tokenizer, source=None, chat_format: Optional[str] = None,
                 image_policy: Optional[str] = None, prefill_chunk: Optional[int] = 512, max_images: int = MAX_IMAGES):
        super().__init__(model, tokenizer, source,
                         understanding=Understanding(model.cfg, tokenizer, chat_format, image_policy),
                         prefill_chunk=prefill_chunk)
        self.max_images = max_images

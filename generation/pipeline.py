"""Kept for one release: generation is a part of `mmstack.pipeline.Pipeline` (`pipe.generation`, an
`mmstack.generation.generator.ImageGenerator`); `mmstack.load` composes it."""
from .generator import MAX_IMAGES_PER_CALL, ImageGenerator, generation_prompt_ids

__all__ = ["ImageGenerator", "generation_prompt_ids", "MAX_IMAGES_PER_CALL"]

"""A deterministic stand-in for a model in the batch-job tests: no weights, answers in microseconds, so the
tests exercise the jobs' own code (inputs, runner, resume, results files) and nothing else."""
from __future__ import annotations

import time
from typing import Callable

from mmstack.vision.image_io import load_image

KINDS = ("text", "table")


def fake_describe(spec: str) -> Callable[[object, str], str]:
    """A describe function `(image, prompt) -> answer` for `KIND[:SECONDS]`. It loads the image like a model
    would (so unreadable files fail the same way) and answers from its size and corner colour, after
    sleeping SECONDS (default 0): KIND `text` -> `"64x48 #ff0000"`, KIND `table` -> a markdown table with
    prose around it.

    Raises:
        ValueError: `spec` is not `text[:seconds]` or `table[:seconds]`.
    """
    kind, _, seconds = spec.partition(":")
    if kind not in KINDS:
        raise ValueError(f"--fake-model must be text[:seconds] or table[:seconds], got {spec!r}")
    delay = float(seconds or 0)

    def describe(image, prompt: str) -> str:
        img = load_image(image)
        time.sleep(delay)
        r, g, b = img.getpixel((0, 0))
        if kind == "text":
            return f"{img.width}x{img.height} #{r:02x}{g:02x}{b:02x}"
        return (f"Here is the data.\nTitle: Size of image\n\n| Measure | Pixels |\n|---|---|\n"
                f"| width | {img.width} px |\n| height | {img.height} px |\n| red | {r} |\n\nHope this helps!")

    return describe

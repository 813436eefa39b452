"""DeepSeek-VL2 visual grounding: the referring-expression prompt, a tolerant box parser, drawing, display text.

Answers look like `<|ref|>The giraffe<|/ref|><|det|>[[580, 270, 999, 900]]<|/det|>` (README), with
coordinates on a 0..999 grid over the original image: pixel x = x * W / 999, y = y * H / 999
(deepseek_vl2/serve/app_modules/utils.py `parse_ref_bbox`, which truncates to int; we keep floats).

The official parser `eval`s the bracket text and gives up on any mismatch. `parse_boxes` instead reads the
numbers between brackets and never raises:
    - a group of exactly 4 numbers is a box; any other count is skipped (`[1, 2, 3]`, `[]`);
    - nesting is flattened (`[[[1, 2, 3, 4]]]`) and unbalanced brackets are harmless;
    - values are clamped to 0..999, so a runaway `99999999` or a negative becomes an edge of the image,
      which keeps the box (runaway digits usually mean "to the border");
    - a `<|det|>` without `<|/det|>` reads the box-like characters that follow it and stops at the first
      other character, so the prose after it is not mistaken for coordinates;
    - a `<|det|>` takes the label of the last `<|ref|>` since the previous `<|det|>`, else None;
      an unterminated `<|ref|>` label runs to the next tag.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

GRID = 999  # largest coordinate of the 0..999 grid

_TAG = re.compile(r"<\|(/?ref|/?det|grounding)\|>")
# the grounding tags are prompt language (the official README types `<|ref|>...<|/ref|>` into the user turn):
# user text keeps them as special tokens, while role and end tokens typed there stay text (`Tokenizer.protect`)
MARKUP = ("<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>")
_BOX_CHARS = re.compile(r"[\s\d\[\](),.+\-]*")  # what an unterminated <|det|> may hold
_BRACKET = re.compile(r"[\[\]()]")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")

# Fixed palette (distinct, colour-blind aware), cycled per box like the official demo.
PALETTE = [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40),
]


@dataclass
class Box:
    """One detected box in pixels of the original image; corners are reordered so x1 <= x2, y1 <= y2."""

    label: Optional[str]
    x1: float
    y1: float
    x2: float
    y2: float

    def __post_init__(self):
        self.x1, self.x2 = sorted((float(self.x1), float(self.x2)))
        self.y1, self.y2 = sorted((float(self.y1), float(self.y2)))

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)


def grounding_prompt(phrase: str) -> str:
    """The official referring-expression query, e.g. `<|ref|>The giraffe at the back.<|/ref|>.`.

    Put it after the `<image>` tag in the user turn (README: `"<image>\\n<|ref|>...<|/ref|>."`).
    """
    return f"<|ref|>{phrase}<|/ref|>."


def parse_boxes(text: str, width: int, height: int) -> list[Box]:
    """Read every `<|det|>` box of a model answer, in pixels of a `width` x `height` image.

    Never raises on any `text`; malformed groups are skipped (rules in the module docstring).

    Returns:
        Boxes in answer order, each clamped to [0, width] x [0, height].

    Raises:
        ValueError: width or height not positive.

    Examples:
        >>> parse_boxes("<|ref|>cat<|/ref|><|det|>[[0, 0, 999, 499.5]]<|/det|>", 200, 100)
        [Box(label='cat', x1=0.0, y1=0.0, x2=200.0, y2=50.0)]
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    boxes, label = [], None
    for kind, body in _scan(text):
        if kind == "ref":
            label = body.strip()
        elif kind == "det":
            for x1, y1, x2, y2 in _quads(body):
                boxes.append(Box(label, x1 * width / GRID, y1 * height / GRID, x2 * width / GRID, y2 * height / GRID))
            label = None
    return boxes


def strip_grounding(text: str) -> str:
    """The answer for display: grounding tags and box coordinates removed, labels kept.

    Examples:
        >>> strip_grounding("<|ref|>The giraffe<|/ref|><|det|>[[580, 270, 999, 900]]<|/det|> eats.")
        'The giraffe eats.'
    """
    return "".join(body for kind, body in _scan(text) if kind in ("text", "ref"))


def draw_boxes(image: Image.Image, boxes: Sequence[Box], width: Optional[int] = None) -> Image.Image:
    """A copy of `image` (as RGB) with each box outlined in a palette colour and its label above it.

    Args:
        image: any PIL image; it is not modified.
        boxes: pixel boxes, e.g. from `parse_boxes`.
        width: outline width in pixels; default scales with the image (at least 2).
    """
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    line = width if width is not None else max(2, round(max(out.size) / 300))
    font = ImageFont.load_default()
    for i, box in enumerate(boxes):
        colour = PALETTE[i % len(PALETTE)]
        x1, y1, x2, y2 = (round(v) for v in box.xyxy)
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
        if box.label:
            _draw_label(draw, box.label, x1, y1, line, colour, font)
    return out


def _draw_label(draw: ImageDraw.ImageDraw, label: str, x: int, y: int, line: int, colour, font):
    """A filled tag with the label, above the box, or just inside it when the box touches the top."""
    left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    w, h = right - left + 4, bottom - top + 4
    y = y - h if y - h >= 0 else y + line
    luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    draw.rectangle((x, y, x + w, y + h), fill=colour)
    draw.text((x + 2 - left, y + 2 - top), label, fill="black" if luminance > 140 else "white", font=font)


def _scan(text: str) -> Iterator[tuple[str, str]]:
    """Split an answer into ("text" | "ref" | "det", body) pieces; other and stray closing tags vanish."""
    pos = 0
    while (tag := _TAG.search(text, pos)) is not None:
        yield "text", text[pos:tag.start()]
        pos = tag.end()
        end = _TAG.search(text, pos)
        if tag.group(1) == "ref":
            stop = end.start() if end else len(text)
            yield "ref", text[pos:stop]
            pos = end.end() if end and end.group(1) == "/ref" else stop
        elif tag.group(1) == "det":
            if end and end.group(1) == "/det":
                body, pos = text[pos:end.start()], end.end()
            else:  # unterminated: only the box-like prefix belongs to it
                body = _BOX_CHARS.match(text, pos).group().rstrip()  # trailing spaces stay in the text
                pos += len(body)
            yield "det", body
    yield "text", text[pos:]


def _quads(body: str) -> Iterator[tuple[float, float, float, float]]:
    """Each bracket-delimited group of exactly four numbers, clamped to the 0..999 grid."""
    for group in _BRACKET.split(body):
        numbers = _NUMBER.findall(group)
        if len(numbers) == 4:
            yield tuple(min(max(float(n), 0.0), GRID) for n in numbers)

"""Checks against the synthetic vocabulary of `mmstack.apps.synth` ("a {colour} {shape}"): scene captions and
generated images. Pure functions on strings and PIL images with numpy, no model.

    scenes    parse_caption, caption_score
    t2i       find_objects, classify_shape_colour, check_generated: a deterministic checker for images of
              the synthetic "a {colour} {shape}" prompts, tested against the generator's ground truth
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from mmstack.apps.synth import COLOURS, SHAPES

# ------------------------------------------------------------------------------------------ captions

_OBJECT = re.compile(rf"\b({'|'.join(COLOURS)})\s+({'|'.join(SHAPES)})s?\b")


def parse_caption(text: str) -> list[tuple[str, str]]:
    """Every "<colour> <shape>" phrase of a caption, in order: "a red circle and a blue square." ->
    [("red", "circle"), ("blue", "square")]."""
    return _OBJECT.findall(str(text).lower())


def caption_score(pred: str, truth_objects: Sequence) -> float:
    """Fraction of the true objects ((colour, shape) pairs or dicts with those keys) named in `pred`.

    Counted as multisets, so two red circles need two mentions; extra mentions are not penalised.
    An empty truth scores 1.0.
    """
    truth = [(o["colour"], o["shape"]) if isinstance(o, dict) else tuple(o) for o in truth_objects]
    if not truth:
        return 1.0
    named = parse_caption(pred)
    hits = 0
    for obj in truth:
        if obj in named:
            named.remove(obj)
            hits += 1
    return hits / len(truth)


# ------------------------------------------------------------------------------------------ generated images

# Shape cues, all relative to the blob's bounding box (w x h):
#   taper   mean row width of the top quarter / that of the bottom quarter: upright triangle ~0.14,
#           circle and square 1;
#   corners filled fraction of the four corner patches (each 20% of the side): square ~1, circle ~0.1;
#   fill    pixels / box area: triangle 0.5, circle pi/4, square 1 (reported; blur and JPEG move it by
#           +-0.1, which is why the two cues above decide).
# Blobs more elongated than MAX_ASPECT are none of our shapes.
TRIANGLE_MAX_TAPER, SQUARE_MIN_CORNERS, MAX_ASPECT = 0.55, 0.5, 1.6
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
_NAMES = list(COLOURS)
_PROMPT = re.compile(rf"a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})(?: above a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}))?\.?")


@dataclass(frozen=True)
class DetectedObject:
    colour: str
    shape: Optional[str]  # None when the blob is too elongated to be a circle, square or triangle
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 (exclusive)
    pixels: int
    fill: float  # pixels / bounding-box area


def _components(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels of a bool mask (0 = background) by min-label propagation."""
    big = mask.size + 1
    lab = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), big)
    while True:
        new = lab.copy()
        np.minimum(new[1:], lab[:-1], out=new[1:])
        np.minimum(new[:-1], lab[1:], out=new[:-1])
        np.minimum(new[:, 1:], lab[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], lab[:, 1:], out=new[:, :-1])
        new = np.where(mask, new, big)
        if np.array_equal(new, lab):
            return np.where(mask, lab, 0)
        lab = new


def classify_blob(crop: np.ndarray) -> Optional[str]:
    """Shape of one blob from its bool mask cropped to its bounding box (h w); None if too elongated."""
    h, w = crop.shape
    if max(w / h, h / w) > MAX_ASPECT:
        return None
    q, c = max(1, h // 4), max(1, round(0.2 * min(h, w)))
    taper = crop[:q].sum(1).mean() / max(crop[-q:].sum(1).mean(), 1e-6)
    if taper < TRIANGLE_MAX_TAPER:
        return "triangle"
    corners = np.mean([crop[:c, :c].mean(), crop[:c, -c:].mean(), crop[-c:, :c].mean(), crop[-c:, -c:].mean()])
    return "square" if corners > SQUARE_MIN_CORNERS else "circle"


def find_objects(img: Image.Image, fg_threshold: float = 80.0, min_frac: float = 0.002) -> list[DetectedObject]:
    """Coloured blobs of an image with a plain background, largest (most pixels) first.

    Background = median colour of the border pixels; a pixel is foreground when its RGB distance to it
    exceeds fg_threshold. Foreground pixels take the palette colour (synth.COLOURS) whose blend with the
    background comes closest (so blurred rims keep their colour), and each
    colour's 4-connected components with at least min_frac of the image's pixels become objects, so
    touching objects of different colours stay apart and speckle is ignored.
    """
    rgb = np.asarray(img.convert("RGB"), dtype=np.float32)  # H W 3
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    bg = np.median(border, axis=0)
    diff = rgb - bg  # H W 3
    fg = np.linalg.norm(diff, axis=-1) > fg_threshold
    # Blend-aware colour: the palette colour P whose segment bg -> P passes closest to the pixel, so the
    # anti-aliased or blurred rim of a red shape on white (pink) still counts as red, not as purple/orange.
    d = diff[fg]  # N 3
    seg = _PALETTE - bg  # K 3
    alpha = np.clip(d @ seg.T / (seg * seg).sum(-1), 0.0, 1.0)  # N K
    colour = np.full(fg.shape, -1)
    colour[fg] = np.argmin(np.linalg.norm(d[:, None, :] - alpha[..., None] * seg, axis=-1), axis=-1)
    min_pixels = max(4, int(min_frac * fg.size))
    found = []
    for ci in np.unique(colour[fg]):
        ys, xs = np.nonzero(colour == ci)
        x0, y0 = int(xs.min()), int(ys.min())
        labels = _components(colour[y0:ys.max() + 1, x0:xs.max() + 1] == ci)  # labelled within the colour's extent
        ids, counts = np.unique(labels[labels > 0], return_counts=True)
        for lab_id, count in zip(ids, counts):
            if count < min_pixels:
                continue
            by, bx = np.nonzero(labels == lab_id)
            crop = labels[by.min():by.max() + 1, bx.min():bx.max() + 1] == lab_id
            box = (x0 + int(bx.min()), y0 + int(by.min()), x0 + int(bx.max()) + 1, y0 + int(by.max()) + 1)
            found.append(DetectedObject(_NAMES[ci], classify_blob(crop), box, int(count), float(crop.mean())))
    return sorted(found, key=lambda o: (-o.pixels, o.box))


def classify_shape_colour(img: Image.Image) -> tuple[Optional[str], Optional[str]]:
    """(colour, shape) of the largest object (`find_objects`), or (None, None) when there is none."""
    objects = find_objects(img)
    return (objects[0].colour, objects[0].shape) if objects else (None, None)


def check_generated(img: Image.Image, prompt: str, min_rel_pixels: float = 0.1) -> bool:
    """Does `img` show what a synthetic prompt asks for?

    "a {colour} {shape}": exactly one significant object (at least min_rel_pixels of the largest one's pixels,
    which drops compression rims and speckle; the synthetic pairs are >= 0.19) and it matches.
    "a {c1} {s1} above a {c2} {s2}": exactly two significant objects, the higher one matching (c1, s1) and the
    lower one (c2, s2).

    Raises:
        ValueError: prompt not in the synthetic grammar.
    """
    m = _PROMPT.fullmatch(prompt.strip().lower())
    if not m:
        raise ValueError(f"not a synthetic t2i prompt: {prompt!r}")
    want = [(m.group(1), m.group(2))] + ([(m.group(3), m.group(4))] if m.group(3) else [])
    objects = find_objects(img)
    if not objects:
        return False
    significant = [o for o in objects if o.pixels >= min_rel_pixels * objects[0].pixels]
    if len(significant) != len(want):
        return False
    significant.sort(key=lambda o: o.box[1] + o.box[3])  # top to bottom by vertical centre
    return [(o.colour, o.shape) for o in significant] == want

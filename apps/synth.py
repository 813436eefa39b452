"""Deterministic synthetic image-text data for training the tiny embedded demo model from scratch.

Four kinds, each drawn with PIL only (no system fonts), sized for a model that sees few image tokens
(/work/shared/reference/tiny-model-training-notes.md: geometry is easy, glyphs are hard, so labels are
large and the OCR length has a curriculum knob):

    scene  1-3 non-overlapping coloured shapes; a caption ("a red circle and a blue square.") or a
           grounding query answered as `<|ref|>the red circle<|/ref|><|det|>[[x1, y1, x2, y2]]<|/det|>`
           on the 0..999 grid of mmstack.vision.grounding;
    ocr    one centred text line ("Read the text in the image." -> the text) or a small 2-3 line document
           (lines joined with "\\n");
    chart  bar or line chart of 3-5 points labelled A..E, values 0..100 (multiples of 10 by default), optional title;
           "Convert the chart to a table." -> `Title: ...` line (when titled) and a markdown table;
    t2i    "a {colour} {shape}" / "a {colour} {shape} above a {colour} {shape}" on white, to t2i.jsonl.

Output of `generate(out_dir, ...)`:
    out_dir/data.jsonl   one messages-format record per line (scene, ocr, chart), image paths relative to it
    out_dir/t2i.jsonl    {"id", "prompt", "image", "meta"} per line
    out_dir/images/<id>.png

Determinism: sample i draws from its own `random.Random("<seed>:<kind>:<i>")` (string seeds are hashed
with SHA-512, independent of PYTHONHASHSEED), so the same seed gives byte-identical files, and a larger
`n` extends a smaller run without changing it. Text uses the Aileron font that ships inside Pillow
(`ImageFont.load_default(size)`, Pillow >= 10.1) with the BASIC layout engine, so no system font or
libraqm is involved. Pixels are identical wherever Pillow's bundled FreeType is the same version; PNG
bytes can additionally depend on the bundled zlib build.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import random
import string
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from mmstack.vision.grounding import GRID, grounding_prompt

log = logging.getLogger(__name__)

# Six well-separated colours (pairwise RGB distance >= 70) and three shapes; image_checks.py checks against these.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 90, 220),
    "yellow": (240, 200, 20), "purple": (140, 60, 180), "orange": (250, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
KINDS = ("scene", "ocr", "chart", "t2i")
CHARSET = string.ascii_uppercase + string.digits
CHART_LABELS = "ABCDE"
CHART_TITLES = ("SALES", "COST", "SCORE", "SPEED", "PRICE", "TOTAL")
CHART_STEP = 10  # chart values on multiples of 10 (see `generate`)

CAPTION_QUESTION = "Describe this image."
OCR_QUESTION = "Read the text in the image."
CHART_QUESTION = "Convert the chart to a table."

MIN_FONT, MAX_FONT = 14, 24  # preferred glyph sizes (px); OCR lines shrink below MIN_FONT only to fit
FLOOR_FONT = 10  # lines still too wide at this size are squeezed horizontally instead
MARGIN = 3


@functools.lru_cache(maxsize=None)
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's built-in Aileron at `size` px with the BASIC layout engine (no libraqm, no system fonts)."""
    return ImageFont.load_default(size).font_variant(layout_engine=ImageFont.Layout.BASIC)


def to_grid(box: Sequence[int], width: int, height: int) -> list[int]:
    """Pixel box (x1, y1, x2, y2), x2/y2 exclusive, -> 0..999 grid ints: round(x / W * 999), exact integer math."""
    x1, y1, x2, y2 = box
    return [(2 * GRID * v + d) // (2 * d) for v, d in ((x1, width), (y1, height), (x2, width), (y2, height))]


def caption(objects: Sequence[tuple[str, str]]) -> str:
    """The fixed caption grammar: "a red circle.", "a red circle and a blue square.", "a, b and c."."""
    parts = [f"a {c} {s}" for c, s in objects]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text + "."


def chart_table(values: dict[str, int], title: Optional[str]) -> str:
    """Chart answer: optional `Title: ...` line, then `| label | value |` markdown rows."""
    lines = [f"Title: {title}"] if title else []
    lines += ["| label | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in values.items()]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ drawing


def _light(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(225, 255) for _ in range(3))


def _dark(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(0, 60) for _ in range(3))


def draw_shape(img: Image.Image, shape: str, colour: str, box: Sequence[int]) -> list[int]:
    """Draw `shape` filling square `box` (x1, y1, x2, y2 exclusive, no anti-aliasing).

    Returns:
        The exact pixel bounding box of what was drawn (x2/y2 exclusive).
    """
    x1, y1, x2, y2 = box
    mask = Image.new("L", img.size, 0)
    d = ImageDraw.Draw(mask)
    corners = [x1, y1, x2 - 1, y2 - 1]
    if shape == "circle":
        d.ellipse(corners, fill=255)
    elif shape == "square":
        d.rectangle(corners, fill=255)
    elif shape == "triangle":  # upright isosceles: fills half its bounding box
        d.polygon([((x1 + x2 - 1) / 2, y1), (x1, y2 - 1), (x2 - 1, y2 - 1)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    img.paste(COLOURS[colour], mask=mask)
    return list(mask.getbbox())


def _place(rng: random.Random, size: int, count: int, lo: int, hi: int, gap: int = 3) -> list[list[int]]:
    """Up to `count` non-overlapping squares of side lo..hi inside the image (rejection sampling)."""
    boxes: list[list[int]] = []
    for _ in range(200):
        if len(boxes) == count:
            break
        s = rng.randint(lo, hi)
        x, y = rng.randint(MARGIN, size - MARGIN - s), rng.randint(MARGIN, size - MARGIN - s)
        b = [x, y, x + s, y + s]
        if all(b[0] >= o[2] + gap or o[0] >= b[2] + gap or b[1] >= o[3] + gap or o[1] >= b[3] + gap for o in boxes):
            boxes.append(b)
    return boxes


def text_mask(text: str, size: int, max_width: int) -> tuple[Image.Image, int, float]:
    """Anti-aliased ink of `text` at `size` px, cropped to its ink box and squeezed to max_width if wider.

    Returns:
        (L mask, offset of the ink top below the text origin, horizontal squeeze factor <= 1).
    """
    f = font(size)
    l, t, r, b = f.getbbox(text)
    mask = Image.new("L", (max(1, r - l), max(1, b - t)), 0)
    ImageDraw.Draw(mask).text((-l, -t), text, font=f, fill=255)
    if mask.width <= max_width:
        return mask, t, 1.0
    return mask.resize((max_width, mask.height), Image.Resampling.BOX), t, max_width / mask.width


def _fit_font(texts: Sequence[str], start: int, max_width: int, max_height: Optional[int] = None) -> int:
    """Largest size <= start (and >= FLOOR_FONT) at which every text fits max_width and the stack max_height."""
    def fits(fs: int) -> bool:
        wide = max(font(fs).getbbox(t)[2] - font(fs).getbbox(t)[0] for t in texts) <= max_width
        return wide and (max_height is None or len(texts) * sum(font(fs).getmetrics()) <= max_height)

    fs = start
    while fs > FLOOR_FONT and not fits(fs):
        fs -= 1
    return fs


# ------------------------------------------------------------------------------------------ samples


def scene_sample(rng: random.Random, size: int) -> tuple[Image.Image, str, str, dict]:
    """1-3 shapes with unique (colour, shape); a caption or a grounding question about one of them."""
    img = Image.new("RGB", (size, size), _light(rng))
    boxes = _place(rng, size, rng.randint(1, 3), max(6, size * 18 // 100), size * 35 // 100)
    picks = rng.sample([(c, s) for c in COLOURS for s in SHAPES], len(boxes))
    objects = [{"colour": c, "shape": s, "box": draw_shape(img, s, c, b)} for (c, s), b in zip(picks, boxes)]
    objects.sort(key=lambda o: (o["box"][0], o["box"][1]))  # captions read left to right
    meta = {"background": list(img.getpixel((0, 0))), "objects": objects}
    if rng.random() < 0.5:
        meta["question_type"] = "caption"
        return img, CAPTION_QUESTION, caption([(o["colour"], o["shape"]) for o in objects]), meta
    target = rng.randrange(len(objects))
    o = objects[target]
    phrase = f"the {o['colour']} {o['shape']}"
    meta.update(question_type="grounding", target=target, box=o["box"])
    x1, y1, x2, y2 = to_grid(o["box"], size, size)
    answer = f"<|ref|>{phrase}<|/ref|><|det|>[[{x1}, {y1}, {x2}, {y2}]]<|/det|>"
    return img, grounding_prompt(phrase), answer, meta


def ocr_sample(rng: random.Random, size: int, charset: str, min_len: int, max_len: int,
               doc_fraction: float = 0.2) -> tuple[Image.Image, str, str, dict]:
    """One centred line of min_len..max_len characters, or a 2-3 line left-aligned document of short lines."""
    bg, ink = _light(rng), _dark(rng)
    img = Image.new("RGB", (size, size), bg)
    width = size - 2 * MARGIN - 2
    lo = min(min_len, max_len)
    if rng.random() < doc_fraction:
        short_hi = min(max_len, 6)
        lines = ["".join(rng.choices(charset, k=rng.randint(min(lo, short_hi, 3), short_hi)))
                 for _ in range(rng.randint(2, 3))]
        fs = _fit_font(lines, rng.randint(MIN_FONT, 18), width, size - 2 * MARGIN)
        step = sum(font(fs).getmetrics())
        y0 = (size - len(lines) * step) // 2
        squeeze = 1.0
        for i, line in enumerate(lines):
            mask, top, sq = text_mask(line, fs, width)
            img.paste(ink, (MARGIN + 2, y0 + i * step + top), mask)
            squeeze = min(squeeze, sq)
        meta = {"question_type": "document", "lines": lines, "font_size": fs, "squeeze": round(squeeze, 4)}
        return img, OCR_QUESTION, "\n".join(lines), meta
    text = "".join(rng.choices(charset, k=rng.randint(lo, max_len)))
    fs = _fit_font([text], rng.randint(MIN_FONT, MAX_FONT), width)  # long lines shrink rather than leave the frame
    mask, _, squeeze = text_mask(text, fs, width)
    x, y = (size - mask.width) // 2, (size - mask.height) // 2
    img.paste(ink, (x, y), mask)
    meta = {"question_type": "line", "text": text, "lines": [text], "font_size": fs, "squeeze": round(squeeze, 4),
            "ink_box": [x, y, x + mask.width, y + mask.height]}
    return img, OCR_QUESTION, text, meta


def chart_sample(rng: random.Random, size: int, step: int = 1) -> tuple[Image.Image, str, str, dict]:
    """Bar (60%) or line chart on a fixed 0..100 axis, values on multiples of `step`; labels and title drawn at
    >= 14 px."""
    n = rng.randint(3, 5)
    values = {k: rng.randint(0, 100 // step) * step for k in CHART_LABELS[:n]}
    title = rng.choice(CHART_TITLES) if rng.random() < 0.5 else None
    chart_type = "bar" if rng.random() < 0.6 else "line"
    colour = rng.choice(list(COLOURS))
    img = Image.new("RGB", (size, size), _light(rng))
    draw = ImageDraw.Draw(img)
    f = font(MIN_FONT)
    text_h = sum(f.getmetrics())
    top = MARGIN + (text_h if title else 2)
    bottom = size - MARGIN - text_h  # value-0 baseline
    left, right = MARGIN + 2, size - MARGIN
    if title:
        l, _, r, _ = draw.textbbox((0, 0), title, font=f)
        draw.text(((size - (r - l)) // 2 - l, MARGIN - 2), title, font=f, fill=(30, 30, 30))
    plot_h = bottom - top
    draw.line([(left, top), (right, top)], fill=(190, 190, 190))  # the 100 line gives the scale
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=(60, 60, 60))
    slot = (right - left) / n
    points = []
    for i, (k, v) in enumerate(values.items()):
        cx = left + slot * (i + 0.5)
        y = bottom - round(v * plot_h / 100)
        points.append((round(cx), y))
        if chart_type == "bar" and y < bottom:  # values under half a pixel draw no bar
            half = max(2, round(slot * 0.3))
            draw.rectangle([round(cx) - half, y, round(cx) + half - 1, bottom - 1], fill=COLOURS[colour])
        l, _, r, _ = draw.textbbox((0, 0), k, font=f)
        draw.text((round(cx) - (r - l) // 2 - l, bottom + 1), k, font=f, fill=(30, 30, 30))
    if chart_type == "line":
        draw.line(points, fill=COLOURS[colour], width=2)
        for x, y in points:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=COLOURS[colour])
    meta = {"chart_type": chart_type, "title": title, "x_label": None, "y_label": None,
            "series": {"value": values}, "colour": colour, "plot_box": [left, top, right, bottom],
            "points": points}
    return img, CHART_QUESTION, chart_table(values, title), meta


def t2i_sample(rng: random.Random, size: int) -> tuple[Image.Image, str, dict]:
    """One shape, or two distinct shapes one above the other, on white."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    if rng.random() < 0.5:
        c, s = rng.choice([(c, s) for c in COLOURS for s in SHAPES])
        side = rng.randint(size * 35 // 100, size * 60 // 100)
        x, y = rng.randint(MARGIN, size - MARGIN - side), rng.randint(MARGIN, size - MARGIN - side)
        objects = [{"colour": c, "shape": s, "box": draw_shape(img, s, c, [x, y, x + side, y + side])}]
        return img, f"a {c} {s}", {"objects": objects}
    pairs = rng.sample([(c, s) for c in COLOURS for s in SHAPES], 2)
    objects = []
    for (c, s), (y_lo, y_hi) in zip(pairs, [(MARGIN, size // 2 - 1), (size // 2 + 1, size - MARGIN)]):
        side = rng.randint(size * 25 // 100, size * 40 // 100)
        x, y = rng.randint(MARGIN, size - MARGIN - side), rng.randint(y_lo, y_hi - side)
        objects.append({"colour": c, "shape": s, "box": draw_shape(img, s, c, [x, y, x + side, y + side])})
    (c1, s1), (c2, s2) = pairs
    return img, f"a {c1} {s1} above a {c2} {s2}", {"objects": objects}


# ------------------------------------------------------------------------------------------ writer


def _render(i: int, *, out: str, seed: int, kinds, sizes, ocr, chart_step: int) -> dict:
    """Draw sample `i` (its own random stream), save its PNG under `out`, return its JSON row."""
    kind = kinds[i % len(kinds)]
    rng = random.Random(f"{seed}:{kind}:{i}")
    sid = f"{kind}-{i:06d}"
    image = f"images/{sid}.png"
    if kind == "t2i":
        img, prompt, meta = t2i_sample(rng, sizes[1])
        row = {"id": sid, "prompt": prompt, "image": image, "meta": meta}
    else:
        if kind == "scene":
            img, question, answer, meta = scene_sample(rng, sizes[0])
        elif kind == "ocr":
            img, question, answer, meta = ocr_sample(rng, sizes[0], *ocr)
        else:
            img, question, answer, meta = chart_sample(rng, sizes[0], chart_step)
        row = {"id": sid, "task": kind, "images": [image],
               "messages": [{"role": "user", "content": f"<image>\n{question}"}, {"role": "assistant", "content": answer}],
               "meta": meta}
    img.save(Path(out) / image, format="PNG")
    return row


@contextlib.contextmanager
def _mapper(workers: int):
    """An ordered `map` over samples: in this process, or over `workers` processes (rows come back in order)."""
    if workers <= 1:
        yield map
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield lambda f, items: pool.imap(f, items, chunksize=64)


def generate(out_dir, n: int, seed: int, kinds: Sequence[str] = KINDS, image_size: int = 96, *,
             t2i_size: Optional[int] = None, charset: str = CHARSET, ocr_min_len: int = 4, ocr_max_len: int = 12,
             chart_step: int = CHART_STEP, overwrite: bool = False, progress: bool = True, workers: int = 1) -> dict:
    """Write `n` samples, cycling through `kinds` (sample i has kind kinds[i % len(kinds)]).

    Args:
        out_dir: folder to create; gets data.jsonl, t2i.jsonl and images/.
        n: total number of samples over all kinds.
        seed: same seed -> byte-identical files; sample i depends only on (seed, kind, i).
        kinds: subset of ("scene", "ocr", "chart", "t2i").
        image_size: side of the square understanding images (scene, ocr, chart), >= 32.
        t2i_size: side of the text-to-image images (default: image_size).
        charset: OCR characters.
        ocr_min_len, ocr_max_len: OCR line length range; curriculum: start with ocr_max_len=3, ocr_min_len=1.
        chart_step: chart values are multiples of it (1..100): at 64 px a titled plot is 22 px tall, 4.5 units a
            pixel, so values on a grid of 10 are what its pixels can tell apart (a step of 1 caps a perfect
            reader at 0.87 within the 5% tolerance).
        overwrite: replace existing jsonl files (stale images of a longer earlier run are left in place).
        workers: render in this many processes (the files are identical to a one-process run).
        progress: show a tqdm bar.

    Returns:
        {"out_dir", "records", "t2i"}: counts of lines written to data.jsonl and t2i.jsonl.

    Raises:
        ValueError: unknown kind, bad sizes or lengths, empty charset.
        FileExistsError: out_dir already holds data.jsonl or t2i.jsonl and overwrite is False.
    """
    kinds = tuple(kinds)
    t2i_size = t2i_size or image_size
    if not kinds or any(k not in KINDS for k in kinds):
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds}")
    if image_size < 32 or t2i_size < 16:
        raise ValueError(f"image_size must be >= 32 and t2i_size >= 16, got {image_size}, {t2i_size}")
    if not charset or not 1 <= ocr_min_len or not 1 <= ocr_max_len:
        raise ValueError("charset must be non-empty and OCR lengths >= 1")
    if not isinstance(chart_step, int) or not 1 <= chart_step <= 100:
        raise ValueError(f"chart_step must be an integer in 1..100, got {chart_step!r}")
    if "ocr" in kinds:
        mean_char = font(FLOOR_FONT).getlength(charset) / len(charset)
        if mean_char * ocr_max_len > image_size - 2 * MARGIN - 2:
            log.warning("OCR lines of %d characters do not fit %d px glyphs at image_size %d and are squeezed; "
                        "use a larger image size or a shorter ocr_max_len", ocr_max_len, FLOOR_FONT, image_size)
    out = Path(out_dir)
    data_path, t2i_path = out / "data.jsonl", out / "t2i.jsonl"
    if not overwrite and (data_path.exists() or t2i_path.exists()):
        raise FileExistsError(f"{out} already holds a dataset; pass overwrite=True (--overwrite) to replace it")
    (out / "images").mkdir(parents=True, exist_ok=True)
    counts = {"records": 0, "t2i": 0}
    render = functools.partial(_render, out=str(out), seed=seed, kinds=kinds, sizes=(image_size, t2i_size),
                               ocr=(charset, ocr_min_len, ocr_max_len), chart_step=chart_step)
    with open(data_path, "w", encoding="utf-8") as data_f, open(t2i_path, "w", encoding="utf-8") as t2i_f, \
            _mapper(workers) as imap:
        for row in tqdm(imap(render, range(n)), total=n, desc="synth", unit="sample", disable=not progress):
            fh = t2i_f if "prompt" in row else data_f
            counts["t2i" if "prompt" in row else "records"] += 1
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
    log.info("wrote %d records and %d t2i pairs to %s", counts["records"], counts["t2i"], out)
    return {"out_dir": str(out), **counts}


# ------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `mmstack synth`."""
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (data.jsonl, t2i.jsonl, images/)")
    parser.add_argument("--n", type=int, default=1000, metavar="N", help="total samples over all kinds (default 1000)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="same seed gives identical files")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of scene,ocr,chart,t2i")
    parser.add_argument("--image-size", type=int, default=None,
                        help="understanding image side in px (default: the embedded model's input size, else 96)")
    parser.add_argument("--t2i-size", type=int, default=None,
                        help="text-to-image side in px (default: the embedded model's generated size, else --image-size)")
    parser.add_argument("--charset", default=CHARSET, help="OCR characters (default A-Z0-9)")
    parser.add_argument("--ocr-min-len", type=int, default=4, help="shortest OCR line (default 4)")
    parser.add_argument("--ocr-max-len", type=int, default=12, help="longest OCR line; 3 for a first curriculum stage")
    parser.add_argument("--chart-step", type=int, default=CHART_STEP,
                        help=f"chart values are multiples of this (default {CHART_STEP}: what 64-px charts resolve)")
    parser.add_argument("--workers", type=int, default=1, help="render in this many processes (same files)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")


def embedded_sizes() -> tuple[int, Optional[int]]:
    """(understanding side, text-to-image side) the embedded demo model was trained at, read from its config;
    (96, None) in an installation without it. Images of these sizes reach the model as its training data did."""
    from mmstack.api import default_model_dir
    from mmstack.formats import read_config

    try:
        ip, head = (read_config(default_model_dir()).parts.get(k) for k in ("image_processing", "vq_head"))
    except FileNotFoundError:
        return 96, None
    side = (ip.fit_size[0] if ip.fit_size else ip.image_size) if ip is not None else 96
    return side, head.image_size if head is not None else None


def main(args: argparse.Namespace) -> int:
    """Run `mmstack synth`; prints one summary line."""
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    if args.image_size is None:
        args.image_size, t2i = embedded_sizes()
        args.t2i_size = args.t2i_size or t2i
    summary = generate(args.out, args.n, args.seed, kinds, args.image_size, t2i_size=args.t2i_size,
                       charset=args.charset, ocr_min_len=args.ocr_min_len, ocr_max_len=args.ocr_max_len,
                       chart_step=args.chart_step, overwrite=args.overwrite, workers=args.workers)
    print(f"{summary['records']} records -> {Path(args.out) / 'data.jsonl'}, "
          f"{summary['t2i']} t2i pairs -> {Path(args.out) / 't2i.jsonl'}")
    return 0

"""Evaluation metrics for OCR, charts, grounding, scene captions and generated images. Pure functions, no model.

    OCR       exact_match, cer, anls (DocVQA ANLS, tau = 0.5)
    charts    relaxed_accuracy (ChartQA / pix2struct `relaxed_correctness`), rms / rms_f1 (DePlot RMS)
    grounding box_iou
    scenes    parse_caption, caption_score
    t2i       find_objects, classify_shape_colour, check_generated: a deterministic checker for images of
              the synthetic "a {colour} {shape}" prompts (mmstack.apps.synth), tested against its ground truth

Everything here runs on strings, numbers and PIL images with numpy; no scipy (the assignment problem is
solved by a small exact Hungarian algorithm, `linear_sum_assignment`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
from PIL import Image

from mmstack.apps.synth import COLOURS, SHAPES

Triple = tuple[str, str, str]  # (row header, column header, value)

# ------------------------------------------------------------------------------------------ strings


def normalize_text(text: str) -> str:
    """Strip each line, collapse runs of spaces/tabs to one space, drop empty lines; line breaks are kept."""
    lines = (" ".join(line.split()) for line in str(text).splitlines())
    return "\n".join(line for line in lines if line)


def levenshtein(a: Sequence, b: Sequence) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1); O(len(a) * len(b))."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _similarity(a: str, b: str, theta: float) -> float:
    """1 - normalised edit distance, or 0 when that distance is >= theta (pix2struct `anls_metric`)."""
    if not a and not b:
        return 1.0
    ned = levenshtein(a, b) / max(len(a), len(b))
    return 1.0 - ned if ned < theta else 0.0


def exact_match(pred: str, ref: str, case_sensitive: bool = True) -> bool:
    """True when pred equals ref after `normalize_text` (and lower-casing unless case_sensitive).

    Examples:
        >>> exact_match("  AB12 \\n", "AB12")
        True
    """
    p, r = normalize_text(pred), normalize_text(ref)
    return p == r if case_sensitive else p.lower() == r.lower()


def cer(pred: str, ref: str) -> float:
    """Character error rate: levenshtein(pred, ref) / len(ref), on `normalize_text`-ed strings.

    Can exceed 1 when pred is much longer than ref. An empty ref scores 0.0 for an empty pred, else 1.0.

    Examples:
        >>> round(cer("abd", "abc"), 4)
        0.3333
    """
    p, r = normalize_text(pred), normalize_text(ref)
    if not r:
        return 0.0 if not p else 1.0
    return levenshtein(p, r) / len(r)


def anls(pred: str, refs: Union[str, Sequence[str]], tau: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity for one question (DocVQA; Biten et al. 2019, ST-VQA).

    Score = max over refs of (1 - NL) where NL = levenshtein / max(len), set to 0 when NL >= tau.
    Strings are lower-cased and whitespace-normalised first, as in the DocVQA evaluation.

    Args:
        pred: the model answer.
        refs: one reference or several accepted answers.
        tau: threshold on the normalised distance (0.5 in DocVQA).

    Returns:
        A float in [0, 1]; the dataset ANLS is the mean over questions.
    """
    refs = [refs] if isinstance(refs, str) else list(refs)
    p = normalize_text(pred).lower()
    return max((_similarity(p, normalize_text(r).lower(), tau) for r in refs), default=0.0)


# ------------------------------------------------------------------------------------------ charts


def to_float(text) -> Optional[float]:
    """Number in `text` ("42", "4.2%" -> 0.042, "1,234" -> 1234), else None."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    s = str(text).strip().replace(",", "")
    try:
        return float(s[:-1]) / 100.0 if s.endswith("%") else float(s)
    except ValueError:
        return None


def relaxed_accuracy(pred_value, ref_value, tol: float = 0.05) -> bool:
    """ChartQA relaxed correctness (pix2struct `relaxed_correctness`).

    Numbers are correct within `tol` relative error (|p - t| / |t| <= tol); anything else must match exactly
    after lower-casing and whitespace normalisation. A reference of 0 needs exactly 0 (pix2struct falls back
    to string comparison there, which rejects "0.0" for "0").
    """
    p, t = to_float(pred_value), to_float(ref_value)
    if p is not None and t is not None:
        return p == 0.0 if t == 0.0 else abs(p - t) / abs(t) <= tol
    return normalize_text(str(pred_value)).lower() == normalize_text(str(ref_value)).lower()


def table_triples(text: str) -> list[Triple]:
    """Markdown table (optionally after a `Title: ...` or `TITLE | ...` line) -> (row, column, value) triples.

    The first table row is the header; separator rows (`|---|---|`) are skipped; the title becomes
    ("title", "", title) as in DePlot, where it is one more data point.

    Examples:
        >>> table_triples("Title: SALES\\n| label | value |\\n|---|---|\\n| A | 42 |")
        [('title', '', 'SALES'), ('A', 'value', '42')]
    """
    triples: list[Triple] = []
    rows: list[list[str]] = []
    for line in str(text).splitlines():
        line = line.strip()
        m = re.match(r"(?i)title\s*[:|]\s*(.*)$", line)
        if m and not rows and not triples:
            triples.append(("title", "", m.group(1).strip()))
            continue
        if "|" not in line:
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if all(re.fullmatch(r":?-*:?", c) for c in cells):
            continue
        rows.append(cells)
    if rows:
        header, *body = rows
        for row in body:
            triples += [(row[0], header[j] if j < len(header) else "", cell) for j, cell in enumerate(row) if j > 0]
    return triples


def linear_sum_assignment(cost: Sequence[Sequence[float]]) -> list[tuple[int, int]]:
    """Minimum-cost matching of a rectangular cost matrix (Hungarian algorithm with potentials, O(n^2 m)).

    Returns:
        min(rows, cols) pairs (row, col), sorted by row; the same optimum as scipy.optimize.linear_sum_assignment.
    """
    rows = [list(map(float, r)) for r in cost]
    if not rows or not rows[0]:
        return []
    transpose = len(rows) > len(rows[0])
    if transpose:
        rows = [list(c) for c in zip(*rows)]
    n, m = len(rows), len(rows[0])
    inf = float("inf")
    u, v = [0.0] * (n + 1), [0.0] * (m + 1)
    match = [0] * (m + 1)  # match[j]: 1-based row assigned to column j (0: none); column 0 is a sentinel
    way = [0] * (m + 1)
    for i in range(1, n + 1):
        match[0], j0 = i, 0
        minv, used = [inf] * (m + 1), [False] * (m + 1)
        while match[j0]:  # grow an alternating tree from row i until it reaches a free column
            used[j0] = True
            i0, delta, j1 = match[j0], inf, 0
            for j in range(1, m + 1):
                if not used[j]:
                    reduced = rows[i0 - 1][j - 1] - u[i0] - v[j]
                    if reduced < minv[j]:
                        minv[j], way[j] = reduced, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(m + 1):
                if used[j]:
                    u[match[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
        while j0:  # flip the augmenting path
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    pairs = [(match[j] - 1, j - 1) for j in range(1, m + 1) if match[j]]
    return sorted((c, r) for r, c in pairs) if transpose else sorted(pairs)


class RMSScore(NamedTuple):
    precision: float
    recall: float
    f1: float


def _key(t: Triple) -> str:
    return normalize_text(" ".join(x for x in t[:2] if x)).lower()


def _value_similarity(pred: str, ref: str, text_theta: float, number_theta: float) -> float:
    p, t = to_float(pred), to_float(ref)
    if p is not None and t is not None:
        if t == 0.0:
            return float(p == 0.0)
        d = min(1.0, abs(p - t) / abs(t))
        return 1.0 - (d if d < number_theta else 1.0)
    p, t = normalize_text(pred).lower(), normalize_text(ref).lower()
    return 1.0 if p == t else _similarity(t, p, text_theta)


def _rms_once(pred: list[Triple], ref: list[Triple], text_theta: float, number_theta: float) -> RMSScore:
    if not pred and not ref:
        return RMSScore(1.0, 1.0, 1.0)
    if not pred or not ref:
        return RMSScore(float(not pred), float(not ref), 0.0)
    key_sim = [[_similarity(_key(t), _key(p), text_theta) for p in pred] for t in ref]
    pairs = linear_sum_assignment([[1.0 - s for s in row] for row in key_sim])
    score = sum(key_sim[r][c] * _value_similarity(pred[c][2], ref[r][2], text_theta, number_theta) for r, c in pairs)
    if score == 0:
        return RMSScore(0.0, 0.0, 0.0)
    precision, recall = score / len(pred), score / len(ref)
    return RMSScore(precision, recall, 2 * precision * recall / (precision + recall))


def rms(pred_table: Union[str, Sequence[Triple]], ref_table: Union[str, Sequence[Triple]],
        text_theta: float = 0.5, number_theta: float = 0.1, transposed: bool = True) -> RMSScore:
    """Relative Mapping Similarity (DePlot, Liu et al. 2023; google-research `deplot/metrics.py`
    `table_datapoints_precision_recall`).

    Each table is a set of data points: key "row col" (lower-cased), value. Keys are matched one-to-one by
    the assignment that maximises key similarity (1 - normalised edit distance, 0 when the distance is
    >= text_theta). A matched pair scores key_sim * value_sim, value_sim = 1 - min(1, |p - t| / |t|) for
    numbers (set to 0 when that relative distance is >= number_theta) and the text similarity otherwise.
    Precision = total / #pred, recall = total / #ref.

    Args:
        pred_table, ref_table: markdown text (see `table_triples`) or (row, column, value) triples.
        text_theta, number_theta: DePlot's defaults 0.5 and 0.1; number_theta=1 gives plain 1 - min(1, rel. error).
        transposed: also score the prediction with rows and columns swapped and keep the better F1 (DePlot).

    Returns:
        RMSScore(precision, recall, f1), each in [0, 1].
    """
    pred = table_triples(pred_table) if isinstance(pred_table, str) else [tuple(map(str, t)) for t in pred_table]
    ref = table_triples(ref_table) if isinstance(ref_table, str) else [tuple(map(str, t)) for t in ref_table]
    best = _rms_once(pred, ref, text_theta, number_theta)
    if transposed:
        swapped = _rms_once([(c, r, v) for r, c, v in pred], ref, text_theta, number_theta)
        best = max(best, swapped, key=lambda s: s.f1)
    return best


def rms_f1(pred_table, ref_table, **kwargs) -> float:
    """F1 of `rms` (DePlot's headline chart-to-table number)."""
    return rms(pred_table, ref_table, **kwargs).f1


# ------------------------------------------------------------------------------------------ grounding, captions


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; 0.0 when the union is empty."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


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
    which drops compression rims and speckle; the synthetic pairs are >= 0.19) and it matches. "a {c1} {s1} above a {c2} {s2}": exactly two significant objects, the higher one matching
    (c1, s1) and the lower one (c2, s2).

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

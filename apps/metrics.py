"""Evaluation scores for OCR, charts and grounding: pure functions on strings, numbers, boxes and table triples.

    text      normalize_text, levenshtein (bit-parallel), exact_match, cer, anls (DocVQA ANLS, tau = 0.5)
    numbers   to_number (units, currency, thousands separators; percent dropped or read as a fraction)
    charts    relaxed_accuracy (ChartQA / pix2struct `relaxed_correctness`), table_relaxed_accuracy,
              rms / rms_f1 (DePlot RMS)
    matching  linear_sum_assignment: exact (Hungarian algorithm; scipy's when installed, same optimum)
    grounding box_iou
    summary   mean

Tables are scored as (row label, column header, value) triples, a value being a number or text;
`mmstack.apps.chart.table_triples` reads them from a model's answer. Scene captions and generated images are
checked in `mmstack.apps.image_checks`.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, NamedTuple, Optional, Sequence, Union

Value = Union[float, str]
Triple = tuple[str, str, Value]  # (row label, column header, value)

# ------------------------------------------------------------------------------------------ strings


def normalize_text(text, keep_lines: bool = True) -> str:
    """Collapse runs of spaces and tabs to one space and strip the ends.

    With keep_lines (the default) line breaks stay, each line is stripped and blank lines are dropped, so a
    page's layout still counts; without, every whitespace run (line breaks too) becomes one space.
    """
    if not keep_lines:
        return " ".join(str(text).split())
    lines = (" ".join(line.split()) for line in str(text).splitlines())
    return "\n".join(line for line in lines if line)


def levenshtein(a: Sequence, b: Sequence) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1) of two strings or sequences of hashables.

    Bit-parallel algorithm of Myers (1999) in Hyyrö's form for global distance: one pass over `a`, with the
    column of deltas for `b` held in Python ints, so two 5,000-character pages take milliseconds instead of the
    seconds of the O(len(a) * len(b)) table (the tests check both agree).
    """
    if not a or not b:
        return len(a) + len(b)
    m = len(b)
    peq: dict = {}  # symbol -> bitmask of its positions in b
    for k, c in enumerate(b):
        peq[c] = peq.get(c, 0) | (1 << k)
    mask, top = (1 << m) - 1, 1 << (m - 1)
    pv, mv, dist = mask, 0, m  # vertical +1 / -1 deltas of the current column; D[len(a) so far][m]
    for c in a:
        eq = peq.get(c, 0)
        xv = eq | mv
        xh = (((eq & pv) + pv) ^ pv) | eq
        ph = mv | ~(xh | pv)  # horizontal +1 deltas (Python ints: ~ is two's complement, masked below)
        mh = pv & xh  # horizontal -1 deltas
        dist += 1 if ph & top else -1 if mh & top else 0
        ph = (ph << 1) | 1  # row 0 grows by one per column: global, not substring, distance
        mh <<= 1
        pv = (mh | ~(xv | ph)) & mask
        mv = ph & xv & mask
    return dist


def _similarity(a: str, b: str, theta: float) -> float:
    """1 - normalised edit distance, or 0 when that distance is >= theta (pix2struct `anls_metric`)."""
    longest = max(len(a), len(b))
    if not longest:
        return 1.0
    if abs(len(a) - len(b)) / longest >= theta:  # the distance is at least the length gap: skip the DP
        return 0.0
    ned = levenshtein(a, b) / longest
    return 1.0 - ned if ned < theta else 0.0


def _refs(refs) -> list:
    return list(refs) if isinstance(refs, (list, tuple)) else [refs]


def exact_match(pred: str, refs, case_sensitive: bool = True) -> bool:
    """True when pred equals the reference (or any of a list of references) after `normalize_text`, and
    lower-casing unless case_sensitive.

    Examples:
        >>> exact_match("  AB12 \\n", "AB12"), exact_match("x", ["y", "X"], case_sensitive=False)
        (True, True)
    """
    fold = (lambda s: s) if case_sensitive else str.lower
    p = fold(normalize_text(pred))
    return any(p == fold(normalize_text(r)) for r in _refs(refs))


def cer(pred: str, refs) -> float:
    """Character error rate: levenshtein(pred, ref) / len(ref) on `normalize_text`-ed strings; with a list of
    references, the lowest.

    Can exceed 1 when pred is much longer than ref. An empty ref scores 0.0 for an empty pred, else 1.0.

    Examples:
        >>> round(cer("abd", "abc"), 4)
        0.3333
    """
    p = normalize_text(pred)

    def one(ref) -> float:
        r = normalize_text(ref)
        return levenshtein(p, r) / len(r) if r else float(bool(p))

    return min(one(r) for r in _refs(refs) or [""])


def anls(pred: str, refs, tau: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity for one question (DocVQA; Biten et al. 2019, ST-VQA).

    Score = max over refs of (1 - NL) where NL = levenshtein / max(len), set to 0 when NL >= tau. Strings are
    lower-cased and every whitespace run becomes one space first, as in the DocVQA evaluation.

    Args:
        pred: the model answer.
        refs: one reference or a list of accepted answers.
        tau: threshold on the normalised distance (0.5 in DocVQA).

    Returns:
        A float in [0, 1] (0 without references); the dataset ANLS is the mean over questions.
    """
    p = normalize_text(pred, keep_lines=False).lower()
    return max((_similarity(p, normalize_text(r, keep_lines=False).lower(), tau) for r in _refs(refs)),
               default=0.0)


# ------------------------------------------------------------------------------------------ numbers

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
_CURRENCY = "$€£¥₹"


def to_number(text, percent_as_fraction: bool = False) -> Optional[float]:
    """A number read from a cell or an answer: `12`, `-3.5`, `1,234`, `45%`, `$3.2`, `12 kg`, `~7`, `**8**`.

    Units are dropped. The percent sign is dropped too (`45%` is 45, so a table's cells read as drawn), or with
    percent_as_fraction applied (`45%` is 0.45, as pix2struct's and DePlot's `_to_float`). Returns None for text
    that is not one finite number (`2019-2020`, `n/a`, `Year 2019`, `1e999`), for bools and for None.

    Examples:
        >>> to_number("$1,234.5"), to_number("45%"), to_number("45%", percent_as_fraction=True), to_number("n/a")
        (1234.5, 45.0, 0.45, None)
    """
    if text is None or isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        return float(text) if math.isfinite(text) else None
    s = str(text).strip().strip("*_`").replace("\u2212", "-").replace("\u00a0", " ")
    if not s or len(s) > 64:
        return None
    s = s.lstrip("~≈<>").strip()
    sign = ""
    if s[:1] in "+-":
        sign, s = s[0], s[1:].lstrip()
    if s[:1] and s[0] in _CURRENCY:
        s = s[1:].lstrip()
    m = _NUMBER.match(s)
    if not m or (sign and m.group()[:1] in "+-"):
        return None
    rest = s[m.end():].strip()
    if len(rest) > 16 or any(c.isdigit() for c in rest):
        return None
    v = float(sign + m.group().replace(",", ""))
    if percent_as_fraction and rest.startswith("%"):
        v /= 100.0
    return v if math.isfinite(v) else None


# ------------------------------------------------------------------------------------------ charts


def relaxed_accuracy(pred, ref, tol: float = 0.05) -> bool:
    """ChartQA relaxed correctness (pix2struct `relaxed_correctness`) of one answer.

    Numbers (`to_number`, percentages as fractions) are correct within `tol` relative error
    (|p - t| / |t| <= tol); anything else must match exactly after lower-casing and whitespace normalisation.
    A reference of 0 needs exactly 0 (pix2struct falls back to string comparison there, which rejects "0.0"
    for "0"); pix2struct reads only plain floats, so "$1,000" vs 1000 is a match here and a miss there.
    """
    p, t = to_number(pred, percent_as_fraction=True), to_number(ref, percent_as_fraction=True)
    if p is not None and t is not None:
        return p == 0.0 if t == 0.0 else abs(p - t) / abs(t) <= tol
    return normalize_text(str(pred)).lower() == normalize_text(str(ref)).lower()


def _key(s) -> str:
    return normalize_text(str(s), keep_lines=False).lower()


def table_relaxed_accuracy(pred: Sequence[Triple], ref: Sequence[Triple], tol: float = 0.05) -> float:
    """Share of the reference's cells whose value the prediction has, at the same row and column, within `tol`
    relative error (`relaxed_accuracy`).

    Keys match ignoring case and spacing; when both tables have one value column its header is ignored
    (`value` vs `Sales`). The prediction is also read transposed and the better score kept. An empty reference
    scores 1 only against an empty prediction.
    """
    if not ref:
        return float(not pred)
    best = 0.0
    for p in (list(pred), [(c, r, v) for r, c, v in pred]):
        one_col = len({_key(c) for _, c, _ in p}) == 1 and len({_key(c) for _, c, _ in ref}) == 1
        key = (lambda r, c: _key(r)) if one_col else (lambda r, c: (_key(r), _key(c)))
        have: dict = {}
        for r, c, v in p:
            have.setdefault(key(r, c), v)
        hits = sum(1 for r, c, v in ref if key(r, c) in have and relaxed_accuracy(have[key(r, c)], v, tol))
        best = max(best, hits / len(ref))
    return best


class RMSScore(NamedTuple):
    precision: float
    recall: float
    f1: float


MAX_MATCHED = 400  # entries per side that take part in the RMS matching (a runaway answer stays cheap)
_TIE_BREAK = 1e-9  # weight of value agreement among matchings of equal key similarity


class _Entry(NamedTuple):
    key: str  # "row column", lower-cased
    number: Optional[float]
    text: str


def _entries(triples: Sequence[Triple]) -> list[_Entry]:
    return [_Entry(_key(" ".join(str(x) for x in (r, c) if str(x))), to_number(v, percent_as_fraction=True),
                   _key(v)) for r, c, v in triples[:MAX_MATCHED]]


def _value_similarity(p: _Entry, t: _Entry, text_theta: float, number_theta: float) -> float:
    if p.number is not None and t.number is not None:
        if t.number == 0.0:
            return float(p.number == 0.0)
        d = min(1.0, abs(p.number - t.number) / abs(t.number))
        return 1.0 - (d if d < number_theta else 1.0)
    return 1.0 if p.text == t.text else _similarity(t.text, p.text, text_theta)


def _rms_once(pred: Sequence[Triple], ref: Sequence[Triple], text_theta: float, number_theta: float) -> RMSScore:
    if not pred and not ref:
        return RMSScore(1.0, 1.0, 1.0)
    if not pred or not ref:
        return RMSScore(float(not pred), float(not ref), 0.0)
    pe, te = _entries(pred), _entries(ref)
    key_sim = [[_similarity(t.key, p.key, text_theta) for p in pe] for t in te]
    point = [[k and k * _value_similarity(p, t, text_theta, number_theta) for k, p in zip(row, pe)]
             for row, t in zip(key_sim, te)]
    # DePlot matches on key similarity alone; among equally good key matchings we take the one that agrees
    # best on values (DePlot leaves such ties to scipy's order), so the score does not depend on the solver.
    weight = [[k + _TIE_BREAK * s for k, s in zip(kr, sr)] for kr, sr in zip(key_sim, point)]
    score = sum(point[r][c] for r, c in linear_sum_assignment(weight, maximize=True))
    if score == 0:
        return RMSScore(0.0, 0.0, 0.0)
    precision, recall = score / len(pred), score / len(ref)
    return RMSScore(precision, recall, 2 * precision * recall / (precision + recall))


def rms(pred: Sequence[Triple], ref: Sequence[Triple], text_theta: float = 0.5, number_theta: float = 0.1,
        transposed: bool = True) -> RMSScore:
    """Relative Mapping Similarity (DePlot, Liu et al. 2023, arXiv:2212.10505 sec. 4; google-research
    `deplot/metrics.py` `table_datapoints_precision_recall`).

    Each table is a set of data points: key "row column" (lower-cased), value. Keys are matched one-to-one by
    the assignment that maximises key similarity (1 - normalised edit distance, 0 when the distance is
    >= text_theta). A matched pair scores key_sim * value_sim, value_sim = 1 - min(1, |p - t| / |t|) for
    numbers (set to 0 when that relative distance is >= number_theta) and the text similarity otherwise.
    Precision = total / #pred, recall = total / #ref. Only the first `MAX_MATCHED` entries of each side take
    part in the matching; the denominators count every entry.

    Args:
        pred, ref: (row, column, value) triples (`mmstack.apps.chart.table_triples` reads them from text).
        text_theta, number_theta: DePlot's defaults 0.5 and 0.1; number_theta=1 gives plain 1 - min(1, rel. error).
        transposed: also score the prediction with rows and columns swapped and keep the better F1 (DePlot).

    Returns:
        RMSScore(precision, recall, f1), each in [0, 1]; an empty side gives DePlot's (1, 0, 0) / (0, 1, 0).

    Examples:
        >>> round(rms_f1([("2019", "sales", 10.0)], [("2019", "sales", 10.5)]), 3)  # 1 - 0.5 / 10.5
        0.952
    """
    best = _rms_once(pred, ref, text_theta, number_theta)
    if transposed:
        swapped = _rms_once([(c, r, v) for r, c, v in pred], ref, text_theta, number_theta)
        best = max(best, swapped, key=lambda s: s.f1)
    return best


def rms_f1(pred: Sequence[Triple], ref: Sequence[Triple], **kwargs) -> float:
    """F1 of `rms` (DePlot's headline chart-to-table number)."""
    return rms(pred, ref, **kwargs).f1


# ------------------------------------------------------------------------------------------ matching


def linear_sum_assignment(cost: Sequence[Sequence[float]], maximize: bool = False,
                          use_scipy: bool = True) -> list[tuple[int, int]]:
    """Optimal one-to-one matching of a rectangular matrix: min(rows, cols) pairs of least (or, with maximize,
    greatest) total.

    Uses scipy.optimize.linear_sum_assignment when installed (use_scipy), else the Hungarian algorithm with
    potentials below (O(n^2 m), pure Python); the tests check both reach the brute-force optimum.

    Returns:
        pairs (row, col), sorted by row.
    """
    if not cost or not len(cost[0]):
        return []
    if use_scipy:
        try:
            from scipy.optimize import linear_sum_assignment as scipy_lsa
        except ImportError:
            pass
        else:
            r, c = scipy_lsa(cost, maximize=maximize)
            return sorted(zip(r.tolist(), c.tolist()))
    rows = [[-float(x) if maximize else float(x) for x in r] for r in cost]
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


# ------------------------------------------------------------------------------------------ grounding, summary


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; 0.0 when the union is empty."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def mean(values: Iterable[float]) -> Optional[float]:
    """Arithmetic mean (bools count as 0 / 1), or None for no values."""
    vals = list(values)
    return sum(vals) / len(vals) if vals else None

"""Small pure scorers for batch OCR and chart jobs: exact match, CER, ANLS, relaxed accuracy and RMS-F1.

Self-contained on purpose (no scipy, no edit-distance package) so the batch jobs do not depend on
`mmstack.apps.metrics`. Tables are scored as lists of `(row label, column header, value)` triples, where
a value is a float or a string; `mmstack.apps.chart.Table.triples` builds them.

    exact_match("Total: 12", " Total:  12")          # 1.0 (whitespace collapsed)
    cer("hello", "hallo")                             # 0.2
    anls("Hello", ["hello"])                          # 1.0
    rms_f1([("2019", "sales", 10.0)], [("2019", "sales", 10.5)])   # 0.952: 1 - |10 - 10.5| / 10.5
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Optional, Sequence, Union

Value = Union[float, str]
Triple = tuple[str, str, Value]

_WS = re.compile(r"\s+")
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
_CURRENCY = "$€£¥₹"


def normalize_text(s: str) -> str:
    """Strip and collapse runs of whitespace to one space."""
    return _WS.sub(" ", str(s)).strip()


def levenshtein(a: Sequence, b: Sequence) -> int:
    """Edit distance (insertions, deletions, substitutions) by the bit-parallel algorithm of Myers (1999)
    in Hyyrö's form for global distance: one pass over `a` with `b` held in one Python int per
    vector, so two 5,000-character pages take milliseconds, not the seconds of the O(len(a) * len(b)) table.
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


def normalized_levenshtein(a: str, b: str) -> float:
    """Edit distance divided by the longer length: 0 for equal strings, 1 for nothing in common."""
    if not a and not b:
        return 0.0
    return levenshtein(a, b) / max(len(a), len(b))


def _answers(target) -> list[str]:
    return [str(t) for t in target] if isinstance(target, (list, tuple)) else [str(target)]


def exact_match(prediction: str, target) -> float:
    """1.0 when the prediction equals the target (or any of a list of targets) after collapsing whitespace."""
    p = normalize_text(prediction)
    return float(any(p == normalize_text(t) for t in _answers(target)))


def cer(prediction: str, target) -> float:
    """Character error rate: edits / target length (against the first target of a list). Can exceed 1."""
    t = normalize_text(_answers(target)[0])
    p = normalize_text(prediction)
    if not t:
        return 0.0 if not p else 1.0
    return levenshtein(p, t) / len(t)


def anls(prediction: str, target, threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity for one question (DocVQA, arXiv:1907.00490 eq. 1).

    Case-insensitive, whitespace collapsed; the best of several targets; similarities whose distance is at
    least `threshold` count as 0.
    """
    p = normalize_text(prediction).lower()
    best = 0.0
    for t in _answers(target):
        nl = normalized_levenshtein(p, normalize_text(t).lower())
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def to_number(text) -> Optional[float]:
    """A number read from a cell or an answer: `12`, `-3.5`, `1,234`, `45%`, `$3.2`, `12 kg`, `~7`.

    Units and the percent sign are dropped, not applied (`45%` is 45), so both sides of a comparison read
    alike. Returns None for text that is not one number (`2019-2020`, `n/a`, `Year 2019`).
    """
    if isinstance(text, bool):
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
    try:
        v = float(sign + m.group().replace(",", ""))
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def relaxed_match(prediction, target, tolerance: float = 0.05) -> bool:
    """ChartQA's relaxed correctness: numbers within `tolerance` relative error, other text exactly
    (case-insensitive, whitespace collapsed). A zero target needs an exact zero."""
    t, p = to_number(target), to_number(prediction)
    if t is not None and p is not None:
        return p == t if t == 0 else abs(p - t) <= tolerance * abs(t)
    return normalize_text(str(prediction)).lower() == normalize_text(str(target)).lower()


def _key(s: str) -> str:
    return normalize_text(str(s)).lower()


def _orientations(pred: Sequence[Triple]) -> list[list[Triple]]:
    # A chart read with series as rows instead of columns holds the same data; score the better reading.
    return [list(pred), [(c, r, v) for r, c, v in pred]]


def table_relaxed_accuracy(pred: Sequence[Triple], target: Sequence[Triple], tolerance: float = 0.05) -> float:
    """Share of the target's cells whose value the prediction has, at the same row and column, within
    `tolerance` relative error (text cells: equal ignoring case). Keys match ignoring case and spacing;
    when both tables have one value column its header is ignored (`value` vs `Sales`). The prediction is
    also read transposed and the better score kept. An empty target scores 1 only against an empty
    prediction."""
    if not target:
        return float(not pred)
    best = 0.0
    for p in _orientations(pred):
        one_col = len({_key(c) for _, c, _ in p}) == 1 and len({_key(c) for _, c, _ in target}) == 1
        key = (lambda r, c: _key(r)) if one_col else (lambda r, c: (_key(r), _key(c)))
        have = {}
        for r, c, v in p:
            have.setdefault(key(r, c), v)
        hits = sum(1 for r, c, v in target if key(r, c) in have and relaxed_match(have[key(r, c)], v, tolerance))
        best = max(best, hits / len(target))
    return best


def _value_distance(p: tuple[Optional[float], str], t: tuple[Optional[float], str], theta: float, tau: float) -> float:
    (pn, ps), (tn, ts) = p, t  # (number or None, normalised text), parsed once per entry
    if pn is not None and tn is not None:
        d = (0.0 if pn == 0 else 1.0) if tn == 0 else min(1.0, abs(pn - tn) / abs(tn))
        return d if d <= theta else 1.0
    return _thresholded_nl(ps, ts, tau)


def _thresholded_nl(a: str, b: str, tau: float) -> float:
    longest = max(len(a), len(b))
    if longest and abs(len(a) - len(b)) / longest > tau:  # the distance is at least the length gap
        return 1.0
    d = normalized_levenshtein(a, b)
    return d if d <= tau else 1.0


MAX_MATCHED = 400


def rms_scores(pred: Sequence[Triple], target: Sequence[Triple], tau: float = 0.5,
               theta: float = 0.1) -> tuple[float, float, float]:
    """DePlot's Relative Mapping Similarity (Liu et al. 2023, arXiv:2212.10505, sec. 4): precision,
    recall and F1 between two tables read as sets of (row, column) -> value entries.

    Entry similarity is (1 - NL_tau(key_p, key_t)) * (1 - D_theta(v_p, v_t)), where the key is
    "row column" (lower-cased), NL is the normalized edit distance set to 1 above `tau`, and D is the
    relative error min(1, |p - t| / |t|) set to 1 above `theta` (text values use NL_tau instead). Entries
    are paired one-to-one by the matching that maximises total similarity (Hungarian algorithm);
    precision = total / len(pred), recall = total / len(target). The prediction is also read transposed
    and the better F1 kept. The defaults tau=0.5, theta=0.1 are the ones the DePlot evaluation uses.
    Only the first `MAX_MATCHED` entries of each side take part in the matching (a runaway answer must not
    make scoring quadratic in its length); the denominators still count every entry.
    """
    if not pred and not target:
        return 1.0, 1.0, 1.0
    if not pred or not target:
        return 0.0, 0.0, 0.0

    def entries(triples):
        return [(_key(r) + " " + _key(c), (to_number(v), _key(v))) for r, c, v in triples[:MAX_MATCHED]]

    def similarity(p, t) -> float:
        value = 1.0 - _value_distance(p[1], t[1], theta, tau)
        return value * (1.0 - _thresholded_nl(p[0], t[0], tau)) if value > 0 else 0.0  # skip the key when 0

    tent, best = entries(target), (0.0, 0.0, 0.0)
    for p in _orientations(pred):
        sim = [[similarity(pe, te) for te in tent] for pe in entries(p)]
        total = sum(sim[i][j] for i, j in max_weight_matching(sim))
        if total <= 0:
            continue
        precision, recall = total / len(p), total / len(target)
        f1 = 2 * precision * recall / (precision + recall)
        if f1 > best[2]:
            best = (precision, recall, f1)
    return best


def rms_f1(pred: Sequence[Triple], target: Sequence[Triple], tau: float = 0.5, theta: float = 0.1) -> float:
    """The F1 of `rms_scores`."""
    return rms_scores(pred, target, tau, theta)[2]


def max_weight_matching(weight: Sequence[Sequence[float]], use_scipy: bool = True) -> list[tuple[int, int]]:
    """One-to-one pairs (i, j) maximising the summed weight of a rectangular matrix; every row of the
    shorter side is paired. Uses scipy's `linear_sum_assignment` when installed, else the Hungarian
    algorithm with potentials below (O(n^2 m), pure Python; the tests check both agree)."""
    if not weight or not weight[0]:
        return []
    if use_scipy:
        try:
            from scipy.optimize import linear_sum_assignment
        except ImportError:
            pass
        else:
            rows, cols = linear_sum_assignment(weight, maximize=True)
            return sorted(zip(rows.tolist(), cols.tolist()))
    n, m = len(weight), len(weight[0])
    if n > m:
        return sorted((i, j) for j, i in max_weight_matching([list(col) for col in zip(*weight)], False))
    top = max(max(row) for row in weight)
    cost = [[top - w for w in row] for row in weight]  # minimising cost == maximising weight
    inf = float("inf")
    u, v = [0.0] * (n + 1), [0.0] * (m + 1)
    owner, way = [0] * (m + 1), [0] * (m + 1)  # owner[j]: row (1-based) holding column j; 0 = free
    for i in range(1, n + 1):
        owner[0], j0 = i, 0
        minv, used = [inf] * (m + 1), [False] * (m + 1)
        while True:  # grow a shortest augmenting path from row i until it reaches a free column
            used[j0] = True
            i0, delta, j1 = owner[j0], inf, 0
            for j in range(1, m + 1):
                if not used[j]:
                    reduced = cost[i0 - 1][j - 1] - u[i0] - v[j]
                    if reduced < minv[j]:
                        minv[j], way[j] = reduced, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(m + 1):
                if used[j]:
                    u[owner[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if owner[j0] == 0:
                break
        while j0:  # flip the path
            j1 = way[j0]
            owner[j0] = owner[j1]
            j0 = j1
    return sorted((owner[j] - 1, j - 1) for j in range(1, m + 1) if owner[j])


def mean(values: Iterable[float]) -> Optional[float]:
    vals = list(values)
    return sum(vals) / len(vals) if vals else None

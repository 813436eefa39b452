"""`mmstack eval-demo`: score a model on a held-out synthetic set (a seed the training never saw).

Metrics per task: OCR exact match (single lines), chart values within 5%, scene captions (shape and
colour of every object), grounding IoU >= 0.5, generated "a {colour} {shape}" images judged by the
deterministic checker of `mmstack.apps.image_checks`. `--quick` scores a small slice and compares with the
scores recorded next to the weights (minus a margin): a regression guard.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

QUICK_PER_TASK = 12
MARGIN = 0.15
MAX_NEW_TOKENS = {"chart": 192}  # a five-row table with a title is ~70 tokens of single characters; others: 64
# each task's short name and metric, as `evaluate` scores it (for people: the demo's banner, `mmstack info`)
TASK_NAMES = {"ocr": "OCR", "chart": "chart", "caption": "caption", "grounding": "grounding", "t2i": "text to image"}
TASK_METRICS = {"ocr": "OCR exact match", "chart": "chart values within 5%", "caption": "caption objects",
                "grounding": "boxes with IoU >= 0.5", "t2i": "text to image checked"}


def _records(data_dir: Path, name: str) -> list[dict]:
    p = data_dir / name
    return [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines()] if p.exists() else []


def evaluate(pipe, data_dir: Path, per_task: Optional[int] = None, seed: int = 0) -> dict:
    """Scores in [0, 1] per task plus counts."""
    from .chart import table_triples
    from .image_checks import caption_score, check_generated
    from .metrics import box_iou, exact_match, relaxed_accuracy

    recs = _records(data_dir, "data.jsonl")
    buckets: dict[str, list] = {"ocr": [], "chart": [], "caption": [], "grounding": []}
    for r in recs:
        task = r.get("task")
        answer = r["messages"][-1]["content"]
        if task == "ocr" and "\n" not in answer:
            buckets["ocr"].append(r)
        elif task == "chart":
            buckets["chart"].append(r)
        elif task == "scene":
            buckets["grounding" if "<|ref|>" in r["messages"][0]["content"] else "caption"].append(r)
    scores, counts = {}, {}
    for task, items in buckets.items():
        items = items[:per_task] if per_task else items
        if not items:
            continue
        vals = []
        for r in items:
            img = str(data_dir / r["images"][0])
            question = r["messages"][0]["content"].replace("<image>", "").strip()
            answer = r["messages"][-1]["content"]
            out = pipe.describe(img, question, max_new_tokens=MAX_NEW_TOKENS.get(task, 64))
            if task == "ocr":
                vals.append(float(exact_match(out.strip(), answer.strip())))
            elif task == "chart":
                truth = {k: float(v) for k, v in r["meta"]["series"]["value"].items()}
                pred = {row: val for row, _, val in table_triples(out)}
                vals.extend(float(relaxed_accuracy(pred.get(k), v)) for k, v in truth.items())
            elif task == "caption":
                vals.append(caption_score(out, [tuple(o) for o in r["meta"]["objects_cs"]]) if "objects_cs" in r["meta"]
                            else caption_score(out, [(o["colour"], o["shape"]) for o in r["meta"]["objects"]]))
            else:  # grounding through the public API: boxes parsed from the answer's <|det|> block
                phrase = question.split("<|ref|>", 1)[1].split("<|/ref|>", 1)[0]
                boxes = pipe.ground(img, phrase, max_new_tokens=64)
                truth = r["meta"]["box"]
                vals.append(float(bool(boxes) and box_iou([boxes[0].x1, boxes[0].y1, boxes[0].x2, boxes[0].y2], truth) >= 0.5))
        scores[task] = sum(vals) / len(vals)
        counts[task] = len(items)
    t2i = [r for r in _records(data_dir, "t2i.jsonl") if " above " not in r["prompt"]]
    t2i = t2i[:per_task] if per_task else t2i
    if t2i and getattr(pipe, "generation_modes", None):
        ok = []
        for k, r in enumerate(t2i):
            img = pipe.generate(r["prompt"], n=1, seed=seed + k)[0]
            ok.append(float(check_generated(img, r["prompt"])))
        scores["t2i"] = sum(ok) / len(ok)
        counts["t2i"] = len(ok)
    return {"scores": scores, "counts": counts}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder or hub id org/name[@revision] (default: the embedded demo model)")
    p.add_argument("--device", default=None)
    p.add_argument("--data", default=None, help="held-out synthetic set (default: generated with seed 1)")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_PER_TASK} items per task; fail if below the recorded scores")
    p.add_argument("--per-task", type=int, default=None)
    p.add_argument("--json", default=None, help="write the scores here")
    p.add_argument("--record", action="store_true", help="store the scores next to the model weights (scores.json)")


def main(args) -> int:
    import mmstack
    from mmstack.api import default_model_dir

    from . import synth

    model_dir = Path(args.model) if args.model else default_model_dir()
    pipe = mmstack.load(model_dir, device=args.device)
    per_task = QUICK_PER_TASK if args.quick else args.per_task
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "heldout"
        if not args.data:
            recipe = json.loads((Path(mmstack.assets.ROOT) / "demo-recipe.json").read_text())
            synth.generate(data, **recipe["synth"]["heldout"], overwrite=True)
        result = evaluate(pipe, data, per_task)
    key = "quick" if args.quick else "full"
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    recorded = model_dir / "scores.json"
    if args.record:
        old = json.loads(recorded.read_text()) if recorded.exists() else {}
        old[key] = result
        recorded.write_text(json.dumps(old, indent=2))
    elif args.quick and recorded.exists():
        want = json.loads(recorded.read_text()).get("quick", {}).get("scores", {})
        low = {t: (result["scores"].get(t, 0.0), s) for t, s in want.items() if result["scores"].get(t, 0.0) < s - MARGIN}
        if low:
            print(f"regression: {low} (score, recorded)")
            return 1
    return 0

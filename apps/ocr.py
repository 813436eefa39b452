"""`mmstack ocr INPUT... --out results.jsonl`: read the text of many images, PDF pages and manifest rows.

One JSON line per item: `{id, source, page, text, seconds, error}`. With answers in a manifest, the
summary scores exact match, character error rate and ANLS (`mmstack.apps.metrics`).

    from mmstack.apps.ocr import ocr
    summary = ocr(["scans/"], "results.jsonl", describe=lambda image, prompt: pipe.describe(image, prompt))
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from . import batch
from .metrics import anls, cer, exact_match, mean

DEFAULT_PROMPT = "Read all the text in this image. Answer with the text only."
EMPTY = {"text": None}


def ocr_work(describe: batch.Describe, prompt: str = DEFAULT_PROMPT) -> batch.Work:
    """The per-item work of an OCR job: `{"text": describe(image, prompt)}`."""

    def work(item: batch.Item) -> dict:
        return {"text": describe(item.load(), prompt)}

    return work


def score_ocr(pairs: list[tuple[dict, Any]]) -> dict:
    """Mean exact match, CER and ANLS of records against answers (a string or a list of strings); an
    errored record counts as an empty prediction."""
    preds = [(rec.get("text") or "", ans) for rec, ans in pairs]
    return {"n": len(preds), "exact_match": mean(exact_match(p, a) for p, a in preds),
            "cer": mean(cer(p, a) for p, a in preds), "anls": mean(anls(p, a) for p, a in preds)}


def ocr(inputs: Sequence[Union[str, Path]], out: Union[str, Path], describe: batch.Describe, *,
        prompt: str = DEFAULT_PROMPT, resume: bool = False, overwrite: bool = False, retry_errors: bool = False,
        shard: tuple[int, int] = (0, 1), progress: bool = True, pdf_dpi: float = 144.0,
        batch_size: int = 1) -> batch.Summary:
    """Run an OCR job in Python (the CLI's behaviour with an injected `describe(image, prompt) -> str`);
    `batch_size` items run at once (a thread each: give a thread-safe describe, e.g. a pipeline's).

    Returns:
        the run's `batch.Summary` (done, errors, skipped, items/s, scores when answers exist).
    Raises:
        batch.UsageError: inputs match nothing, or `out` has results and neither resume nor overwrite is set.
    """
    items = list(batch.iter_items(inputs, pdf_dpi=pdf_dpi))
    return batch.run(items, ocr_work(describe, prompt), out, resume=resume, overwrite=overwrite,
                     retry_errors=retry_errors, shard=shard, empty=EMPTY, scorer=score_ocr, progress=progress,
                     desc="ocr", concurrency=batch_size)


def add_arguments(parser) -> None:
    batch.add_job_arguments(parser, out_help="results file (.jsonl), one line per item", prompt=DEFAULT_PROMPT,
                            max_new_tokens=512)


def main(args, describe: Optional[batch.Describe] = None) -> int:
    """`mmstack ocr`: 0 when the job ran (item errors are in the output), 2 for usage errors.

    `describe` answers instead of the model of `--model` (see `batch.job_main`)."""
    return batch.job_main(args, name="ocr", results=Path(args.out), work_for=ocr_work,
                          empty=EMPTY, scorer=score_ocr, describe=describe)


if __name__ == "__main__":
    sys.exit(batch.module_main("ocr", add_arguments, main))

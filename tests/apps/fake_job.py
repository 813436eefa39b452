"""`mmstack ocr` / `mmstack chart` with the stand-in model, for the subprocess tests (kill and resume, hostile
manifests). Everything but the model is the product's: the job's own flags (`add_arguments`), the
`python -m mmstack.apps.<job>` flow (`batch.module_main`, exit codes), the runner, resume, fsynced JSONL.

    python tests/apps/fake_job.py ocr imgs --out out.jsonl --fake-model text:0.05 --no-progress
"""
from __future__ import annotations

import argparse
import sys

from fake_model import fake_describe  # this script's folder is first on sys.path

from mmstack.apps import batch, chart, ocr

JOBS = {"ocr": ocr, "chart": chart}


def _spec(text: str) -> str:
    try:
        fake_describe(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def main(argv: list[str]) -> int:
    """`JOB ARGS... --fake-model KIND[:SECONDS]`: the job's exit code."""
    if not argv or argv[0] not in JOBS:
        print(f"usage: fake_job.py {{{','.join(JOBS)}}} ARGS... --fake-model KIND[:SECONDS]", file=sys.stderr)
        return 2
    job = JOBS[argv[0]]

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        job.add_arguments(parser)
        parser.add_argument("--fake-model", required=True, type=_spec, metavar="KIND[:SECONDS]")

    def run(args) -> int:
        return job.main(args, describe=fake_describe(args.fake_model))

    return batch.module_main(argv[0], add_arguments, run, argv=argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

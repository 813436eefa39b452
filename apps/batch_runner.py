"""The runner of the batch jobs: plan a run (this shard's items, minus those a resumed output already holds), execute
it (one fsynced JSON line per item, errors recorded as data), summarise; and the command-line flow that
`mmstack ocr` and `mmstack chart` share.

    summary = run(items, lambda item: {"text": describe(item.load(), "Read the text.")}, "out.jsonl",
                  resume=True, shard=(0, 1))
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from .batch_inputs import Item, UsageError, iter_items
from .model_args import add_model_arguments, load_kwargs
from .model_settings import task_defaults
from .batch_results import (find_shards, json_line, merge, parse_shard, read_results, resolve_shard, shard_path,
                            write_results)

log = logging.getLogger(__name__)

Describe = Callable[[Any, str], str]  # (image: path or PIL image, prompt) -> answer
Work = Callable[[Item], dict]
Scorer = Callable[[list[tuple[dict, Any]]], dict]
DEFAULT_BATCH_SIZE = 16


class ItemError(Exception):
    """A per-item failure that keeps some fields (e.g. the model's answer when no table could be parsed)."""

    def __init__(self, message: str, fields: Optional[dict] = None):
        super().__init__(message)
        self.fields = dict(fields or {})


@dataclass
class Plan:
    """What a run will do: the items of its shard still to process, and where results go."""

    out: Path
    todo: list[Item]
    mine: list[Item]  # every item of this shard, done or not
    skipped: int
    fresh: bool = False  # start the output empty (truncated when the run starts, not when planned)


def plan_run(items: Sequence[Item], out: Union[str, Path], *, resume: bool = False, overwrite: bool = False,
             retry_errors: bool = False, shard: tuple[int, int] = (0, 1)) -> Plan:
    """Select this shard's items (every n-th from i) and, with `resume`, drop those already in the output
    (rewriting it without a truncated last line; with `retry_errors`, without error records either).

    Raises:
        UsageError: the output already has results and neither `resume` nor `overwrite` is set.
    """
    i, n = shard
    path = shard_path(out, shard)
    mine = [it for k, it in enumerate(items) if k % n == i]
    path.parent.mkdir(parents=True, exist_ok=True)
    if overwrite or not path.exists():
        return Plan(path, mine, mine, 0, fresh=True)
    if not resume:
        if path.stat().st_size:
            raise UsageError(f"{path} already has results: pass --resume to continue it or --overwrite to start over")
        return Plan(path, mine, mine, 0)
    records, dropped = read_results(path)
    kept = [r for r in records if not (retry_errors and r.get("error"))]
    if dropped or len(kept) != len(records):
        log.warning("%s: dropped %d unreadable line(s) and %d error record(s) to redo", path, dropped,
                    len(records) - len(kept))
        write_results(path, kept)
    done = {r["id"] for r in kept}
    todo = [it for it in mine if it.id not in done]
    return Plan(path, todo, mine, len(mine) - len(todo))


@dataclass
class Summary:
    """What a run did: items done and errored in this run, items skipped as already done, wall seconds, the
    results file, and the scores of answered items (`{}` without answers or a scorer)."""

    done: int
    errors: int
    skipped: int
    seconds: float
    out: Path
    scores: dict = field(default_factory=dict)

    @property
    def items_per_s(self) -> float:
        return (self.done + self.errors) / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        s = (f"{self.done} done, {self.errors} errors, {self.skipped} skipped in {self.seconds:.1f} s "
             f"({self.items_per_s:.2f} items/s) -> {self.out}")
        return s + (f"\nscores: {json.dumps(self.scores)}" if self.scores else "")


def _record(item: Item, work: Work, empty: dict) -> dict:
    """One item's record; never raises (a failure is the record's `error`)."""
    t0 = time.perf_counter()
    fields, error = dict(empty), item.error
    if error is None:
        try:
            fields.update(work(item))
        except ItemError as e:
            fields, error = {**empty, **e.fields}, str(e)
        except Exception as e:  # any per-item failure is data; the job continues
            fields, error = dict(empty), f"{type(e).__name__}: {e}"
            log.debug("item %s failed", item.id, exc_info=True)
    rec = {"id": item.id, "source": item.source, "page": item.page, **fields,
           "seconds": round(time.perf_counter() - t0, 4), "error": error}
    try:
        json_line(rec)
    except (TypeError, ValueError) as e:  # a field that is not JSON
        rec = {**rec, **empty, "error": f"unserialisable result: {e}"}
    return rec


def _records(plan: Plan, work: Work, empty: dict, concurrency: int):
    """Records in input order. With concurrency > 1, `concurrency` items run at once in worker threads (image
    decoding and PDF rendering included, off the writer's path), so their model calls batch in the engine;
    a window of twice that many is in flight."""
    if concurrency <= 1:
        for item in plan.todo:
            yield _record(item, work, empty)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    todo = iter(plan.todo)
    with ThreadPoolExecutor(concurrency, thread_name_prefix="mmstack-job") as pool:
        window: deque = deque()

        def more() -> None:
            item = next(todo, None)
            if item is not None:
                window.append(pool.submit(_record, item, work, empty))

        for _ in range(2 * concurrency):
            more()
        try:
            while window:
                rec = window.popleft().result()
                more()
                yield rec
        finally:
            for f in window:  # stopped early (an interrupt): drop what has not started
                f.cancel()


def execute(plan: Plan, work: Work, *, empty: Optional[dict] = None, scorer: Optional[Scorer] = None,
            progress: bool = True, desc: str = "items", concurrency: int = 1) -> Summary:
    """Run `work` on each planned item and append one record per item to `plan.out`, in input order, flushed
    and fsynced as it completes: `{id, source, page, **work(item), seconds, error}`. An exception from `work`
    (or an unreadable input) is recorded as `error` with the fields of `empty` set, and the run goes on.
    `concurrency` items run at once (see `_records`). `scorer` gets (record, answer) pairs for this shard's
    items that carry an answer, including those done by earlier runs."""
    from tqdm.auto import tqdm

    empty = dict(empty or {})
    done = errors = 0
    start = time.perf_counter()
    bar = tqdm(total=len(plan.todo), desc=desc, unit="item", disable=not progress)
    with open(plan.out, "wb" if plan.fresh else "ab") as f, bar:
        for rec in _records(plan, work, empty, concurrency):
            f.write(json_line(rec))
            f.flush()
            os.fsync(f.fileno())
            done, errors = (done, errors + 1) if rec["error"] else (done + 1, errors)
            bar.update(1)
    summary = Summary(done, errors, plan.skipped, time.perf_counter() - start, plan.out)
    if scorer is not None:
        answers = {it.id: it.answer for it in plan.mine if it.answer is not None}
        if answers:
            pairs = [(r, answers[r["id"]]) for r in read_results(plan.out)[0] if r["id"] in answers]
            summary.scores = scorer(pairs)
    return summary


def run(items: Sequence[Item], work: Work, out: Union[str, Path], *, resume: bool = False,
        overwrite: bool = False, retry_errors: bool = False, shard: tuple[int, int] = (0, 1),
        empty: Optional[dict] = None, scorer: Optional[Scorer] = None, progress: bool = True,
        desc: str = "items", concurrency: int = 1) -> Summary:
    """`plan_run` then `execute`, holding the output's lock: the whole job in one call.

    Raises:
        UsageError: see `plan_run`; another process holds this output (`--out`).
    """
    with output_lock(shard_path(out, shard)):
        plan = plan_run(items, out, resume=resume, overwrite=overwrite, retry_errors=retry_errors, shard=shard)
        return execute(plan, work, empty=empty, scorer=scorer, progress=progress, desc=desc, concurrency=concurrency)


@contextmanager
def output_lock(results: Path):
    """Hold the results file's lock (`<results>.lock`); a second run on the same output is a `UsageError`."""
    from mmstack.io.lock import LockedError, exclusive_lock

    results = Path(results)
    try:
        with exclusive_lock(results.with_name(results.name + ".lock"), what=f"the output {results}"):
            yield
    except LockedError as e:
        raise UsageError(str(e)) from None


# ------------------------------------------------------------------------------------ command lines

def _shard_arg(text: str) -> tuple[int, int]:
    try:
        return parse_shard(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def add_job_arguments(p: argparse.ArgumentParser, *, out_help: str, prompt: str, max_new_tokens: int) -> None:
    """The flags `mmstack ocr` and `mmstack chart` share."""
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders (searched recursively), glob patterns, PDFs, .jsonl/.csv manifests")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--prompt", default=None,
                   help=f"question asked for every image (default: the model folder's own, from demo.json "
                        f"'tasks', else {prompt!r})")
    p.add_argument("--resume", action="store_true", help="continue an earlier run: skip ids already in the output")
    p.add_argument("--retry-errors", action="store_true", help="with --resume, redo the items that errored")
    p.add_argument("--overwrite", action="store_true", help="discard an existing output and start over")
    p.add_argument("--shard", type=_shard_arg, default=None, metavar="I/N",
                   help="process every N-th item from item I (default: RANK/WORLD_SIZE under torchrun); "
                        "writes a results file suffixed .shard-I-of-N")
    p.add_argument("--merge", action="store_true", help="combine the shard outputs of --out into --out, in input order")
    p.add_argument("--max-new-tokens", type=_positive_int, default=None,
                   help=f"answer length limit (default: the model folder's, else {max_new_tokens}; always capped to "
                        "what fits the model context)")
    p.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE,
                   help=f"items in flight at once, batched by the engine (default: {DEFAULT_BATCH_SIZE})")
    p.set_defaults(job_prompt=prompt, job_max_new_tokens=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding (default)")
    add_model_arguments(p)
    p.add_argument("--pdf-dpi", type=float, default=144.0, help="resolution PDF pages are rendered at")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def job_device(args) -> Optional[str]:
    """--device, else this process's GPU under torchrun (`cuda:$LOCAL_RANK`), else the default."""
    if args.device:
        return args.device
    local = os.environ.get("LOCAL_RANK")
    if local is not None and local.isdigit():
        import torch

        if torch.cuda.is_available():
            return f"cuda:{int(local) % max(torch.cuda.device_count(), 1)}"
    return None


def describe_from_args(args, name: str) -> tuple[Describe, str]:
    """(a `(image, prompt) -> text` function over `mmstack.load(args.model, ...)`, the prompt to ask): prompt
    and answer length from the flags, else the model folder's `tasks`, else the job's defaults. Answers are
    capped to what fits the context after each prompt."""
    import mmstack
    from mmstack.api import default_model_dir

    pipe = mmstack.load(args.model or default_model_dir(), **{**load_kwargs(args), "device": job_device(args)})
    own = task_defaults(pipe.source, name)
    prompt = args.prompt or own.get("prompt") or args.job_prompt
    max_new = args.max_new_tokens or own.get("max_new_tokens") or args.job_max_new_tokens
    pipe.engine_config.max_rows = max(pipe.engine_config.max_rows, args.batch_size)

    def describe(image, prompt: str) -> str:
        return pipe.describe(image, prompt, max_new_tokens=max_new, temperature=args.temperature, fit_context=True)

    return describe, prompt


def job_main(args, *, name: str, results: Path, work_for: Callable[[Describe, str], Work], empty: dict,
             scorer: Optional[Scorer], describe: Optional[Describe] = None) -> int:
    """The flow both CLIs share: expand inputs, lock the output and plan (usage errors -> exit 2), load the
    model only when something is left to do, run, print the summary. Item errors go to the output; the exit
    code is 1 when every item of the run failed.

    Args:
        args: the parsed `add_job_arguments` flags.
        name: the subcommand, for messages and the progress bar.
        results: the results file (one per shard: `shard_path`).
        work_for: builds the per-item work from a describe function and the prompt.
        describe: answers instead of the model of `--model` (which is then never loaded), e.g. a
            pipeline the caller already holds, or a stand-in in tests.
    Returns:
        0 when the job ran (or merged), 1 when every item failed, 2 for a usage error.
    """
    try:
        items = list(iter_items(args.inputs, pdf_dpi=args.pdf_dpi))
        if not items:
            raise UsageError("no images found in the inputs")
        if args.merge:
            n = merge(find_shards(results), results, order=[it.id for it in items])
            print(f"merged {n} records -> {results}")
            return 0
        try:
            shard = args.shard or resolve_shard(None)
        except ValueError as e:
            raise UsageError(f"RANK / WORLD_SIZE: {e}") from None
        with output_lock(shard_path(results, shard)):
            plan = plan_run(items, results, resume=args.resume, overwrite=args.overwrite,
                            retry_errors=args.retry_errors, shard=shard)
            prompt = args.prompt or args.job_prompt
            if describe is None and plan.todo:
                describe, prompt = describe_from_args(args, name)
            summary = execute(plan, work_for(describe, prompt), empty=empty, scorer=scorer,
                              progress=not args.no_progress, desc=name, concurrency=args.batch_size)
    except UsageError as e:
        print(f"mmstack {name}: error: {e}", file=sys.stderr)
        return 2
    print(summary)
    if summary.errors and not summary.done:
        print(f"mmstack {name}: error: every item failed (see the error field of {summary.out})", file=sys.stderr)
        return 1
    return 0


def module_main(name: str, add_arguments: Callable, main: Callable, argv: Optional[Sequence[str]] = None) -> int:
    """`python -m mmstack.apps.<name>`: the subcommand alone, with the `mmstack` exit codes.

    Args:
        add_arguments, main: the subcommand's `add_arguments(parser)` and `main(args) -> int`.
        argv: the arguments (default: `sys.argv[1:]`).
    """
    parser = argparse.ArgumentParser(prog=f"mmstack {name}")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return main(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for users, like `mmstack`
        print(f"mmstack {name}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1

"""The batch jobs' machinery (`mmstack ocr`, `mmstack chart`), in three modules re-exported here:

- `batch_inputs`: files, folders, globs, PDFs and manifests expanded into `Item`s;
- `batch_results`: results files, one per shard, read, written atomically and merged; `safe_name`;
- `batch_runner`: a resumable, shardable run writing one fsynced JSON line per item, and the command-line
  flow both jobs share.

    items = list(iter_items(["scans/", "invoices/*.pdf", "eval.jsonl"]))
    summary = run(items, lambda item: {"text": describe(item.load(), "Read the text.")}, "out.jsonl",
                  resume=True, shard=(0, 1))

Ids and paths read from inputs are data: they are never executed and never used to build a path outside
the output folder (`safe_name` turns an id into a file name).
"""
from __future__ import annotations

from .batch_inputs import (IMAGE_EXTENSIONS, MANIFEST_EXTENSIONS, PDF_MAX_PIXELS, Item, MissingDependency, PdfPage,
                           UsageError, iter_items)
from .batch_results import (find_shards, json_line, merge, parse_shard, read_results, resolve_shard, safe_name,
                            shard_path, write_results)
from .batch_runner import (DEFAULT_BATCH_SIZE, Describe, ItemError, Plan, Scorer, Summary, Work, add_job_arguments,
                           describe_from_args, execute, job_main, module_main, output_lock, plan_run, run, task_defaults)

__all__ = ["IMAGE_EXTENSIONS", "MANIFEST_EXTENSIONS", "PDF_MAX_PIXELS", "Item", "MissingDependency", "PdfPage",
           "UsageError", "iter_items",
           "find_shards", "json_line", "merge", "parse_shard", "read_results", "resolve_shard", "safe_name",
           "shard_path", "write_results",
           "DEFAULT_BATCH_SIZE", "Describe", "ItemError", "Plan", "Scorer", "Summary", "Work", "add_job_arguments",
           "describe_from_args", "execute", "job_main", "module_main", "output_lock", "plan_run", "run", "task_defaults"]

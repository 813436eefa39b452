"""Outputs of the batch jobs: one JSON line per item in a results file, one file per shard, merged at the end.

    out = shard_path("results.jsonl", (2, 8))            # results.shard-2-of-8.jsonl
    merge(find_shards("results.jsonl"), "results.jsonl", order=[it.id for it in items])

`safe_name` turns an item id into a file name, so an id never builds a path outside the output folder.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from mmstack.io.atomic import atomic_write_bytes

from .batch_inputs import UsageError


def safe_name(item_id: str, max_len: int = 80) -> str:
    """A file name for an id: only `A-Za-z0-9._-`, no leading dot, plus a hash so distinct ids never share
    a name (`../a/b.png#page=2` -> `a_b.png_page_2-1b2c3d4e`)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", item_id).strip("._-")[:max_len] or "item"
    return f"{stem}-{hashlib.sha1(item_id.encode('utf-8', 'replace')).hexdigest()[:8]}"


# ------------------------------------------------------------------------------------------- sharding

def parse_shard(text: str) -> tuple[int, int]:
    """`"i/n"` -> (i, n) with 0 <= i < n."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"--shard must be i/n with 0 <= i < n, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def resolve_shard(arg: Optional[str], env=os.environ) -> tuple[int, int]:
    """`--shard` when given, else torchrun's RANK / WORLD_SIZE, else (0, 1)."""
    if arg:
        return parse_shard(arg)
    if "WORLD_SIZE" in env and "RANK" in env:
        return parse_shard(f"{env['RANK']}/{env['WORLD_SIZE']}")
    return 0, 1


def shard_path(out: Union[str, Path], shard: tuple[int, int]) -> Path:
    """`results.jsonl` for one shard, `results.shard-2-of-8.jsonl` for shard 2 of 8."""
    out = Path(out)
    i, n = shard
    return out if n == 1 else out.with_name(f"{out.stem}.shard-{i}-of-{n}{out.suffix}")


def find_shards(out: Union[str, Path]) -> list[Path]:
    """All shard files of `out`, checked to form one complete set."""
    out = Path(out)
    pat = re.compile(re.escape(out.stem) + r"\.shard-(\d+)-of-(\d+)" + re.escape(out.suffix))
    found = {}
    for f in out.parent.glob(f"{glob.escape(out.stem)}.shard-*-of-*{out.suffix}"):
        m = pat.fullmatch(f.name)
        if m:
            found[(int(m.group(1)), int(m.group(2)))] = f
    sizes = {n for _, n in found}
    if not found:
        raise UsageError(f"no shard outputs {out.stem}.shard-*-of-*{out.suffix} in {out.parent}")
    if len(sizes) > 1:
        raise UsageError(f"shard outputs of different shard counts {sorted(sizes)} in {out.parent}")
    n = sizes.pop()
    missing = [i for i in range(n) if (i, n) not in found]
    if missing:
        raise UsageError(f"missing shard outputs {missing} of {n} in {out.parent}")
    return [found[(i, n)] for i in range(n)]


# ------------------------------------------------------------------------------------------- results

def read_results(path: Union[str, Path]) -> tuple[list[dict], int]:
    """The valid records of a results file (first per id) and how many lines were dropped: a truncated
    last line from a killed run, or anything that is not a JSON object with a string id."""
    p = Path(path)
    if not p.exists():
        return [], 0
    records, ids, dropped = [], set(), 0
    chunks = p.read_bytes().split(b"\n")
    if chunks[-1].strip():
        dropped += 1  # no final newline: the write was cut off
    for raw in chunks[:-1]:
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):
            dropped += 1
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("id"), str) or rec["id"] in ids:
            dropped += 1
            continue
        ids.add(rec["id"])
        records.append(rec)
    return records, dropped


def json_line(record: dict) -> bytes:
    """One results line: compact UTF-8 JSON and a newline.

    Raises:
        TypeError, ValueError: a field is not JSON (NaN and infinities included).
    """
    return (json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def write_results(path: Union[str, Path], records: Iterable[dict]) -> None:
    """Replace `path` atomically with these records (`mmstack.io.atomic`: temporary file, fsync, rename)."""
    atomic_write_bytes(path, b"".join(json_line(rec) for rec in records))


def merge(parts: Sequence[Union[str, Path]], out: Union[str, Path], order: Optional[Sequence[str]] = None) -> int:
    """Combine per-shard results into `out`: one record per id (a success over an error, else the first),
    in the order of `order` (ids not in it follow in file order).

    Returns:
        the number of records written.
    """
    best: dict[str, dict] = {}
    for part in parts:
        for rec in read_results(part)[0]:
            prev = best.get(rec["id"])
            if prev is None or (prev.get("error") and not rec.get("error")):
                best[rec["id"]] = rec
    rank = {k: n for n, k in enumerate(order or [])}
    records = sorted(best.values(), key=lambda r: rank.get(r["id"], len(rank)))  # stable: file order after
    write_results(out, records)
    return len(records)

"""Shared machinery of the batch jobs (`mmstack ocr`, `mmstack chart`): input expansion, a resumable,
shardable runner that writes one JSON line per item, and merging of per-shard outputs.

    items = list(iter_items(["scans/", "invoices/*.pdf", "eval.jsonl"]))
    summary = run(items, lambda item: {"text": describe(item.load(), "Read the text.")}, "out.jsonl",
                  resume=True, shard=(0, 1))

Ids and paths read from inputs are data: they are never executed and never used to build a path outside
the output folder (`safe_name` turns an id into a file name).

For tests only, both CLIs take a hidden `--fake-model KIND[:SECONDS]` that replaces the model with
`fake_describe`, a deterministic stand-in that reads the image and answers from its size and colour,
optionally sleeping SECONDS per item (KIND is `text` or `table`).
"""
from __future__ import annotations

import argparse
import csv
import glob
import hashlib
import io
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MANIFEST_EXTENSIONS = frozenset({".jsonl", ".csv"})
PDF_MAX_PIXELS = 40_000_000  # a rendered page is scaled down to stay under this

Describe = Callable[[Any, str], str]  # (image: path or PIL image, prompt) -> answer


class UsageError(ValueError):
    """A problem with the command line: missing inputs, an output that exists without --resume, ..."""


class MissingDependency(RuntimeError):
    """An optional package needed for these inputs is not installed."""


@dataclass(frozen=True)
class PdfPage:
    """One page of a PDF, rendered on demand (so shards and resumed runs never render pages they skip)."""

    path: str
    index: int  # 0-based
    dpi: float = 144.0

    def render(self):
        pdfium = _pdfium()
        doc = pdfium.PdfDocument(self.path)
        try:
            page = doc[self.index]
            w, h = page.get_size()  # points, 1/72 inch
            scale = self.dpi / 72.0
            scale = min(scale, math.sqrt(PDF_MAX_PIXELS / max(w * h, 1.0)))
            return page.render(scale=scale).to_pil().convert("RGB")
        finally:
            doc.close()


@dataclass
class Item:
    """One unit of work. `image` is a path, a PIL image, or a `PdfPage`; `load()` gives a path or PIL
    image that `Pipeline.describe` accepts. `error` is set when the input itself was unreadable."""

    id: str
    source: str
    page: Optional[int] = None  # 1-based PDF page
    image: Any = None
    answer: Any = None
    error: Optional[str] = None

    def load(self):
        return self.image.render() if isinstance(self.image, PdfPage) else self.image


# ----------------------------------------------------------------------------------------------- inputs

def iter_items(inputs: Iterable[Union[str, os.PathLike]], pdf_dpi: float = 144.0) -> Iterator[Item]:
    """Expand files, folders (recursive, image files), glob patterns, PDFs (one item per page) and
    manifests (`.jsonl` / `.csv` with `id`, `image`, optional `answer`; image paths relative to the
    manifest) into items, in a stable order. Ids: the manifest id, else the path as given (plus
    `#page=N` for PDF pages). A repeated id is skipped with a warning.

    Raises:
        UsageError: an input matches nothing, or a CSV manifest has no `image` column.
        MissingDependency: a PDF is given and pypdfium2 is not installed.
    """
    seen: set[str] = set()
    for raw in inputs:
        for item in _expand(os.fspath(raw), pdf_dpi):
            if item.id in seen:
                log.warning("skipping %s from %s: the id was already seen", item.id, item.source)
                continue
            seen.add(item.id)
            yield item


_LONE_SURROGATE = re.compile("[\ud800-\udc7f\udd00-\udfff]")  # outside the surrogateescape range


def _clean(s: str) -> str:
    # File names that are not UTF-8 arrive as surrogate escapes, and JSON may spell a lone surrogate
    # ("\ud800"); ids must be writable as UTF-8 JSON: both become U+FFFD.
    s = _LONE_SURROGATE.sub("\ufffd", s)
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _path_id(p: str) -> str:
    return _clean(Path(os.path.normpath(p)).as_posix())


def _expand(raw: str, pdf_dpi: float) -> Iterator[Item]:
    if not os.path.exists(raw) and any(c in raw for c in "*?["):
        matches = sorted(glob.glob(raw, recursive=True))
        if not matches:
            raise UsageError(f"{raw}: no files match this pattern")
        for m in matches:
            yield from _expand_path(m, pdf_dpi, from_glob=True)
        return
    if not os.path.exists(raw):
        raise UsageError(f"{raw}: no such file or folder")
    yield from _expand_path(raw, pdf_dpi)


def _expand_path(p: str, pdf_dpi: float, from_glob: bool = False) -> Iterator[Item]:
    suffix = Path(p).suffix.lower()
    if os.path.isdir(p):
        found = False
        for f in _walk_images(p):
            found = True
            yield Item(id=_path_id(f), source=_clean(f), image=f)
        if not found:
            log.warning("%s: no image files (%s) in this folder", p, ", ".join(sorted(IMAGE_EXTENSIONS)))
    elif suffix == ".pdf":
        yield from _pdf_items(p, pdf_dpi)
    elif suffix in MANIFEST_EXTENSIONS:
        yield from _manifest_items(p)
    elif from_glob and suffix not in IMAGE_EXTENSIONS:
        log.debug("glob match %s is not an image; skipped", p)
    else:  # a file named explicitly is tried as an image; an unreadable one becomes an error line
        yield Item(id=_path_id(p), source=_clean(p), image=p)


def _walk_images(root: str) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                yield os.path.join(dirpath, name)


def _pdfium():
    try:
        import pypdfium2
    except ImportError as e:
        raise MissingDependency("reading PDFs needs pypdfium2: pip install pypdfium2") from e
    return pypdfium2


def _pdf_items(p: str, pdf_dpi: float) -> Iterator[Item]:
    pdfium = _pdfium()
    base = _path_id(p)
    try:
        doc = pdfium.PdfDocument(p)
        try:
            n = len(doc)
        finally:
            doc.close()
    except Exception as e:  # pdfium raises PdfiumError for damaged files; the run goes on
        yield Item(id=base, source=_clean(p), error=f"cannot read PDF: {type(e).__name__}: {e}")
        return
    for k in range(n):
        yield Item(id=f"{base}#page={k + 1}", source=_clean(p), page=k + 1, image=PdfPage(p, k, pdf_dpi))


def _manifest_items(p: str) -> Iterator[Item]:
    rows = _jsonl_rows(p) if p.lower().endswith(".jsonl") else _csv_rows(p)
    base, folder = _path_id(p), os.path.dirname(p)
    for line, row, error in rows:
        if error is None:
            image = row.get("image")
            if not isinstance(image, str) or not image.strip():
                error = "missing 'image'"
        if error is not None:
            yield Item(id=f"{base}:{line}", source=_clean(p), error=f"{base} line {line}: {error}")
            continue
        rid = row.get("id")
        rid = str(rid).strip() if rid is not None and not isinstance(rid, (dict, list)) else ""
        path = os.path.join(folder, image.strip())
        yield Item(id=_clean(rid) or _path_id(image.strip()), source=_clean(path), image=path,
                   answer=row.get("answer"))


def _jsonl_rows(p: str) -> Iterator[tuple[int, dict, Optional[str]]]:
    with open(p, "rb") as f:
        for line, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8").strip().lstrip("\ufeff")
            except UnicodeDecodeError:
                yield line, {}, "not valid UTF-8"
                continue
            if not text:
                continue
            try:
                row = json.loads(text)
            except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
                yield line, {}, f"not valid JSON ({type(e).__name__}: {str(e)[:200]})"
                continue
            yield (line, row, None) if isinstance(row, dict) else (line, {}, "not a JSON object")


_BAD_UTF8 = re.compile("[\udc80-\udcff]")


def _csv_rows(p: str) -> Iterator[tuple[int, dict, Optional[str]]]:
    # Decoded with surrogate escapes so one bad record (quoted answers may span lines) is reported alone.
    text = Path(p).read_bytes().decode("utf-8", "surrogateescape").lstrip("\ufeff")
    # No field can be longer than the file: lift csv's 128 KiB default so a long answer is not "malformed"
    # (which would skip the rest of the manifest). The limit is process-wide; it only ever grows here.
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))
    reader = csv.DictReader(io.StringIO(text, newline=""))
    fields = [(f or "").strip() for f in (reader.fieldnames or [])]
    if "image" not in fields:
        raise UsageError(f"{p}: a CSV manifest needs a header row with an 'image' column (and 'id', 'answer')")
    reader.fieldnames = fields
    try:
        for row in reader:
            values = [v for v in row.values() if isinstance(v, str)]
            if any(_BAD_UTF8.search(v) for v in values):
                yield reader.line_num, {}, "not valid UTF-8"
            else:
                # an empty answer cell means "no answer", not "the answer is empty"
                kept = {k: v for k, v in row.items() if k in ("id", "image", "answer") and v != ""}
                yield reader.line_num, kept, None
    except csv.Error as e:  # the reader cannot resynchronise; report and stop reading this manifest
        yield reader.line_num, {}, f"malformed CSV, rest of the manifest skipped ({e})"


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


def _line(record: dict) -> bytes:
    return (json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def write_results(path: Union[str, Path], records: Iterable[dict]) -> None:
    """Replace `path` atomically with these records (temporary file, fsync, rename)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        for rec in records:
            f.write(_line(rec))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


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


Work = Callable[[Item], dict]
Scorer = Callable[[list[tuple[dict, Any]]], dict]


def execute(plan: Plan, work: Work, *, empty: Optional[dict] = None, scorer: Optional[Scorer] = None,
            progress: bool = True, desc: str = "items") -> Summary:
    """Run `work` on each planned item in order and append one record per item to `plan.out`, flushed and
    fsynced as it completes: `{id, source, page, **work(item), seconds, error}`. An exception from `work`
    (or an unreadable input) is recorded as `error` with the fields of `empty` set, and the run goes on.
    `scorer` gets (record, answer) pairs for this shard's items that carry an answer, including those
    done by earlier runs."""
    from tqdm.auto import tqdm

    empty = dict(empty or {})
    done = errors = 0
    start = time.perf_counter()
    bar = tqdm(total=len(plan.todo), desc=desc, unit="item", disable=not progress)
    with open(plan.out, "wb" if plan.fresh else "ab") as f, bar:
        for item in plan.todo:
            t0 = time.perf_counter()
            fields, error = dict(empty), item.error
            if error is None:
                try:
                    fields.update(work(item))
                except Exception as e:  # any per-item failure is data; the job continues
                    fields, error = dict(empty), f"{type(e).__name__}: {e}"
                    log.debug("item %s failed", item.id, exc_info=True)
            rec = {"id": item.id, "source": item.source, "page": item.page, **fields,
                   "seconds": round(time.perf_counter() - t0, 4), "error": error}
            try:
                line = _line(rec)
            except (TypeError, ValueError) as e:  # a field that is not JSON
                rec = {**rec, **empty, "error": f"unserialisable result: {e}"}
                line = _line(rec)
            f.write(line)
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
        desc: str = "items") -> Summary:
    """`plan_run` then `execute`: the whole job in one call."""
    plan = plan_run(items, out, resume=resume, overwrite=overwrite, retry_errors=retry_errors, shard=shard)
    return execute(plan, work, empty=empty, scorer=scorer, progress=progress, desc=desc)


def merge(parts: Sequence[Union[str, Path]], out: Union[str, Path], order: Optional[Sequence[str]] = None) -> int:
    """Combine per-shard results into `out`: one record per id (a success over an error, else the first),
    in the order of `order` (ids not in it follow in file order). Returns the number of records."""
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


# --------------------------------------------------------------------------------------- test support

def fake_describe(spec: str) -> Describe:
    """For tests only: a deterministic stand-in for a model, `KIND[:SECONDS]`. It loads the image like a
    model would (so unreadable files fail the same way) and answers from its size and corner colour:
    KIND `text` -> `"64x48 #ff0000"`, KIND `table` -> a markdown table with prose around it."""
    kind, _, seconds = spec.partition(":")
    if kind not in ("text", "table"):
        raise UsageError(f"--fake-model must be text[:seconds] or table[:seconds], got {spec!r}")
    delay = float(seconds or 0)

    def describe(image, prompt: str) -> str:
        from mmstack.vision.image_io import load_image

        img = load_image(image)
        time.sleep(delay)
        r, g, b = img.getpixel((0, 0))
        if kind == "text":
            return f"{img.width}x{img.height} #{r:02x}{g:02x}{b:02x}"
        return (f"Here is the data.\nTitle: Size of image\n\n| Measure | Pixels |\n|---|---|\n"
                f"| width | {img.width} px |\n| height | {img.height} px |\n| red | {r} |\n\nHope this helps!")

    return describe



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
    p.add_argument("--prompt", default=prompt, help=f"question asked for every image (default: {prompt!r})")
    p.add_argument("--resume", action="store_true", help="continue an earlier run: skip ids already in the output")
    p.add_argument("--retry-errors", action="store_true", help="with --resume, redo the items that errored")
    p.add_argument("--overwrite", action="store_true", help="discard an existing output and start over")
    p.add_argument("--shard", type=_shard_arg, default=None, metavar="I/N",
                   help="process every N-th item from item I (default: RANK/WORLD_SIZE under torchrun); "
                        "writes a results file suffixed .shard-I-of-N")
    p.add_argument("--merge", action="store_true", help="combine the shard outputs of --out into --out, in input order")
    p.add_argument("--max-new-tokens", type=_positive_int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding (default)")
    p.add_argument("--model", default=None, help="model folder (default: the embedded demo model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or tokenizer.json (default: found in --model)")
    p.add_argument("--pdf-dpi", type=float, default=144.0, help="resolution PDF pages are rendered at")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--fake-model", default=None, help=argparse.SUPPRESS)  # tests only: see fake_describe


def describe_from_args(args) -> Describe:
    """A `(image, prompt) -> text` function over `mmstack.load(args.model, ...)` (or the test fake)."""
    if args.fake_model:
        return fake_describe(args.fake_model)
    import mmstack
    from mmstack.api import default_model_dir

    pipe = mmstack.load(args.model or default_model_dir(), device=args.device, dtype=args.dtype,
                        tokenizer=args.tokenizer)

    def describe(image, prompt: str) -> str:
        return pipe.describe(image, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature)

    return describe


def job_main(args, *, name: str, results: Path, work_for: Callable[[Describe], Work], empty: dict,
             scorer: Optional[Scorer]) -> int:
    """The flow both CLIs share: expand inputs, plan (usage errors -> exit 2), load the model only when
    something is left to do, run, print the summary. Item errors go to the output, not the exit code."""
    try:
        if args.fake_model:
            fake_describe(args.fake_model)  # validate before any work
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
        plan = plan_run(items, results, resume=args.resume, overwrite=args.overwrite,
                        retry_errors=args.retry_errors, shard=shard)
    except UsageError as e:
        print(f"mmstack {name}: error: {e}", file=sys.stderr)
        return 2
    describe = describe_from_args(args) if plan.todo else None
    summary = execute(plan, work_for(describe), empty=empty, scorer=scorer, progress=not args.no_progress, desc=name)
    print(summary)
    return 0


def module_main(name: str, add_arguments: Callable, main: Callable) -> int:
    """`python -m mmstack.apps.<name>`: the subcommand alone, with the `mmstack` exit codes."""
    parser = argparse.ArgumentParser(prog=f"mmstack {name}")
    add_arguments(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return main(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for users, like `mmstack`
        print(f"mmstack {name}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1

"""Fine-tuning data: LLaVA JSON, ShareGPT JSON/JSONL and messages JSONL, normalised to one `Example`
type; image paths are relative to the data file. Validation reports `file:line` for each problem. Files are read
as a stream (`data_stream`): `iter_examples` holds one record at a time, whatever the file size.

    LLaVA:    [{"id", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}]}]
    ShareGPT: {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}], "images": [...]}
    messages: {"messages": [{"role": "user"|"assistant"|"system", "content": ...}], "images": [...]}
    t2i:      {"prompt": "...", "image": "x.png"}   (text-to-image pairs, for generation training)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Union

from .data_stream import JSON_MAX_BYTES, DataError, records as _records

__all__ = ["DataError", "Example", "JSON_MAX_BYTES", "iter_examples", "load_examples", "problems"]

IMAGE_TAG = "<image>"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
          "system": "system"}


@dataclass
class Example:
    id: str
    where: str  # file:line
    messages: list = field(default_factory=list)  # [{"role", "content" (str with <image> tags)}]
    images: list = field(default_factory=list)  # absolute paths
    prompt: Optional[str] = None  # t2i pairs
    task: Optional[str] = None

    @property
    def is_t2i(self) -> bool:
        return self.prompt is not None


def _turns(obj: dict, key: str) -> list:
    turns = obj[key]
    if not isinstance(turns, list) or not all(isinstance(m, dict) for m in turns):
        raise DataError(f"'{key}' must be a list of objects")
    return turns


def _normalise(obj, base: Path, where: str, idx: int) -> Example:
    if not isinstance(obj, dict):
        raise DataError("a record must be a JSON object")
    ex_id = str(obj.get("id", f"{base.name}-{idx}"))
    images = obj.get("images", obj.get("image")) or []
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise DataError("'images' must be a path or a list of paths")
    paths = [str((base / p)) if not Path(p).is_absolute() else p for p in images]
    if "prompt" in obj and "messages" not in obj and "conversations" not in obj:
        if not isinstance(obj["prompt"], str):
            raise DataError("'prompt' must be a string")
        return Example(ex_id, where, images=paths, prompt=obj["prompt"], task="t2i")
    if "messages" in obj:
        msgs = [{"role": m.get("role"), "content": m.get("content")} for m in _turns(obj, "messages")]
    elif "conversations" in obj:
        msgs = [{"role": _ROLES.get(m.get("from"), m.get("from")) if isinstance(m.get("from"), str) else m.get("from"),
                 "content": m.get("value")} for m in _turns(obj, "conversations")]
    else:
        raise DataError("no 'messages', 'conversations' or 'prompt' field")
    for m in msgs:
        if m["role"] not in ("user", "assistant", "system"):
            raise DataError(f"unknown role {m['role']!r:.40}")
        if not isinstance(m["content"], str):
            raise DataError(f"{m['role']} content must be a string")
    return Example(ex_id, where, messages=msgs, images=paths, task=obj.get("task"))


def problems(ex: Example, check_images: bool = True, fits=None) -> list[str]:
    """What is wrong with an example (empty list when it is usable). Images are decoded as training decodes
    them (`mmstack.vision.image_io`, its limits included), so a truncated or corrupt file is found here, not
    at the step that would load it; `fits(example) -> problem or None` checks it against the model."""
    out = []
    if ex.is_t2i:
        if not ex.prompt.strip():
            out.append("empty prompt")
        if len(ex.images) != 1:
            out.append(f"a text-to-image pair needs exactly one image, got {len(ex.images)}")
    else:
        tags = sum(m["content"].count(IMAGE_TAG) for m in ex.messages)
        if tags != len(ex.images):
            out.append(f"{tags} {IMAGE_TAG} tag(s) but {len(ex.images)} image(s)")
        answers = [m for m in ex.messages if m["role"] == "assistant"]
        if not answers:
            out.append("no assistant turn")
        if any(not m["content"].strip() for m in answers):
            out.append("empty assistant turn")
    if check_images:
        from mmstack.vision.image_io import ImageError, load_image

        for p in ex.images:
            try:
                found = Path(p).is_file()
            except (OSError, ValueError) as e:  # a name too long for the file system, an embedded NUL byte
                out.append(f"unusable image path {p[:200]!r} ({type(e).__name__})")
                continue
            if not found:
                out.append(f"missing image {p}")
                continue
            try:
                load_image(p)
            except ImageError as e:  # truncated, corrupt, too large, not an image
                out.append(f"unreadable image: {e}")
    if not out and fits is not None:
        issue = fits(ex)
        if issue:
            out.append(issue)
    return out


def iter_examples(paths: Union[str, Path, list], check_images: bool = True, fits=None
                  ) -> Iterator[tuple[Optional[Example], list[str]]]:
    """Read and validate data files as a stream: (example, []) for each usable record, (None, ["file:line:
    problem", ...]) for each unusable one, in file order; one record is in memory at a time.

    Raises:
        DataError: a data file is missing or not a regular file.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    for path in map(Path, paths):
        if not path.exists():
            raise DataError(f"{path}: no such data file")  # a FIFO, device or folder: refused by name in `records`
        for n, obj in _records(path):
            where = f"{path}:{n}"
            try:
                if isinstance(obj, DataError):
                    raise obj
                ex = _normalise(obj, path.parent, where, n)
                issues = problems(ex, check_images, fits)
            except DataError as e:
                issues = [str(e)]
            yield (None, [f"{where}: {p}" for p in issues]) if issues else (ex, [])


def load_examples(paths: Union[str, Path, list], skip_bad: bool = False, check_images: bool = True, fits=None
                  ) -> tuple[list[Example], list[str]]:
    """Read and validate data files (`iter_examples`). Returns (examples, skipped problems).

    Any file content is data: a record of the wrong shape, invalid UTF-8 or JSON, or an unusable image path
    is a problem of its `file:line`, never another exception.

    Raises:
        DataError: a data file is missing, or (unless `skip_bad`, which drops and reports them) listing every
            `file:line: problem`.
    """
    good, bad = [], []
    for ex, issues in iter_examples(paths, check_images, fits):
        if ex is None:
            bad.extend(issues)
        else:
            good.append(ex)
    if bad and not skip_bad:
        shown = "\n".join(bad[:20]) + (f"\n... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise DataError(f"{len(bad)} problem(s) in the training data (use --skip-bad to drop them):\n{shown}")
    return good, bad

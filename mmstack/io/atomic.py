"""Atomic file writes: a temporary file in the same folder, written, flushed and fsynced, then renamed over
the target and the folder fsynced. A reader sees the old file or the new one, never a torn one, and a kill
mid-write leaves at most a `.tmp-*` file that `clean_stale_temps` removes at the next start. The folder
must exist.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Union

PathLike = Union[str, os.PathLike]
TMP_PREFIX = ".tmp-"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic(path: PathLike, write: Callable, mode: int) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp creates 0600; outputs are ordinary readable files
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_path(path: PathLike, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path beside `path` for a writer that wants a file name (e.g. safetensors'
    `save_file`); on success it is fsynced and renamed over `path`, on failure removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: PathLike, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` atomically (see the module docstring)."""
    _atomic(path, lambda f: f.write(data), mode)


def atomic_write_text(path: PathLike, text: str, mode: int = 0o644) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_json(path: PathLike, data: Any, mode: int = 0o644) -> None:
    """`data` as indented JSON (UTF-8, trailing newline), written atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n", mode)


def atomic_torch_save(obj: Any, path: PathLike, mode: int = 0o644) -> None:
    """`torch.save(obj)` to `path` atomically."""
    import torch

    _atomic(path, lambda f: torch.save(obj, f), mode)


def clean_stale_temps(folder: PathLike, prefix: str = TMP_PREFIX, older_than_s: float = 0) -> int:
    """Remove temporary files left in `folder` by interrupted atomic writes; returns how many were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    now, n = time.time(), 0
    for p in folder.iterdir():
        if p.name.startswith(prefix) and p.is_file():
            try:
                if now - p.stat().st_mtime >= older_than_s:
                    p.unlink()
                    n += 1
            except OSError:
                continue
    return n

"""Atomic file writes: whoever reads the target (a reader now, or a run restarted after a kill or a power cut)
finds the old file or the new one, never a torn one.

    atomic_write_json(out / "build.json", meta)
    atomic_torch_save(state, out / "checkpoint" / "state.pt")

The protocol: a temporary file in the target's folder (`.tmp-*`; the same file system, so the final rename is
atomic), write, flush, fsync, chmod, `os.replace` over the target, then fsync the folder so that the rename
itself is durable. On any failure the temporary file is removed and the target is left as it was. The folder
must exist. A kill between `mkstemp` and the rename can still leave a `.tmp-*` file behind:
`clean_stale_temps` removes those at the next start.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Callable, Union

PathLike = Union[str, os.PathLike]
TEMP_PREFIX = ".tmp-"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: PathLike, fill: Callable[[IO[bytes]], None], mode: int) -> None:
    """The protocol above, with `fill(f)` writing the content into the open temporary file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp creates 0o600
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too: never leave the temporary file
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` atomically and durably.

    Args:
        path: the target file; its folder must exist.
        data: the whole new content.
        mode: permission bits of the new file (applied as given, not masked by the umask).
    Raises:
        OSError: the folder is missing or not writable, the disk is full, ... (`path` is then unchanged).
    """
    _write(path, lambda f: f.write(data), mode)


def atomic_write_text(path: PathLike, text: str, mode: int = 0o644) -> None:
    """`atomic_write_bytes` of `text` encoded as UTF-8 (newlines written as given)."""
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_json(path: PathLike, data: Any, mode: int = 0o644) -> None:
    """`data` as JSON (indent 2, non-ASCII kept, a final newline), written atomically.

    Raises:
        TypeError, ValueError: `data` is not JSON-serialisable (nothing is written).
    """
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n", mode)


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """`torch.save(obj)` into `path` atomically (mode 0o644): a kill mid-save leaves the previous file loadable."""
    import torch  # only checkpoint writers pay for it

    _write(path, lambda f: torch.save(obj, f), 0o644)


def clean_stale_temps(folder: PathLike, prefix: str = TEMP_PREFIX, older_than_s: float = 0) -> int:
    """Remove the temporary files that interrupted atomic writes left in `folder` (not its sub-folders).

    Args:
        folder: where the writes went; a missing folder has nothing to clean.
        prefix: the temporary files' name prefix.
        older_than_s: only files last modified at least this long ago (0: all), so that a write still in
            progress in another process is spared.
    Returns:
        the number of files removed.
    """
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    cutoff = time.time() - older_than_s
    removed = 0
    for entry in entries:
        if not entry.name.startswith(prefix) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            if older_than_s > 0 and entry.stat(follow_symlinks=False).st_mtime > cutoff:
                continue
            os.unlink(entry.path)
            removed += 1
        except FileNotFoundError:  # another process cleaned or renamed it meanwhile
            continue
    return removed

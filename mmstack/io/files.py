"""Reading files whose paths come from outside (a model folder, a manifest, training data): regular files
only, of bounded size. A FIFO, device or socket (or a symlink to one, e.g. `/dev/zero`) is refused by name
before it is opened, so a read can neither hang nor run without bound.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Union

MAX_JSON_BYTES = 64 * 1024 * 1024  # config.json, processor configs, shard indexes, tokenizer.json


class UnsafeFileError(ValueError):
    """A path that is not a regular file, or a file larger than the caller's limit."""


def check_regular(path: Union[str, os.PathLike], what: str = "file", max_bytes: int | None = None) -> int:
    """Raise `UnsafeFileError` unless `path` (symlinks followed) is a regular file of at most `max_bytes`.

    Returns its size in bytes. A missing file raises `FileNotFoundError`.
    """
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise UnsafeFileError(f"{p}: cannot read this {what} ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file")
        raise UnsafeFileError(f"{p}: this {what} is {kind}, not a regular file")
    if max_bytes is not None and st.st_size > max_bytes:
        raise UnsafeFileError(f"{p}: this {what} has {st.st_size} bytes; the limit is {max_bytes}")
    return st.st_size


def read_bytes(path: Union[str, os.PathLike], max_bytes: int = MAX_JSON_BYTES, what: str = "file") -> bytes:
    """The bytes of a regular file of at most `max_bytes` (checked before and while reading)."""
    check_regular(path, what, max_bytes)
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # it grew after the check
        raise UnsafeFileError(f"{path}: this {what} has more than {max_bytes} bytes; the limit is {max_bytes}")
    return data


def read_text(path: Union[str, os.PathLike], max_bytes: int = MAX_JSON_BYTES, what: str = "file") -> str:
    """UTF-8 text of a bounded regular file (`UnicodeDecodeError` for other encodings)."""
    return read_bytes(path, max_bytes, what).decode("utf-8")

"""An exclusive lock on an output (a batch job's results file, a training run folder): a second process that
wants the same output is refused at once with a message naming the holder's PID, instead of both writing.

    with exclusive_lock(out_dir / ".lock", what=f"the run folder {out_dir}"):
        ...

The lock is `fcntl.flock` on a small file holding the holder's PID: the kernel releases it when the holder
exits, even when it is killed, so a stale file never blocks the next run.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union


class LockedError(RuntimeError):
    """Another process holds the lock."""


@contextmanager
def exclusive_lock(path: Union[str, os.PathLike], what: str = "this output") -> Iterator[Path]:
    """Hold an exclusive lock on `path` for the block; raise `LockedError` naming the holder's PID if taken."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no locking
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                raise LockedError(f"{what} is in use by another process (PID {holder}); wait for it to finish or "
                                  f"choose another output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing releases the flock

"""What a resumable fine-tuning run saves besides weights and optimizer: every random generator's state, and
the metrics file cut back to the checkpoint's step; and reading a checkpoint back safely.

A checkpoint is `state.pt` (written with `mmstack.io.atomic.atomic_torch_save`, so a kill leaves the previous one
whole) naming the folder of DCP shards that holds the weights and optimizer state (`sharded_checkpoint`).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from mmstack.io.atomic import atomic_write_text


def rng_state() -> dict:
    """The torch, Python and NumPy generator states, in types that `torch.load(weights_only=True)` reads."""
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_version": random.getstate()[0],
            "python_gauss": random.getstate()[2], "numpy": [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached]}


def set_rng_state(s: dict) -> None:
    """Restore the generators from `rng_state()`."""
    import numpy as np

    torch.set_rng_state(s["torch"])
    random.setstate((s["python_version"], tuple(s["python"]), s["python_gauss"]))
    kind, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def read_checkpoint(path: Path, mmap: bool = False) -> dict:
    """The saved training state at `path`, read with `weights_only=True`: a tampered file cannot run code, it is
    refused. `mmap`: under FSDP every rank reads the whole file, and the ranks then share one copy of its pages.

    Raises:
        CheckpointError: the file is not a checkpoint `torch.load(weights_only=True)` accepts.
    """
    from mmstack.io.checkpoint import CheckpointError

    from mmstack.io.files import UnsafeFileError, check_regular

    try:
        check_regular(path, "checkpoint")
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except UnsafeFileError as e:
        raise CheckpointError(str(e)) from None
    except Exception as e:
        raise CheckpointError(f"{path}: cannot resume from it: not a checkpoint torch.load(weights_only=True) "
                              f"accepts ({type(e).__name__}: {str(e)[:300]})") from None
    # the weights: a shard folder's name, or (checkpoints of earlier versions) full tensors inside
    keys = CHECKPOINT_KEYS if not isinstance(saved, dict) or "shards" not in saved else CHECKPOINT_KEYS[2:]
    missing = [k for k in keys if not isinstance(saved, dict) or k not in saved]
    if missing:
        what = type(saved).__name__ if not isinstance(saved, dict) else f"a dict without {missing}"
        raise CheckpointError(f"{path}: cannot resume from it: expected a training checkpoint, got {what}")
    state = saved["state"]
    if (not isinstance(state, dict) or not isinstance(state.get("step"), int) or not isinstance(state.get("pos"), dict)
            or not all(isinstance(v, int) and v >= 0 for v in state["pos"].values())):
        raise CheckpointError(f"{path}: cannot resume from it: its 'state' entry is damaged ({str(state)[:120]})")
    return saved


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "rng", "state")


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the metric lines up to `step` (a resumed run rewrites what followed its checkpoint)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
                keep.append(line)
        except (ValueError, RecursionError):
            continue  # a line cut by a kill, or damaged: dropped
    atomic_write_text(path, "".join(k + "\n" for k in keep))  # a kill now must not lose earlier lines

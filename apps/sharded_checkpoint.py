"""Resumable fine-tuning checkpoints as `torch.distributed.checkpoint` (DCP) shards: every process writes its own
shards of the trainable weights and of the optimizer state (under FSDP nothing is gathered), and rank 0 writes the
trainer state (scheduler, generators, data position) into `state.pt`, which names the shard folder. Loading
reshards: a checkpoint written by N processes resumes on M processes or on one, under FSDP, DDP or neither.

    OUT/checkpoint/state.pt           {"scheduler", "rng", "task_rng", "state", "shards": "shards-000004"}
    OUT/checkpoint/shards-000004/     .metadata, __0_0.distcp, __1_0.distcp, ...

A save writes the shards into `.tmp-shards-000004/`, renames that folder to `shards-000004/`, then replaces
`state.pt` atomically (`mmstack.io.atomic`), and only then removes older shard folders. `state.pt` is the commit
point: a kill at any moment leaves the previous `state.pt` and the folder it names whole, and a half-written folder
never looks complete (`run` removes `.tmp-*` folders at the next start). Frozen weights (the LoRA base, parts
outside `--train`) are not saved: they are what `--model` holds, and a resume loads them from there. The folder
must be one that every rank sees (a shared filesystem across nodes), as DCP's `FileSystemWriter` needs.

Reading is as safe as `torch.load(weights_only=True)`: DCP unpickles its `.metadata` and its non-tensor values with
plain pickle, so here the metadata goes through an allow-list of DCP's own classes and the values through
`weights_only=True`; anything else is a `CheckpointError`.
"""
from __future__ import annotations

import pickle
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from mmstack.errors import CheckpointError
from mmstack.io.atomic import TMP_PREFIX, atomic_torch_save

__all__ = ["save", "load", "clean_stale_folders", "read_shards"]

SHARDS = re.compile(r"shards-\d{6,}")


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank() -> int:
    return torch.distributed.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        torch.distributed.barrier()


@contextmanager
def _single_process_quiet():
    """DCP warns on every single-process save and load that it assumes one process: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _state_dicts(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state keyed by parameter name, trainable weights only; DTensor shards under FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, opt, options=StateDictOptions(ignore_frozen_params=True))


def save(folder: Path, model: nn.Module, opt: torch.optim.Optimizer, trainer: dict, step: int) -> None:
    """Write a checkpoint of `model` (the unwrapped model; FSDP-sharded or not) and `opt` at `step` into `folder`,
    with `trainer` (plain values and tensors, `torch.load(weights_only=True)` readable) as rank 0's trainer state.

    Every process calls it (DCP plans the write collectively); each writes only its own shards.
    """
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    name = f"shards-{step:06d}"
    tmp = folder / f"{TMP_PREFIX}{name}"
    if _rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # what a save killed at this step left
    _barrier()
    msd, osd = _state_dicts(model, opt)
    with _single_process_quiet():
        dcp.save({"model": msd, "optim": osd}, storage_writer=FileSystemWriter(tmp), no_dist=not _distributed())
    if _rank() == 0:  # dcp.save returned: every rank's shards and the metadata are written and fsynced
        final = folder / name
        if final.exists():  # renamed by a save that a kill stopped before its state.pt: never committed
            shutil.rmtree(final)
        tmp.rename(final)
        atomic_torch_save({**trainer, "shards": name}, folder / "state.pt")  # the commit (fsyncs the folder too)
        for old in folder.iterdir():
            if old.name != name and SHARDS.fullmatch(old.name) and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    _barrier()  # no rank starts the next step's save (or leaves) before the commit


def load(folder: Path, wrapped: nn.Module, model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Restore `model` and `opt` from the checkpoint in `folder`, resharded onto this run's processes; returns the
    trainer state `save` was given. Every process calls it. A checkpoint of an earlier version (full tensors inside
    `state.pt`) loads too.

    Args:
        wrapped: what the loop calls (DDP, the FSDP root, or `model` wrapped in nothing).
    Raises:
        CheckpointError: `state.pt` or the shards are damaged, refused as unsafe, or lack weights this model trains.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    from . import parallel
    from .checkpointing import read_checkpoint

    folder = Path(folder)
    saved = read_checkpoint(folder / "state.pt", mmap=parallel.is_fsdp(wrapped))
    if "shards" not in saved:
        parallel.load_state(wrapped, model, opt, saved["model"], saved["optimizer"])
        return saved
    shards = read_shards(folder, saved["shards"])
    msd, osd = _state_dicts(model, opt)  # creates the optimizer state that loading then overwrites
    keys = set(_Reader(shards).read_metadata().state_dict_metadata)
    missing = [k for k in msd if f"model.{k}" not in keys]
    if missing:
        raise CheckpointError(f"{shards}: cannot resume from it: it lacks {len(missing)} weight(s) this run trains "
                              f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); other --train, "
                              f"--lora-r or --lora-targets than the run that saved it?")
    # partial: a weight that never had a gradient has no optimizer state (`parallel.drop_unreached_grads`)
    _dcp_load({"model": msd, "optim": osd}, shards)
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd,
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))  # frozen: from --model
    for name, p in model.named_parameters():  # as `opt.load_state_dict` would: no state where none was saved
        if p in opt.state and f"optim.state.{name}.step" not in keys:
            opt.state.pop(p)
    return saved


def _dcp_load(state: dict, shards: Path) -> None:
    """`torch.distributed.checkpoint.load` of `shards` into `state` (in place) through the safe reader and planner.
    A failure on any rank becomes one `CheckpointError` (DCP raises a `BaseException` holding each rank's)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _single_process_quiet():
            dcp.load(state, storage_reader=_Reader(shards), planner=_Planner(allow_partial_load=True),
                     no_dist=not _distributed())
    except CheckpointException as e:
        errors = [exc for exc, _ in e.failures.values()]
        first = next((x for x in errors if isinstance(x, CheckpointError)), errors[0] if errors else e)
        if isinstance(first, CheckpointError):
            raise first from None
        raise CheckpointError(f"{shards}: cannot resume from it ({type(first).__name__}: {str(first)[:300]})") from None


def read_shards(folder: Path, name) -> Path:
    """The shard folder `state.pt` names, checked to be a `shards-N` folder inside `folder`."""
    if not isinstance(name, str) or not SHARDS.fullmatch(name):
        raise CheckpointError(f"{folder / 'state.pt'}: cannot resume from it: it names no shard folder ({name!r:.80})")
    shards = Path(folder) / name
    if not shards.is_dir() or shards.is_symlink():
        raise CheckpointError(f"{shards}: cannot resume from it: the shard folder its state.pt names is missing")
    return shards


def clean_stale_folders(folder: Path) -> int:
    """Remove the `.tmp-shards-*` folders of saves a kill interrupted; returns how many."""
    folder = Path(folder)
    n = 0
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(TMP_PREFIX) and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
                n += 1
    return n


# ------------------------------------------------------------------------------------------ safe reading

_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING",
                                              "MetadataIndex", "StorageMeta"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},  # a layout by name, from a table of layouts
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}
_TORCH_CONSTANTS = (torch.dtype, torch.layout, torch.memory_format)


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` (its dataclasses, sizes, dtypes); any other global is refused."""

    def find_class(self, module: str, name: str):
        allowed = name in _METADATA_CLASSES.get(module, ()) or (
            module == "torch" and isinstance(getattr(torch, name, None), _TORCH_CONSTANTS))
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")
        return super().find_class(module, name)


class _Reader(FileSystemReader):
    """DCP's file reader with `.metadata` read through `_MetadataUnpickler`."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        from mmstack.io.files import UnsafeFileError, check_regular

        rank = kwargs.get("rank")
        path = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
        try:
            check_regular(path, "checkpoint metadata")
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (UnsafeFileError, FileNotFoundError) as e:
            raise CheckpointError(f"{path}: cannot resume from it: {e}") from None
        except Exception as e:
            raise CheckpointError(f"{path}: cannot resume from it: not DCP metadata this reader accepts "
                                  f"({type(e).__name__}: {str(e)[:300]})") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: cannot resume from it: not DCP metadata ({type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _Planner(DefaultLoadPlanner):
    """DCP's load planner with non-tensor values (optimizer hyper-parameters) read with `weights_only=True`."""

    def load_bytes(self, read_item, value) -> None:
        try:
            torch.load(value, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"the value {read_item.dest_index.fqn!r} is refused: not readable with "
                                  f"weights_only=True ({type(e).__name__}: {str(e)[:200]})") from None
        value.seek(0)
        super().load_bytes(read_item, value)  # now known to hold only what weights_only allows

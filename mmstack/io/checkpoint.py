"""Checkpoint I/O: safetensors (single or sharded), `.bin` only through `torch.load(weights_only=True)`.

Models are built on the `meta` device and filled with `load_state_dict(assign=True)`, so the weights are
never held twice. Loading is strict: every checkpoint key is consumed and every parameter filled; errors
name the keys.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
from torch import nn

from ..errors import CheckpointError
from .atomic import atomic_path
from .files import UnsafeFileError, check_regular, read_text
from .keymaps import KeyTable, Slot

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit

_ST_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}

# Parameters kept in fp32 whatever dtype the model is loaded in (router numerics).
KEEP_FP32 = ("e_score_correction_bias",)


# ------------------------------------------------------------------------------------------ finding files


def find_weight_files(model_dir: os.PathLike, prefer: Optional[str] = None) -> list[Path]:
    """Weight files of a model folder: sharded or single safetensors, else `.bin` (weights_only)."""
    d = Path(model_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a directory")
    names = [prefer] if prefer else [SAFE_INDEX, SAFE_SINGLE, BIN_INDEX, BIN_SINGLE]
    for name in names:
        p = d / name
        if not p.exists():
            continue
        if name.endswith(".index.json"):
            return _shards_from_index(p)
        return [p]
    raise CheckpointError(f"{d}: no weights found (looked for {', '.join(names)})")


def _shards_from_index(index_path: Path) -> list[Path]:
    try:
        index = json.loads(read_text(index_path, what="shard index"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except UnsafeFileError as e:
        raise CheckpointError(str(e)) from None
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{index_path}: not a valid shard index ({type(e).__name__}: {e})") from None
    root = Path(os.path.abspath(index_path.parent))
    shards = []
    for key, fname in weight_map.items():
        if not isinstance(fname, str):
            raise CheckpointError(f"{index_path}: weight_map[{key!r}] is not a file name")
        # The name is data and is checked as written (no `..`, not absolute). Symlinks the folder itself holds
        # are followed, as for a single weight file: the Hugging Face cache links every shard to its blob.
        p = Path(os.path.normpath(root / fname))
        if root not in p.parents:
            raise CheckpointError(f"{index_path}: shard {fname!r} for {key!r} points outside the model folder")
        if not p.exists():
            raise CheckpointError(f"{index_path}: shard {fname!r} (for {key!r}) is missing")
        if p not in shards:
            shards.append(p)
    return shards


# ------------------------------------------------------------------------------------------ reading


def check_safetensors(path: os.PathLike) -> dict:
    """Validate a safetensors header against the file size before anything is allocated.

    Returns the header. Raises CheckpointError for any header that is truncated, not a JSON object, has a
    malformed entry, an unknown dtype, or offsets that do not match the shape or lie outside the file.
    """
    path = Path(path)
    try:
        size = check_regular(path, "weights file")
    except UnsafeFileError as e:  # a FIFO or a device would hang or read forever: refused before opening
        raise CheckpointError(str(e)) from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such weights file") from None
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise CheckpointError(f"{path}: safetensors header claims {n} bytes but the file has {size - 8} after the length")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # the reason only: never bytes of whatever the file holds
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not an object")
    data_len = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            numel = 1
            for s in shape:
                if not isinstance(s, int) or s < 0:
                    raise ValueError
                numel *= s
            if not (isinstance(dtype, str) and isinstance(begin, int) and isinstance(end, int)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed header entry for {key!r}") from None
        if dtype not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unknown dtype {dtype!r}")
        if not (0 <= begin <= end <= data_len) or end - begin != numel * _ST_DTYPES[dtype]:
            raise CheckpointError(
                f"{path}: tensor {key!r} ({dtype} {shape}) has offsets {begin}..{end} that do not fit "
                f"its size or the file ({data_len} data bytes): truncated or corrupt"
            )
    return header


def iter_tensors(files: Iterable[Path]) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """Yield (key, tensor, file) lazily, one file at a time."""
    from safetensors import safe_open

    for path in files:
        path = Path(path)
        if path.suffix == ".safetensors":
            check_safetensors(path)
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key), path
        elif path.suffix == ".bin":
            try:
                check_regular(path, "weights file")
            except (UnsafeFileError, FileNotFoundError) as e:
                raise CheckpointError(f"{path}: {e}") from None
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # pickle refusing a global, corrupt zip, ...
                raise CheckpointError(
                    f"{path}: refused to load: not a plain tensor checkpoint under weights_only=True ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''})"
                ) from None
            if not isinstance(sd, dict):
                raise CheckpointError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
            for key, t in sd.items():
                if not isinstance(t, torch.Tensor):
                    raise CheckpointError(f"{path}: entry {key!r} is not a tensor")
                yield key, t, path
        else:
            raise CheckpointError(f"{path}: unsupported weight file type (safetensors or .bin only)")


# ------------------------------------------------------------------------------------------ converting


def _target_dtype(name: str, t: torch.Tensor, expected: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.dtype:
    if not t.is_floating_point():
        return expected.dtype
    if name.endswith(KEEP_FP32):
        return torch.float32
    return dtype or expected.dtype


def convert_state_dict(
    items: Iterable[tuple[str, torch.Tensor, Path]],
    table: KeyTable,
    expected: dict[str, torch.Tensor],
    dtype: Optional[torch.dtype] = None,
    tied: Optional[dict[str, str]] = None,
    strict: bool = True,
) -> dict[str, torch.Tensor]:
    """Map source tensors to internal names, stacking/fusing slices, and check everything.

    expected: internal name -> tensor (meta is fine) giving the shape and default dtype.
    tied: internal name -> the name it shares storage with (filled from it when absent).
    """
    out: dict[str, torch.Tensor] = {}
    pieces: dict[str, dict] = {}
    unexpected, misshaped = [], []
    bad_names: set[str] = set()
    for key, t, path in items:
        slot = table.to_internal(key)
        if slot is None or slot.name not in expected:
            if not table.is_ignored(key):
                unexpected.append(key + (f" (-> {slot.name})" if slot and slot.name != key else ""))
            continue
        ref = expected[slot.name]
        want = _slice_shape(tuple(ref.shape), slot)
        if slot.squeeze is not None and t.dim() == len(want) - 1:
            t = t.unsqueeze(slot.squeeze)
        if tuple(t.shape) != want:
            misshaped.append(f"{key}: checkpoint {list(t.shape)} vs model {list(want)}")
            bad_names.add(slot.name)
            continue
        t = t.to(_target_dtype(slot.name, t, ref, dtype))
        if slot.expert is None and slot.part is None:
            out[slot.name] = t
        else:
            pieces.setdefault(slot.name, {})[(slot.expert, slot.part)] = t
    missing = []
    for name, parts in pieces.items():
        ref = expected[name]
        full = torch.empty(ref.shape, dtype=next(iter(parts.values())).dtype)
        for (expert, part), t in parts.items():
            view = full if expert is None else full[expert]
            if part is not None:
                k, n = part
                step = view.shape[0] // n
                view = view[k * step : (k + 1) * step]
            view.copy_(t)
        if name in bad_names:
            continue
        for key, expert, part in table.to_source(name, tuple(ref.shape)):
            if (expert, part) not in parts:
                missing.append(key)
        out[name] = full
    for name in expected:
        if name in out or name in pieces or name in bad_names:
            continue
        if tied and name in tied and tied[name] in out:
            out[name] = out[tied[name]]
            continue
        missing.extend(k for k, _, _ in table.to_source(name, tuple(expected[name].shape)))
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected and strict:
        problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys ({len(misshaped)}): {_listing(misshaped)}")
    if problems:
        raise CheckpointError(f"checkpoint does not match the model (key table {table.name!r}): " + "; ".join(problems))
    return out


def _slice_shape(shape: tuple, slot: Slot) -> tuple:
    s = list(shape[1:]) if slot.expert is not None else list(shape)
    if slot.part is not None:
        s[0] //= slot.part[1]
    return tuple(s)


def _listing(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


# ------------------------------------------------------------------------------------------ models


def tied_parameters(model: nn.Module) -> dict[str, str]:
    """state_dict name -> first name sharing the same Parameter (e.g. lm_head tied to embed_tokens)."""
    seen: dict[int, str] = {}
    tied = {}
    for name, t in model.state_dict(keep_vars=True).items():
        first = seen.setdefault(id(t), name)
        if first != name:
            tied[name] = first
    return tied


def load_weights(
    model: nn.Module,
    files: list[Path],
    table: KeyTable,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device] = None,
    strict: bool = True,
) -> nn.Module:
    """Fill a (meta-built) model from checkpoint files through `table`, then move it to `device`."""
    expected = model.state_dict(keep_vars=True)
    tied = tied_parameters(model)
    sd = convert_state_dict(iter_tensors(files), table, expected, dtype=dtype, tied=tied, strict=strict)
    if device is not None:
        sd = {k: v.to(device) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    for name, first in tied.items():  # assign=True replaced the shared Parameter; share it again
        _set_by_name(model, name, _get_by_name(model, first))
    materialize_buffers(model, device)
    return model


def materialize_buffers(model: nn.Module, device=None) -> None:
    """Recompute non-persistent buffers left on the meta device by a meta build."""
    for module in model.modules():
        if hasattr(module, "reset_buffers") and any(b.is_meta for b in module.buffers(recurse=False)):
            module.reset_buffers(device)
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise CheckpointError(f"buffers still on the meta device after loading: {_listing(left)}")


def _get_by_name(model: nn.Module, name: str):
    obj = model
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _set_by_name(model: nn.Module, name: str, value) -> None:
    *path, leaf = name.split(".")
    obj = model
    for part in path:
        obj = getattr(obj, part)
    setattr(obj, leaf, value)


def save_safetensors(tensors: dict[str, torch.Tensor], path: os.PathLike, metadata: Optional[dict] = None) -> None:
    """Write atomically (temp file in the same folder, fsync, rename). Shared storage is de-duplicated."""
    from safetensors.torch import save_file

    path = Path(path)
    seen, clean = {}, {}
    for k, t in tensors.items():
        ident = (t.data_ptr(), t.shape, t.dtype) if t.device.type != "meta" else None
        if ident is not None and ident in seen and t.data_ptr() != 0:
            continue  # a tied weight is saved once; loading re-ties it
        if ident is not None:
            seen[ident] = k
        clean[k] = t.detach().contiguous().cpu()
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=metadata or {"format": "pt"})

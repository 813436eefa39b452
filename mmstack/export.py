"""Export: a loaded model -> a folder in an official or transformers format (`mmstack convert --to`).

1. Config: the format's writers (`mmstack.writers`) give config.json and the side files (processor
   configs).
2. Read back: those files go through the readers (`read_config`), as any later load will. The result must
   describe this model: a field the format cannot hold is an error that names it, except the settings the
   format does not store (sampling defaults, chat roles), which are logged as warnings.
3. Weights: the format's key table inverted (`KeyTable.to_source`): stacked experts split per expert,
   fused gate/up and q/k/v split by part, squeezed dims removed, dtype kept. Tensors the read-back model
   has no place for (parts left out, the unused heads transformers drops) are left out and logged.
"""
from __future__ import annotations

import dataclasses
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from .config import ModelConfig, to_dict
from .errors import ConfigError, ExportError
from .formats import key_table, read_config, write_config
from .formats.common import Written
from .io.atomic import atomic_write_json, atomic_write_text
from .io.checkpoint import SAFE_INDEX, SAFE_SINGLE, _listing, save_safetensors, tied_parameters
from .io.keymaps import KeyTable
from .io.tokenizer_files import copy_tokenizer
from .model import MultimodalModel, build_model
from .quantize import refuse_quantized

log = logging.getLogger(__name__)

MAX_SHARD_BYTES = 5 * 10**9  # transformers' default shard size


@dataclass
class ExportPlan:
    fmt: str
    written: Written
    target: ModelConfig  # what loading the export will read
    warnings: list
    stripped: list  # parts left out on request (language_only)


def plan_export(cfg: ModelConfig, fmt: str, dtype: str = "float32", tokenizer_dir=None,
                language_only: bool = False) -> ExportPlan:
    """Write `cfg` as `fmt` and check that it reads back as the same model (no weights involved).

    Raises:
        ExportError: an unknown format, a part the format needs or cannot hold, or a setting it cannot
            represent; the message names them.
    """
    stripped = sorted(cfg.parts) if language_only else []
    if language_only:
        cfg = cfg.only(())
    written = write_config(cfg, fmt, dtype=dtype, token_id=_token_lookup(tokenizer_dir))
    try:
        target = _read_back(written, tokenizer_dir)
    except ConfigError as e:
        raise ExportError(f"{fmt}: the written config does not read back ({e})") from None
    errors, warnings = _compare(cfg, target, written.not_stored)
    dropped = sorted(set(cfg.parts) - set(target.parts))
    if dropped and not target.parts:
        errors.insert(0, f"the format holds a language model only, and this model also has the parts {dropped} "
                         "(write the language model alone with language_only=True / --language-only)")
    elif dropped:
        errors.insert(0, f"the format cannot hold the parts {dropped}")
    if errors:
        raise ExportError(f"{fmt}: " + "; ".join(errors))
    return ExportPlan(fmt, written, target, warnings, stripped)


def save_pretrained(model: MultimodalModel, out_dir: Union[str, Path],
                    tokenizer_dir: Optional[Union[str, Path]] = None) -> Path:
    """Write the native format: config.json, model.safetensors (internal names), tokenizer files."""
    refuse_quantized(model, "saving")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    native = dataclasses.replace(model.cfg, source_format="mmstack")
    save_safetensors(model.state_dict(), out / "model.safetensors", metadata={"format": "pt", "mmstack": "1"})
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, out)
    atomic_write_text(out / "config.json", native.dumps())  # last: a config.json means a complete folder
    return out


def export_pretrained(model: MultimodalModel, out_dir: Union[str, Path], fmt: str = "mmstack", tokenizer_dir=None,
                      language_only: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write `model` as a folder of format `fmt` that the official code / transformers / mmstack load.

    Args:
        model: a loaded `MultimodalModel` (any source format; e.g. fine-tuned and re-loaded).
        fmt: "mmstack" (native, `save_pretrained`), deepseek_vl_v2, janus, janusflow, hf_deepseek_v2,
            hf_deepseek_v3, hf_llama, hf_janus.
        tokenizer_dir: tokenizer folder (or tokenizer.json) copied next to the weights.
        language_only: write only the language model (e.g. a VL2 or Janus LLM as a transformers causal LM).
        max_shard_bytes: larger checkpoints are written as shards plus `model.safetensors.index.json`.
    Returns:
        the output folder.
    Raises:
        ExportError: the format cannot hold this model (see `plan_export`).
    """
    refuse_quantized(model, f"export to {fmt}")
    if fmt == "mmstack":
        if language_only:
            raise ExportError("language_only is for the export formats; the native format keeps every part")
        return save_pretrained(model, out_dir, tokenizer_dir=tokenizer_dir)
    weights = dict(model.state_dict())
    plan = plan_export(model.cfg, fmt, _dtype_name(weights), tokenizer_dir, language_only)
    for w in plan.warnings:
        log.warning("%s: %s", fmt, w)
    tensors = export_tensors(_target_tensors(weights, plan), key_table(fmt))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_sharded(tensors, out, max_shard_bytes)
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, out)
    for name, data in plan.written.files.items():
        atomic_write_json(out / name, data)
    atomic_write_json(out / "config.json", plan.written.config)  # last: a config.json means a complete folder
    return out


# ------------------------------------------------------------------------------------------ weights


def export_tensors(tensors: dict[str, torch.Tensor], table: KeyTable) -> dict[str, torch.Tensor]:
    """Internal name -> tensor, to source key -> tensor through `table` (the inverse of loading).

    Raises:
        ExportError: an internal tensor the table has no source key for, or two tensors on one key.
    """
    out: dict[str, torch.Tensor] = {}
    unmapped, clashes = [], []
    for name, t in tensors.items():
        squeeze = table.squeezed(name)
        slots = list(table.to_source(name, tuple(t.shape)))
        if not slots:
            unmapped.append(name)
        for key, expert, part in slots:
            s = t if expert is None else t[expert]
            if part is not None:
                k, n = part
                step = s.shape[0] // n
                s = s[k * step:(k + 1) * step]
            if squeeze is not None:
                s = s.squeeze(squeeze)
            if key in out:
                clashes.append(key)
            out[key] = s.detach().contiguous()
    if unmapped or clashes:
        raise ExportError(f"key table {table.name!r}: no source key for {_listing(unmapped)}" if unmapped
                          else f"key table {table.name!r}: several tensors map to {_listing(clashes)}")
    return out


def save_sharded(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[Path]:
    """`model.safetensors`, or shards + index when larger than `max_shard_bytes`; each file atomic. Weight
    files of the other layout left from an earlier export are removed (the index would win on load)."""
    shards: list[dict] = [{}]
    size = 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += n
    names = [SAFE_SINGLE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_safetensors(shard, out / name, metadata={"format": "pt"})
    stale = [p for p in out.glob("model-*-of-*.safetensors") if p.name not in names]
    if len(shards) == 1:
        stale.append(out / SAFE_INDEX)
    else:
        stale.append(out / SAFE_SINGLE)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
        atomic_write_json(out / SAFE_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    for p in stale:
        if p.exists():
            p.unlink()
    return [out / n for n in names]


def _target_tensors(weights: dict[str, torch.Tensor], plan: ExportPlan) -> dict[str, torch.Tensor]:
    """The model's tensors that the read-back model has, in its order; its tied copies left out (loading
    re-ties them, and transformers' own checkpoints omit them too)."""
    meta = build_model(plan.target, "meta")
    expected = meta.state_dict(keep_vars=True)
    tied = tied_parameters(meta)
    out, bad = {}, []
    for name, ref in expected.items():
        t = weights.get(name)
        if t is None or tuple(t.shape) != tuple(ref.shape):
            bad.append(f"{name} {list(ref.shape)} ({'absent' if t is None else list(t.shape)})")
        elif name not in tied:
            out[name] = t
    if bad:
        raise ExportError(f"{plan.fmt}: the written config describes tensors this model lacks: {_listing(bad)}")
    left = [n for n in weights if n not in expected and n.split(".")[0] not in plan.stripped]
    if left:
        log.warning("%s: leaving out %d tensors the format has no place for: %s", plan.fmt, len(left), _listing(left))
    return out


# ------------------------------------------------------------------------------------------ config


def _read_back(written: Written, tokenizer_dir) -> ModelConfig:
    with tempfile.TemporaryDirectory(prefix="mmstack-export-") as tmp:
        for name, data in {**written.files, "config.json": written.config}.items():
            atomic_write_json(Path(tmp) / name, data)
        if tokenizer_dir is not None:  # transformers' Janus keeps its tag strings in tokenizer_config.json
            copy_tokenizer(tokenizer_dir, Path(tmp), names=("tokenizer_config.json",))
        return read_config(tmp)


def _differences(mine, theirs, path: str):
    if isinstance(mine, dict) and isinstance(theirs, dict):
        for k in list(mine) + [k for k in theirs if k not in mine]:
            yield from _differences(mine.get(k), theirs.get(k), f"{path}.{k}")
    elif mine != theirs:
        yield path, mine, theirs


def _compare(cfg: ModelConfig, target: ModelConfig, not_stored: set) -> tuple[list, list]:
    """(errors, warnings): every field whose read-back value differs from the model's."""
    pairs = [("language", cfg.language, target.language)]
    pairs += [(k, cfg.parts[k], target.parts[k]) for k in cfg.parts if k in target.parts]
    errors, warnings = [], []
    for section, mine, theirs in pairs:
        for path, a, b in _differences(to_dict(mine), to_dict(theirs), section):
            msg = f"{path} is {a!r} here but would read back as {b!r}"
            stored = not any(path == p or path.startswith(p + ".") for p in not_stored)
            (errors if stored else warnings).append(msg if stored else msg + " (the format does not store it)")
    return errors, warnings


def _token_lookup(tokenizer_dir) -> Optional[Callable[[str], Optional[int]]]:
    if tokenizer_dir is None:
        return None
    p = Path(tokenizer_dir)
    p = p if p.is_file() else p / "tokenizer.json"
    if not p.exists():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(p)).token_to_id


def _dtype_name(weights: dict[str, torch.Tensor]) -> str:
    """The dtype holding most of the floating-point weights ("bfloat16", ...)."""
    count: dict[torch.dtype, int] = {}
    for t in weights.values():
        if t.is_floating_point():
            count[t.dtype] = count.get(t.dtype, 0) + t.numel()
    return str(max(count, key=count.get) if count else torch.float32).removeprefix("torch.")

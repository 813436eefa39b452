"""Pieces every checkpoint format module shares: what a writer produces (`Written`), bounded reads of the
side files next to a config.json, typed field reads that name the file and field, and the
`custom_architectures` section for tower / VQ dimensions the official look-up tables cannot name.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..errors import ConfigError, ExportError
from ..io.files import UnsafeFileError, read_text

log = logging.getLogger(__name__)

# The official Janus / DeepSeek-VL2 code looks architectures up by name (SigLIP `model_name`, VQ `cls`).
# Dimensions of other architectures (tiny test models, custom exports) are stored in this section; the
# official code needs them registered at run time. The golden fixtures spell the section `_golden_overrides`:
# it is read too.
CUSTOM_KEY = "custom_architectures"
LEGACY_CUSTOM_KEYS = ("_golden_overrides",)
CUSTOM_NOTE = ("Architectures absent from the official look-up tables (SigLIP_MODEL_CONFIG, VQ_models), written by "
               "mmstack export: mmstack reads them here; the official code needs them registered at run time.")


@dataclass
class Written:
    """What a format's writer produces: `config.json`, side files (processor configs), and the fields the
    format does not store (`not_stored`: "section" or "section.field"; a difference there is a warning)."""

    config: dict
    files: dict = field(default_factory=dict)  # file name -> JSON dict
    not_stored: set = field(default_factory=set)
    # token text -> id from the tokenizer being exported (None when unknown); transformers' Janus stores one
    token_id: Callable[[str], Optional[int]] = lambda text: None


@dataclass(frozen=True)
class ExportSpec:
    """How one export format is written: its identity, where the language model goes, what it needs."""

    model_type: str
    architectures: tuple
    lm: Callable  # LMConfig -> dict of language fields
    lm_key: Optional[str]  # the language section (None: the language fields are the top level)
    dtype_key: str  # "torch_dtype" (transformers 4 era official code) or "dtype" (transformers 5)
    write_parts: Optional[Callable] = None  # (cfg, fmt, out: Written) -> None, fills the non-language fields
    needs: tuple = ()  # sections the format cannot do without
    not_stored: tuple = ()  # "section" / "section.field" the format has no place for (a warning, not an error)


def need(ok: bool, msg: str) -> None:
    """Raise `ExportError(msg)` unless `ok`."""
    if not ok:
        raise ExportError(msg)


def read_json(folder: Optional[Path], name: str) -> dict:
    """`folder/name` as a JSON object ({} when absent or when there is no folder). Raises ConfigError."""
    if folder is None or not (folder / name).exists():
        return {}
    path = folder / name
    try:
        data = json.loads(read_text(path, what=name))
    except UnsafeFileError as e:
        raise ConfigError(str(e)) from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def section(raw: dict, key: str, where: str) -> dict:
    """`raw[key]` as an object ({} when absent or null); ConfigError naming the field otherwise."""
    v = raw.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ConfigError(f"{where}: {key} must be an object, got {type(v).__name__}")
    return v


def get_int(d: dict, key: str, where: str, default=None, lo: int = 1, hi: int = 1 << 24, optional: bool = False):
    """An integer field (not a bool, not a float such as 256.0), in lo..hi, named in the error."""
    v = d.get(key, default)
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{where}: {key} must be an integer, got {v!r:.40}")
    if not lo <= v <= hi:
        raise ConfigError(f"{where}: {key} must be in {lo}..{hi}, got {v}")
    return v


def get_float(d: dict, key: str, where: str, default=None) -> float:
    """A real-number field (ints accepted, bools and strings refused), named in the error."""
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{where}: {key} must be a number, got {v!r:.40}")
    return float(v)


def custom_entries(raw: dict, table: str) -> dict:
    """Architectures named in `custom_architectures[table]` (or the fixtures' `_golden_overrides[table]`)."""
    out: dict = {}
    for key in (*LEGACY_CUSTOM_KEYS, CUSTOM_KEY):
        block = raw.get(key)
        if isinstance(block, dict) and isinstance(block.get(table), dict):
            out.update(block[table])
    return out


def write_custom(out: Written, table: str, name: str, entry: dict) -> str:
    """Record an architecture the official look-up tables cannot name under `custom_architectures[table][name]`
    (read back by `custom_entries`). Returns `name`."""
    extra = out.config.setdefault(CUSTOM_KEY, {"note": CUSTOM_NOTE})
    extra.setdefault(table, {})[name] = entry
    log.warning("%s %r is not in the official look-up tables: written under %s (the official code needs it "
                "registered at run time)", table, name, CUSTOM_KEY)
    return name

"""Checkpoint formats: one module per format, each with its config reader, config writer and complete
two-way key table, and the plain tables below that say which module handles which `model_type`.

| module | model_type in config.json | source formats | export formats |
|---|---|---|---|
| `native` | mmstack | mmstack | mmstack |
| `deepseek_vl2` | deepseek_vl_v2 | deepseek_vl_v2 | deepseek_vl_v2 |
| `multi_modality` | multi_modality | janus, janusflow | janus, janusflow |
| `hf_causal_lm` | deepseek_v2, deepseek_v3, llama | hf_deepseek_v2, hf_deepseek_v3, hf_llama | the same |
| `hf_janus` | janus | hf_janus | hf_janus |

A hub id is resolved to a folder (`mmstack.hub`) before any of this runs: these functions read folders.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Union

from ..config import ModelConfig
from ..errors import ConfigError, ExportError
from ..io.files import UnsafeFileError, read_text
from ..io.keymaps import KeyTable
from . import deepseek_vl2, hf_causal_lm, hf_janus, multi_modality, native
from .common import CUSTOM_KEY, Written

# model_type (config.json) -> the module that reads it
READERS = {
    "mmstack": native,
    "deepseek_vl_v2": deepseek_vl2,
    "multi_modality": multi_modality,
    "deepseek_v2": hf_causal_lm,
    "deepseek_v3": hf_causal_lm,
    "llama": hf_causal_lm,
    "janus": hf_janus,
}
# source / export format -> its module (key tables and writers)
FORMATS = {fmt: mod for mod in (native, deepseek_vl2, multi_modality, hf_causal_lm, hf_janus)
           for fmt in mod.SOURCE_FORMATS}
EXPORT_SPECS = {**deepseek_vl2.EXPORTS, **multi_modality.EXPORTS, **hf_causal_lm.EXPORTS, **hf_janus.EXPORTS}
# Every format's chat roles and image policy are chosen at load time (`chat_format=`, `image_policy=`).
NOT_STORED_ANYWHERE = ("chat.user_role", "chat.assistant_role", "chat.system_prompt", "chat.sep", "chat.eos_text",
                       "image_processing.policy", "image_processing.fit_size")


def read_config(source: Union[str, Path, dict], where: Optional[str] = None) -> ModelConfig:
    """Translate a config.json (path, folder or dict) of any supported format into a `ModelConfig`.

    The file is data only: nothing in the model folder is imported or executed, whatever its fields say
    (`auto_map` and `trust_remote_code` are never acted on). Side files (processor configs) are read from
    the same folder; every file must be a regular file of bounded size.

    Raises:
        ConfigError: a missing or unreadable file, invalid JSON, an unknown format, a field of the wrong
            type or out of range, or an impossible model; the message names the file and field.
    """
    folder = None
    if isinstance(source, dict):
        raw, where = source, where or "config"
    else:
        p = Path(source)
        p = p / "config.json" if p.is_dir() else p
        folder = p.parent
        where = where or str(p)
        if not p.exists():
            raise ConfigError(f"{where}: file not found")
        try:
            raw = json.loads(read_text(p, what="config.json"))
        except UnsafeFileError as e:
            raise ConfigError(str(e)) from None
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: absurdly deep nesting
            raise ConfigError(f"{where}: not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    mt = raw.get("model_type")
    module = READERS.get(mt) if isinstance(mt, str) else None
    if module is None:
        raise ConfigError(f"{where}: unknown model_type {mt!r} (supported: {', '.join(READERS)})")
    try:
        cfg = module.read(raw, where, folder)
        return cfg.validate()
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, ArithmeticError, RecursionError) as e:
        # A field of the wrong type or shape (a list where a size belongs, a section that is not an object)
        # that no typed read caught: report the malformed file rather than crash.
        raise ConfigError(f"{where}: malformed config ({type(e).__name__}: {e})") from None


def key_table(source_format: str) -> KeyTable:
    """The complete key table (checkpoint names <-> internal names) of a source or export format."""
    if source_format not in FORMATS:
        raise ConfigError(f"unknown checkpoint format {source_format!r} (known: {', '.join(FORMATS)})")
    return FORMATS[source_format].key_table(source_format)


def export_formats() -> list[str]:
    return ["mmstack", *EXPORT_SPECS]


def write_config(cfg: ModelConfig, fmt: str, dtype: str = "float32",
                 token_id: Optional[Callable[[str], Optional[int]]] = None) -> Written:
    """`cfg` as format `fmt`: its config.json dict and side files (processor configs).

    Writers write the fields the target's own code consumes, explicitly (never relying on a default that
    could differ between that code and our reader) and nothing it would ignore: `mmstack.export` reads the
    result back with the readers, so a setting the format cannot hold shows up as a difference, never silently.

    Args:
        dtype: the weights' dtype name ("bfloat16", ...), recorded as the format records it.
        token_id: token text -> id in the tokenizer that goes with the export (transformers' Janus stores
            the image token's id).
    Raises:
        ExportError: an unknown format, a part the format needs that the model lacks, or a setting the
            format's code cannot run (named).
    """
    spec = EXPORT_SPECS.get(fmt)
    if spec is None:
        raise ExportError(f"unknown export format {fmt!r} (choose from {', '.join(export_formats())})")
    have = cfg.parts
    missing = sorted(s for s in spec.needs if s not in have)
    if missing:
        what = f"has only {sorted(have)}" if have else "is a text-only model"
        raise ExportError(f"{fmt} needs the parts {sorted(spec.needs)}; this model {what} (missing: {', '.join(missing)})")
    out = Written(config={"architectures": list(spec.architectures), "model_type": spec.model_type,
                          spec.dtype_key: dtype},
                  not_stored=set(NOT_STORED_ANYWHERE) | set(spec.not_stored))
    if token_id is not None:
        out.token_id = token_id
    if spec.write_parts is not None:
        spec.write_parts(cfg, fmt, out)
    try:
        lm = spec.lm(cfg.language)
    except ExportError as e:
        raise ExportError(f"{fmt}: language model: {e}") from None
    if spec.lm_key is None:
        out.config.update(lm)
    else:
        out.config[spec.lm_key] = dict(lm, **{spec.dtype_key: dtype})
    if CUSTOM_KEY in out.config:  # last, as the fixtures keep theirs
        out.config[CUSTOM_KEY] = out.config.pop(CUSTOM_KEY)
    return out


__all__ = ["read_config", "key_table", "write_config", "export_formats", "Written", "ExportError", "READERS",
           "FORMATS", "EXPORT_SPECS"]

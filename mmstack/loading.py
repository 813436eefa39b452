"""Building models on the meta device, loading any supported checkpoint folder, saving the native format."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Optional, Union

import torch

from .config import ModelConfig
from .formats import TABLE_FOR_FORMAT, read_config
from .io.checkpoint import CheckpointError, find_weight_files, load_weights, save_safetensors
from .io.keymaps import TABLES, KeyTable
from .model import MultimodalModel

log = logging.getLogger(__name__)

# Extra rules for non-language parts, per key table name (registered by mmstack.vision / .generation).
PART_RULES: dict[str, list] = {}


def register_part_rules(table_name: str, rules: list) -> None:
    PART_RULES.setdefault(table_name, []).extend(rules)


def key_table(source_format: str) -> KeyTable:
    """The full key table for a source format: part rules first, then the language rules."""
    name = TABLE_FOR_FORMAT[source_format]
    return TABLES[name].extend(PART_RULES.get(name, []))


def build_model(cfg: ModelConfig, device: Union[str, torch.device, None] = "meta",
                dtype: Optional[torch.dtype] = None) -> MultimodalModel:
    """Construct without allocating (device='meta') or on a real device with random init."""
    with torch.device(device if device is not None else "cpu"):
        return MultimodalModel(cfg, device=None, dtype=dtype)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs (the released checkpoints' dtype), fp32 on CPU (exact, and fast enough for tiny models)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def resolve_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "float64": torch.float64}
    if str(dtype) not in names:
        raise ValueError(f"unknown dtype {dtype!r} (choose from {sorted(names)})")
    return names[str(dtype)]


def load_model(model_dir: Union[str, Path], device=None, dtype=None, cfg: Optional[ModelConfig] = None,
               language_only: bool = False, parts: Optional[tuple] = None) -> MultimodalModel:
    """Load a checkpoint folder of any supported format.

    Args:
        model_dir: folder with config.json and safetensors (single or sharded) or .bin weights.
        device / dtype: where and how to materialise (defaults: CUDA+bf16 if available, else CPU+fp32).
        cfg: an already translated config (else read from model_dir/config.json).
        parts: build and load only these config sections (plus the language model), e.g.
            ("vision", "projector", "layout") for understanding only; checkpoint keys of the parts left out
            are skipped, while the parts kept load strictly.
        language_only: shorthand for parts=().
    Raises:
        ConfigError, CheckpointError with the file and the keys involved.
    """
    model_dir = Path(model_dir)
    cfg = cfg or read_config(model_dir)
    if language_only:
        parts = ()
    if parts is not None:
        unknown = set(parts) - set(cfg.parts)
        if unknown:
            raise ValueError(f"{model_dir}: the model has no parts {sorted(unknown)} (it has {sorted(cfg.parts)})")
        cfg = ModelConfig(language=cfg.language, parts={k: v for k, v in cfg.parts.items() if k in parts},
                          source_format=cfg.source_format, name=cfg.name)
    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype) or default_dtype(device)
    model = build_model(cfg, "meta")
    files = find_weight_files(model_dir)
    try:
        load_weights(model, files, key_table(cfg.source_format), dtype=dtype, device=device, strict=parts is None)
    except CheckpointError as e:
        raise CheckpointError(f"{model_dir}: {e}") from None
    model.language.fuse_projections()
    return model.eval()


def save_pretrained(model: MultimodalModel, out_dir: Union[str, Path], tokenizer_dir: Optional[Union[str, Path]] = None) -> Path:
    """Write the native format: config.json, model.safetensors (internal names), tokenizer files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    native = ModelConfig(language=model.cfg.language, parts=model.cfg.parts, source_format="mmstack", name=model.cfg.name)
    save_safetensors(model.state_dict(), out / "model.safetensors", metadata={"format": "pt", "mmstack": "1"})
    tmp = out / ".config.json.tmp"
    tmp.write_text(native.dumps(), encoding="utf-8")
    tmp.replace(out / "config.json")
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, out)
    return out


def export_pretrained(model: MultimodalModel, out_dir: Union[str, Path], fmt: str = "mmstack",
                      tokenizer_dir: Optional[Union[str, Path]] = None, language_only: bool = False) -> Path:
    """Write `model` in format `fmt`: "mmstack" (native, `save_pretrained`) or an official / transformers
    format (deepseek_vl_v2, janus, janusflow, hf_deepseek_v2, hf_deepseek_v3, hf_llama, hf_janus) that
    the official code, transformers and `mmstack.load` read. See `mmstack.export.export_pretrained`.

    Raises:
        ExportError: an unknown format, or one that cannot hold this model (the message names the part or
            setting).
    """
    from .export import export_pretrained as export
    from .writers import ExportError

    if fmt == "mmstack":
        if language_only:
            raise ExportError("language_only is for the export formats; the native format keeps every part")
        return save_pretrained(model, out_dir, tokenizer_dir=tokenizer_dir)
    return export(model, out_dir, fmt, tokenizer_dir=tokenizer_dir, language_only=language_only)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "chat_template.jinja")


def copy_tokenizer(src: Union[str, Path], out: Path, names: tuple = TOKENIZER_FILES) -> None:
    """Copy the tokenizer files of folder `src` (or of the folder holding `src`, a tokenizer.json) to `out`."""
    src = Path(src)
    src = src.parent if src.is_file() else src
    for name in names:
        if (src / name).exists() and (src / name).resolve() != (out / name).resolve():
            shutil.copyfile(src / name, out / name)


def checkpoint_dtype(model_dir: Union[str, Path]) -> Optional[torch.dtype]:
    """The dtype of most floating-point weights in a safetensors checkpoint folder (None for `.bin`)."""
    from .io.checkpoint import check_safetensors

    names = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
    count: dict = {}
    for f in find_weight_files(model_dir):
        if f.suffix != ".safetensors":
            return None
        for key, info in check_safetensors(f).items():
            if key != "__metadata__" and info["dtype"] in names:
                a, b = info["data_offsets"]
                count[names[info["dtype"]]] = count.get(names[info["dtype"]], 0) + b - a
    return max(count, key=count.get) if count else None

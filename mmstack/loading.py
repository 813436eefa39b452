"""Loading any supported checkpoint folder: the config through its format module, the model built on the
meta device, the weights through the format's key table (strict). Saving and exporting live in
`mmstack.export` (re-exported here)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Union

import torch

from .config import ModelConfig
from .errors import CheckpointError
from .export import export_pretrained, save_pretrained  # noqa: F401  (re-exported: their old home)
from .formats import key_table, read_config
from .io.checkpoint import check_safetensors, find_weight_files, load_weights
from .io.tokenizer_files import copy_tokenizer  # noqa: F401  (re-exported)
from .model import MultimodalModel, build_model
from .quantize import check_scheme, quantize_model

log = logging.getLogger(__name__)

__all__ = ["build_model", "load_model", "save_pretrained", "export_pretrained", "key_table", "copy_tokenizer",
           "default_device", "default_dtype", "resolve_dtype", "checkpoint_dtype"]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_device(device: torch.device) -> torch.device:
    """`device`, if this machine has it; else a `ValueError` naming it, before anything is built or moved there."""
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device '{device}': torch sees {torch.cuda.device_count() if torch.cuda.is_available() else 'no'} "
                         f"CUDA device(s) on this machine (use device='cpu')")
    return device


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
               language_only: bool = False, parts: Optional[tuple] = None,
               quantize: Optional[str] = None, adapter: Optional[Union[str, Path]] = None) -> MultimodalModel:
    """Load a checkpoint folder of any supported format.

    Args:
        model_dir: folder with config.json and safetensors (single or sharded) or .bin weights.
        device / dtype: where and how to materialise (defaults: CUDA+bf16 if available, else CPU+fp32).
        cfg: an already translated config (else read from model_dir/config.json).
        parts: build and load only these config sections (plus the language model), e.g.
            ("vision", "projector", "layout") for understanding only; checkpoint keys of the parts left out
            are skipped, while the parts kept load strictly.
        language_only: shorthand for parts=().
        quantize: None, "int8" or "int4": weight-only quantization of the language model's linear and expert
            weights (`mmstack.quantize`). The weights are read into CPU memory and quantized layer by layer onto
            `device`, so the device never holds the full-precision language model.
        adapter: a peft LoRA folder (`adapter_config.json` + `adapter_model.safetensors`, `mmstack.adapters`)
            merged into the weights once they are loaded, before any quantization (the merged weights are
            quantized).
    Raises:
        ConfigError, CheckpointError (AdapterError for the adapter) with the file and the keys involved.
    """
    model_dir = Path(model_dir)
    cfg = cfg or read_config(model_dir)
    if language_only:
        parts = ()
    if parts is not None:
        unknown = set(parts) - set(cfg.parts)
        if unknown:
            raise ValueError(f"{model_dir}: the model has no parts {sorted(unknown)} (it has {sorted(cfg.parts)})")
        cfg = cfg.only(parts)
    device = check_device(torch.device(device)) if device is not None else default_device()
    dtype = resolve_dtype(dtype) or default_dtype(device)
    files = find_weight_files(model_dir)
    check_against_checkpoint(cfg, files, model_dir)  # before any module is built
    check_scheme(quantize)
    model = build_model(cfg, "meta")
    staging = torch.device("cpu") if quantize else device
    try:
        load_weights(model, files, key_table(cfg.source_format), dtype=dtype, device=staging, strict=parts is None)
    except CheckpointError as e:
        raise CheckpointError(f"{model_dir}: {e}") from None
    if adapter is not None:
        from .adapters import merge_adapter

        merge_adapter(model, adapter)
    if quantize:
        quantize_model(model, quantize, device=device)
    model.language.fuse_projections()
    return model.eval()


def check_against_checkpoint(cfg: ModelConfig, files: list, where) -> None:
    """Cross-check the config's depth with the checkpoint, from the safetensors headers only (nothing allocated,
    nothing built): a config naming more or fewer decoder layers than the checkpoint holds is a `ConfigError`
    naming both, before a model of that depth is built. (Every other shape is compared key by key, with the
    full listing of what differs, when the weights load.)
    """
    import re

    from .errors import ConfigError

    table = key_table(cfg.source_format)
    layers = set()
    layer_re = re.compile(r"language\.layers\.(\d+)\.")
    for f in files:
        if Path(f).suffix != ".safetensors":
            return  # `.bin` shapes are known only once loaded: load_weights checks them then
        for key, info in check_safetensors(f).items():
            if key == "__metadata__":
                continue
            slot = table.to_internal(key)
            if slot is None:
                continue
            m = layer_re.match(slot.name)
            if m:
                layers.add(int(m.group(1)))
    lm = cfg.language
    if layers and len(layers) != lm.num_layers:
        raise ConfigError(f"{where}: config.json says {lm.num_layers} decoder layers, but the checkpoint holds "
                          f"{len(layers)} (indices {min(layers)}..{max(layers)})")


def checkpoint_dtype(model_dir: Union[str, Path]) -> Optional[torch.dtype]:
    """The dtype of most floating-point weights in a safetensors checkpoint folder (None for `.bin`)."""
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

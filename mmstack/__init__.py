"""mmstack: one PyTorch stack for DeepSeek-VL2, Janus / Janus-Pro and JanusFlow.

    import mmstack
    pipe = mmstack.load("path/to/checkpoint")      # official, transformers or native folder
    pipe.complete("Hello", max_new_tokens=20)

Heavy optional dependencies (gradio, diffusers, peft) are imported only by the code that needs them.
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load": ("mmstack.api", "load"),
    "describe": ("mmstack.api", "describe"),
    "generate": ("mmstack.api", "generate"),
    "Pipeline": ("mmstack.pipeline", "Pipeline"),
    "CapabilityError": ("mmstack.errors", "CapabilityError"),
    "GenerationError": ("mmstack.errors", "GenerationError"),
    "MultimodalBatch": ("mmstack.batch", "MultimodalBatch"),
    "MultimodalModel": ("mmstack.model", "MultimodalModel"),
    "SamplingParams": ("mmstack.decoding", "SamplingParams"),
    "ModelConfig": ("mmstack.config", "ModelConfig"),
    "LMConfig": ("mmstack.config", "LMConfig"),
    "ConfigError": ("mmstack.errors", "ConfigError"),
    "CheckpointError": ("mmstack.errors", "CheckpointError"),
    "AdapterError": ("mmstack.errors", "AdapterError"),
    "read_config": ("mmstack.formats", "read_config"),
    "build_model": ("mmstack.model", "build_model"),
    "save_pretrained": ("mmstack.export", "save_pretrained"),
    "export_pretrained": ("mmstack.export", "export_pretrained"),
    "ExportError": ("mmstack.errors", "ExportError"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mmstack' has no attribute {name!r}")

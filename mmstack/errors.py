"""The documented exceptions of mmstack, in one place (each is re-exported where it used to live).

Every public function documents which of these it raises; nothing else escapes the public API or the CLI.

| exception | base | raised for |
|---|---|---|
| `ConfigError` | ValueError | a `config.json` that cannot be read or describes an impossible model |
| `ExportError` | ConfigError | a model that the requested export format cannot hold |
| `CheckpointError` | ValueError | weights that are missing, mis-shaped, unreadable or tampered with |
| `AdapterError` | CheckpointError | a LoRA adapter folder that is malformed or does not fit the base model |
| `GenerationError` | ValueError | a request that cannot run: prompt too long, bad sampling settings, ... |
| `TokenizerError` | ValueError | a tokenizer that is missing or lacks a token the family needs |
| `CapabilityError` | RuntimeError | a task the loaded model has no path for (e.g. `describe` on a text model) |
| `EngineBusy` | RuntimeError | the engine's waiting queue is full: try again later |
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A config.json that cannot be read or describes an impossible model."""


class ExportError(ConfigError):
    """A model that the requested format cannot hold (a missing part, an unsupported setting)."""


class CheckpointError(ValueError):
    """Weights that cannot be loaded: missing / unexpected / mis-shaped keys, a malformed file."""


class AdapterError(CheckpointError):
    """A LoRA adapter folder that cannot be read, or whose tensors do not fit the base model (names the file and key)."""


class GenerationError(ValueError):
    """A generation request that cannot run as asked (limits, sampling settings, empty prompt)."""


class TokenizerError(ValueError):
    """A missing tokenizer, or one without a token the model family needs."""


class CapabilityError(RuntimeError):
    """The loaded model has no path for the requested task (e.g. `describe` on a text-only model)."""


class EngineBusy(RuntimeError):
    """The engine's waiting queue is full; the request was not accepted (retry later)."""

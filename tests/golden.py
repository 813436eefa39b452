"""Discovery of the official golden fixtures (../shared/golden by default, or $MMSTACK_GOLDEN_DIR).

Fixtures are recognised by their contents (config.json model_type and the tensors a file holds), not by
folder names, so every fixture present is run and a missing kind is a failure, not a silent skip.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]


def golden_dir() -> Path:
    raw = os.environ.get("MMSTACK_GOLDEN_DIR", "../shared/golden")
    p = Path(raw)
    return p if p.is_absolute() else (REPO / p).resolve()


def _tensor_names(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


@dataclass(frozen=True)
class LMFixture:
    """A file holding `{prefix}inputs_embeds` and the language model's `{prefix}logits` for them."""

    model_dir: Path
    file: Path
    prefix: str
    model_type: str
    has_greedy: bool
    has_step_logits: bool

    @property
    def id(self) -> str:
        return f"golden-{self.model_dir.name}-{self.file.stem}{'-' + self.prefix.rstrip('_') if self.prefix else ''}"


def model_dirs() -> list[Path]:
    root = golden_dir()
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / "config.json").exists() and (p / "model.safetensors").exists())


def lm_fixtures() -> list[LMFixture]:
    out = []
    for d in model_dirs():
        mt = json.loads((d / "config.json").read_text()).get("model_type")
        for f in sorted(d.glob("*.safetensors")):
            if f.name == "model.safetensors":
                continue
            names = _tensor_names(f)
            for key in names:
                m = re.fullmatch(r"(.*)inputs_embeds", key)
                if not m:
                    continue
                p = m.group(1)
                shape = names[key]
                lg = names.get(f"{p}logits")
                # the LM fixture: logits over the same [B, T] as the embeddings (understanding prompts)
                if lg is None or lg[:2] != shape[:2]:
                    continue
                out.append(LMFixture(d, f, p, mt, f"{p}greedy_new_tokens" in names, f"{p}greedy_step_logits" in names))
    return out


def tokenizer_for(model_dir: Path) -> Optional[Path]:
    """The fixture's tokenizer: its own tokenizer/ folder, or the one its meta.json names."""
    if (model_dir / "tokenizer" / "tokenizer.json").exists():
        return model_dir / "tokenizer"
    meta = model_dir / "meta.json"
    if meta.exists():
        name = json.loads(meta.read_text()).get("tokenizer")
        if name:
            return (model_dir / name).resolve().parent
    return None


def manifests() -> list[Path]:
    d = golden_dir() / "manifests"
    return sorted(d.glob("*.json")) if d.is_dir() else []


@dataclass(frozen=True)
class UnderstandingFixture:
    """A file with a full understanding run: `{prefix}input_ids`, pixels (`images` tiles for VL2,
    `{prefix}pixel_values` for Janus), `{prefix}inputs_embeds`, `{prefix}logits`."""

    model_dir: Path
    file: Path
    prefix: str
    model_type: str
    names: tuple

    @property
    def id(self) -> str:
        return f"golden-{self.model_dir.name}-{self.file.stem}"

    def has(self, key: str) -> bool:
        return f"{self.prefix}{key}" in self.names


def understanding_fixtures() -> list[UnderstandingFixture]:
    out = []
    for d in model_dirs():
        mt = json.loads((d / "config.json").read_text()).get("model_type")
        for f in sorted(d.glob("*.safetensors")):
            if f.name == "model.safetensors":
                continue
            names = _tensor_names(f)
            for key in names:
                m = re.fullmatch(r"(.*)input_ids", key)
                if not m:
                    continue
                p = m.group(1)
                pix = f"{p}images" in names or f"{p}pixel_values" in names
                if pix and f"{p}logits" in names and f"{p}inputs_embeds" in names:
                    out.append(UnderstandingFixture(d, f, p, mt, tuple(sorted(names))))
    return out


def fixture_image(model_dir: Path) -> Path:
    """The fixture's input image: the one PNG in its folder."""
    (png,) = sorted(model_dir.glob("*.png"))
    return png


def fixture_files_with(*keys: str) -> list[tuple[Path, Path]]:
    """(model folder, file) for every fixture file holding all `keys`."""
    out = []
    for d in model_dirs():
        for f in sorted(d.glob("*.safetensors")):
            if f.name in ("model.safetensors",):
                continue
            names = _tensor_names(f)
            if all(k in names for k in keys):
                out.append((d, f))
    return out


def meta(model_dir: Path) -> dict:
    p = model_dir / "meta.json"
    return json.loads(p.read_text()) if p.exists() else {}

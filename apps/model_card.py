"""What a model folder says about itself, read from its files: parameters (the weights' headers), the input
size it was trained at (config.json), what it was trained on and a real model to try instead (demo.json
"about"), held-out scores (scores.json, written by `mmstack eval-demo --record`) and training time (build.json,
written by `mmstack build-demo`). The demo's banner and `mmstack info` show it. Official checkpoints ship none
of the side files: their card holds the parameters and input size only, and the demo shows no banner.

    card = read_card(default_model_dir())
    card.parameters, card.input_size, card.trained_on      # 8.9e6, (64, 64), "synthetic images: ..."
    banner(card)                                           # markdown, or None for a general-purpose model
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

log = logging.getLogger(__name__)


@dataclass
class ModelCard:
    """Args:
        parameters: tensors' elements in the weight files (every part, the image tokenizer included).
        input_size: (width, height) every image is fitted to, or the square side of a Janus-type view;
            None when images are tiled at their own size (DeepSeek-VL2).
        trained_on: the training domain, for models trained on a narrow one (demo.json "about").
        real_model: a general-purpose model to load instead (demo.json "about").
        scores: held-out score per task (the full set when recorded, else the quick one); `score_items` per task.
        train_seconds: the training time build.json records.
    """

    parameters: Optional[int] = None
    input_size: Optional[tuple[int, int]] = None
    trained_on: Optional[str] = None
    real_model: Optional[str] = None
    scores: dict = field(default_factory=dict)
    score_items: Optional[int] = None
    train_seconds: Optional[float] = None

    def to_json_dict(self) -> dict:
        out = {"parameters": self.parameters, "input_size": list(self.input_size) if self.input_size else None}
        if self.trained_on:
            out["trained_on"] = self.trained_on
        if self.scores:
            out["held_out_scores"] = {k: round(v, 3) for k, v in self.scores.items()}
            out["held_out_items_per_task"] = self.score_items
        if self.train_seconds:
            out["train_minutes"] = round(self.train_seconds / 60, 1)
        if self.real_model:
            out["general_purpose_alternative"] = self.real_model
        return out


def _json(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    from mmstack.io.files import read_text

    try:
        raw = json.loads(read_text(path, what=path.name))
        return raw if isinstance(raw, dict) else None
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        log.warning("%s: ignored (%s)", path, type(e).__name__ if isinstance(e, RecursionError) else e)
        return None


def _number(v) -> Optional[float]:
    """A finite float from a JSON number (None for anything else: text, NaN, infinities, an int too large for a float)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        x = float(v)
    except OverflowError:
        return None
    return x if math.isfinite(x) else None


def count_parameters(model_dir: Path) -> Optional[int]:
    """Elements of every tensor in the folder's safetensors files, from their headers (nothing is loaded)."""
    from mmstack.io.checkpoint import check_safetensors

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        for key, info in check_safetensors(f).items():
            if key != "__metadata__":
                n = 1
                for s in info["shape"]:
                    n *= s
                total += n
    return total


def input_size(cfg) -> Optional[tuple[int, int]]:
    """(width, height) every image reaches the model at, or None for tiling at the image's own size."""
    ip = cfg.parts.get("image_processing")
    if ip is None:
        return None
    if ip.fit_size:
        return tuple(ip.fit_size)
    return (ip.image_size, ip.image_size) if ip.kind == "square_pad" else None


def read_card(model_dir: Union[str, Path], cfg=None) -> ModelCard:
    """The card of a model folder (`cfg`: its config when already read)."""
    from mmstack.formats import read_config

    model_dir = Path(model_dir)
    cfg = cfg if cfg is not None else read_config(model_dir)
    card = ModelCard(parameters=count_parameters(model_dir), input_size=input_size(cfg))
    about = (_json(model_dir / "demo.json") or {}).get("about")
    if isinstance(about, dict):
        card.trained_on = about.get("trained_on") if isinstance(about.get("trained_on"), str) else None
        card.real_model = about.get("real_model") if isinstance(about.get("real_model"), str) else None
    recorded = _json(model_dir / "scores.json") or {}
    for key in ("full", "quick"):
        entry = recorded.get(key)
        if isinstance(entry, dict) and isinstance(entry.get("scores"), dict) and entry["scores"]:
            card.scores = {k: x for k, x in ((k, _number(v)) for k, v in entry["scores"].items()) if x is not None}
            counts = [c for c in (entry.get("counts") or {}).values() if isinstance(c, int)]
            card.score_items = max(counts) if counts else None
            break
    build = _json(model_dir / "build.json") or {}
    seconds = build.get("seconds_total_train", build.get("seconds"))
    card.train_seconds = _number(seconds)
    return card


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n:,}"


_MARKUP = re.compile(r"([\\`*_{}\[\]()#+!<>|~])")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}(@[\w.-]{1,64})?")
TEXT_MAX = 300  # characters of a model folder's own text shown in the banner


def _plain(text: str) -> str:
    """A model folder's text as literal markdown: markup escaped (no links, images or HTML), one line, capped."""
    text = " ".join(str(text).split())[:TEXT_MAX]
    return _MARKUP.sub(r"\\\1", text)


def banner(card: ModelCard) -> Optional[str]:
    """Markdown saying what a narrow-domain model is (None for a model whose folder does not say what it was
    trained on): size, domain, input size, held-out scores and a real model to load instead."""
    if not card.trained_on:
        return None
    from .eval_demo import TASK_NAMES

    size = f"{_millions(card.parameters)} parameters" if card.parameters else "a small model"
    px = f"{card.input_size[0]}-px " if card.input_size and card.input_size[0] == card.input_size[1] else ""
    lines = [f"**This demo model ({size}) was trained on {px}{_plain(card.trained_on)} only.** "
             "Outside that domain its answers are noise: try the examples."]
    if card.scores:
        items = f" ({card.score_items} per task)" if card.score_items else ""
        scores = " · ".join(f"{_plain(TASK_NAMES.get(k, k))} {v:.2f}" for k, v in card.scores.items())
        lines.append(f"Held-out scores{items}: {scores}.")
    if card.real_model and _HUB_ID.fullmatch(card.real_model):  # a hub id inside backticks, nothing else
        lines.append(f"For a real model: `mmstack demo --model {card.real_model}`.")
    return "\n".join(lines)

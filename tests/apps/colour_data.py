"""A small understanding dataset for fine-tuning tests: noisy red / green / blue pictures, each asked its colour."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def write_colour_data(d: Path, n: int = 8) -> Path:
    """`n` 64x48 images and `d`/data.jsonl (messages format) asking "What colour is it?"; returns `d`."""
    rng = np.random.default_rng(0)
    recs = []
    for i in range(n):
        name = list(COLOURS)[i % 3]
        arr = (np.zeros((48, 64, 3)) + COLOURS[name] + rng.integers(-20, 20, (48, 64, 3))).clip(0, 255)
        Image.fromarray(arr.astype(np.uint8)).save(d / f"im{i}.png")
        recs.append({"messages": [{"role": "user", "content": "<image>\nWhat colour is it?"},
                                  {"role": "assistant", "content": f"It is {name}."}], "images": [f"im{i}.png"]})
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d

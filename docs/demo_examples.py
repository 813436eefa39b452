"""Re-create the embedded model's example inputs: `python docs/demo_examples.py [--out assets/demo-model/examples]`.

Each is a held-out synthetic image drawn by `mmstack.apps.synth` from its own seed (the training set used the
stream of seed 0, the held-out set seed 1). The scene and chart seeds are the first from 1000 up whose image the
shipped model answers right (caption exact, box IoU >= 0.5, every chart value within 5%): the examples show
what the model can do, and the banner beside them its scores. The text line is the first line from 1000 up;
the model reads none right (OCR 0.00). `demo.json` "examples" names the files; tests/apps/test_demo_examples.py
checks that each file is this render and that the model still answers it right.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

SIZE = 64  # the embedded model's input size (image_processing.fit_size)
# file -> (synth kind, seed)
EXAMPLES = {
    "scene-caption.png": ("scene", 1015),
    "scene-ground.png": ("scene", 1049),
    "chart.png": ("chart", 1030),
    "text-line.png": ("ocr", 1000),
}


def render(name: str):
    """(image, question, answer, meta) of example `name`, as `mmstack.apps.synth` draws it."""
    from mmstack.apps import synth

    kind, seed = EXAMPLES[name]
    rng = random.Random(seed)
    if kind == "scene":
        return synth.scene_sample(rng, SIZE)
    if kind == "chart":
        return synth.chart_sample(rng, SIZE)
    return synth.ocr_sample(rng, SIZE, synth.CHARSET, 4, 8)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).parents[1] / "assets" / "demo-model" / "examples"))
    out = Path(p.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    for name in EXAMPLES:
        render(name)[0].save(out / name, optimize=True)
    print(f"wrote {', '.join(EXAMPLES)} in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The embedded demo model ships as package data, loads by default, and keeps the held-out scores recorded
when it was trained (minus a margin): a regression guard that fails for random weights."""
from __future__ import annotations

import json

import pytest
import torch

import mmstack
import mmstack.api
import mmstack.assets
from mmstack.api import default_model_dir
from mmstack.apps import synth
from mmstack.apps.eval_demo import MARGIN, QUICK_PER_TASK, evaluate


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    recipe = json.loads((mmstack.assets.ROOT / "demo-recipe.json").read_text())
    d = tmp_path_factory.mktemp("heldout")
    synth.generate(d, **recipe["synth"]["heldout"], overwrite=True)
    return d


def test_demo_model_is_package_data_and_loads_by_default():
    d = default_model_dir()
    assert (d / "model.safetensors").stat().st_size < 40 * 1024 * 1024
    pipe = mmstack.api.default_pipeline()
    assert pipe.model.cfg.language.attention == "mla" and pipe.model.cfg.language.moe is not None
    assert pipe.model.has_part("vision") and pipe.generation_modes == ["vq"]
    assert pipe.model.cfg.parts["image_processing"].kind == "vl2_tiling"


@pytest.mark.slow
def test_demo_model_keeps_its_recorded_scores(heldout):
    recorded = json.loads((default_model_dir() / "scores.json").read_text())["quick"]["scores"]
    got = evaluate(mmstack.api.default_pipeline(), heldout, QUICK_PER_TASK)["scores"]
    low = {t: (got.get(t, 0.0), s) for t, s in recorded.items() if got.get(t, 0.0) < s - MARGIN}
    assert not low, f"scores fell below the recorded ones: {low}"


@pytest.mark.slow
def test_the_guard_fails_for_random_weights(heldout):
    from mmstack.loading import build_model

    pipe = mmstack.load(default_model_dir(), device="cpu")
    torch.manual_seed(0)
    pipe.model = build_model(pipe.model.cfg, "cpu").eval()  # same architecture, random weights
    recorded = json.loads((default_model_dir() / "scores.json").read_text())["quick"]["scores"]
    guarded = {t: s for t, s in recorded.items() if s - MARGIN > 0}
    assert guarded, "no recorded score is high enough to guard"
    got = evaluate(pipe, heldout, 6)["scores"]
    assert any(got.get(t, 0.0) < s - MARGIN for t, s in guarded.items())


def _enlarged(src, dst, factor: float):
    """A copy of a held-out set with every image enlarged by `factor` (bicubic, as a photo or a scan of it would
    be) and the grounding boxes scaled with it."""
    import shutil

    from PIL import Image

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("t2i*"))  # understanding only
    for p in (dst / "images").glob("*.png"):
        img = Image.open(p).convert("RGB")
        img.resize((round(img.width * factor), round(img.height * factor)), Image.BICUBIC).save(p)
    recs = [json.loads(x) for x in (dst / "data.jsonl").read_text().splitlines()]
    for r in recs:
        if "box" in r["meta"]:
            r["meta"]["box"] = [round(v * factor) for v in r["meta"]["box"]]
    (dst / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return dst


@pytest.mark.slow
def test_a_96_px_image_gets_the_answers_of_its_64_px_original(heldout, tmp_path):
    """The embedded model declares its 64-px training size; a 96-px copy is fitted to it and scored like the
    original. Without the fit it is tiled 2x2 (a layout the model never saw) and the chart scores collapse."""
    import dataclasses

    pipe = mmstack.api.default_pipeline()
    proc = pipe.understanding.processor
    big = _enlarged(heldout, tmp_path / "x1.5", 1.5)
    at64 = evaluate(pipe, _enlarged(heldout, tmp_path / "x1", 1.0), QUICK_PER_TASK)["scores"]
    at96 = evaluate(pipe, big, QUICK_PER_TASK)["scores"]
    fitted = proc.cfg
    try:
        proc.cfg = dataclasses.replace(fitted, fit_size=None)  # the official behaviour: tiles at the image's size
        unfitted = evaluate(pipe, big, QUICK_PER_TASK)["scores"]
    finally:
        proc.cfg = fitted
    print(f"64 px {at64}\n96 px fitted {at96}\n96 px unfitted {unfitted}")
    assert at64["chart"] > MARGIN, at64  # a task the model does: the comparison means something
    for task in ("chart", "caption", "grounding"):
        assert at96[task] >= at64[task] - MARGIN, (task, at96, at64)
    assert unfitted["chart"] < at64["chart"] - MARGIN, (unfitted, at64)  # what the fit fixes

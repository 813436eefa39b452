"""The embedded demo model ships as package data, loads by default, and keeps the held-out scores recorded
when it was trained (minus a margin): a regression guard that fails for random weights."""
from __future__ import annotations

import json

import pytest
import torch

import mmstack
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

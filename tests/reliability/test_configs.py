"""Configs are data: every size is an integer in a range, every ratio a finite positive number, named by file and
field, checked before anything is built; and the config's depth is checked against the checkpoint's headers."""
from __future__ import annotations

import copy
import json
import shutil
import time

import pytest

from golden import golden_dir
from mmstack.api import default_model_dir
from mmstack.errors import ConfigError
from mmstack.formats import read_config
from mmstack.loading import load_model

VL2 = golden_dir() / "vl2_tiny_mla_moe"


def official() -> dict:
    return json.loads((VL2 / "config.json").read_text())


def native() -> dict:
    return json.loads((default_model_dir() / "config.json").read_text())


def with_field(cfg: dict, path: str, value) -> dict:
    cfg = copy.deepcopy(cfg)
    *parent, key = path.split(".")
    node = cfg
    for k in parent:
        node = node[int(k)] if isinstance(node, list) else node[k]
    node[key] = value
    return cfg


@pytest.mark.parametrize("path, value, message", [
    ("language_config.num_hidden_layers", 10**6, "num_hidden_layers must be in 1..1024"),
    ("language_config.hidden_size", 256.0, "hidden_size must be an integer"),
    ("language_config.hidden_size", True, "hidden_size must be an integer"),
    ("language_config.moe_layer_freq", 0, "moe_layer_freq must be an integer >= 1"),
    ("language_config.rope_theta", 0, "rope.theta must be a finite number > 1.0"),
    ("language_config.rope_scaling", {"type": "yarn", "factor": 0}, "rope.scaling.factor must be a finite number > 0"),
    ("candidate_resolutions", [[65536, 65536]], "image_size must be an integer 1..16384|candidate_resolutions"),
    ("vision_config.patch_size", 0, "patch_size must be in 1.."),
])
def test_official_config_fields_out_of_range_are_refused_by_name(path, value, message):
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=message) as e:
        read_config(with_field(official(), path, value))
    assert time.perf_counter() - t0 < 1.0 and "ZeroDivision" not in str(e.value) and "TypeError" not in str(e.value)


@pytest.mark.parametrize("path, value, message", [
    ("language.num_layers", 10**6, r"language.num_layers must be an integer 1..1024"),
    ("language.moe.moe_layer_freq", 0, r"moe.moe_layer_freq must be an integer 1.."),
    ("language.hidden_size", 256.0, r"language.hidden_size must be an integer"),
    ("image_processing.image_std", [0.5, 0, 0.5], r"image_processing.image_std\[1\] must be a finite number > 0"),
    ("image_processing.candidate_resolutions", [[65536, 65536]], r"candidate_resolutions\[0\] must be an integer"),
    ("image_processing.patch_size", 0, r"image_processing.patch_size must be an integer 1.."),
    ("language.rope.theta", 0, r"rope.theta must be a finite number"),
    ("vision.layers", -3, r"vision.layers must be an integer 1..1024"),
    ("image_processing.fit_size", [16384, 16384], r"fit_size 16384x16384 is 268435456 pixels; the limit is 16777216"),
    ("image_processing.fit_size", [0, 64], r"image_processing.fit_size must be an integer 1..16384"),
])
def test_native_config_fields_out_of_range_are_refused_by_name(path, value, message):
    with pytest.raises(ConfigError, match=message):
        read_config(with_field(native(), path, value))


def test_a_config_deeper_than_its_checkpoint_is_refused_before_building(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(VL2, d)
    cfg = official()
    cfg["language_config"]["num_hidden_layers"] = cfg["language_config"]["num_hidden_layers"] + 40
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"says \d+ decoder layers, but the checkpoint holds 3"):
        load_model(d, device="cpu")

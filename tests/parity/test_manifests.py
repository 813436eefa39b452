"""Real released sizes without weights: each named variant built on the meta device, exported through the
inverse key table, gives exactly the official parameter names and shapes of ../shared/golden/manifests
(every key: language model, understanding and generation parts)."""
from __future__ import annotations

import json

import pytest

from golden import manifests
from mmstack.formats import read_config
from mmstack.io.keymaps import export_names
from mmstack.loading import build_model, key_table
from mmstack.variants import VARIANTS, variant_config

MANIFESTS = manifests()
# manifest file stem -> our variant name
NAMES = {"deepseek-vl2-tiny": "deepseek-vl2-tiny", "deepseek-vl2-small": "deepseek-vl2-small",
         "deepseek-vl2": "deepseek-vl2", "Janus-1.3B": "janus-1.3b", "Janus-Pro-1B": "janus-pro-1b",
         "Janus-Pro-7B": "janus-pro-7b", "JanusFlow-1.3B": "janusflow-1.3b"}
# checkpoint prefixes whose keys the built model must reproduce exactly: everything
COVERED = ("",)


def test_golden_manifests_cover_every_variant():
    assert {p.stem for p in MANIFESTS} == set(NAMES), "expected one manifest per named variant"
    assert set(NAMES.values()) == set(VARIANTS)


def _exported(variant: str) -> tuple[dict, object]:
    cfg = read_config(variant_config(variant))
    model = build_model(cfg, "meta")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return export_names(key_table(cfg.source_format), shapes), cfg


@pytest.mark.parametrize("path", MANIFESTS, ids=[f"golden-manifest-{p.stem}" for p in MANIFESTS])
def test_golden_manifest_names_and_shapes(path):
    manifest = json.loads(path.read_text())
    want = {k: tuple(v["shape"]) for k, v in manifest["state_dict"].items() if k.startswith(COVERED)}
    got, _ = _exported(NAMES[path.stem])
    got = {k: v for k, v in got.items() if k.startswith(COVERED)}
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    assert not missing and not extra and not wrong, (
        f"missing {missing[:5]} ({len(missing)}), extra {extra[:5]} ({len(extra)}), "
        f"wrong shapes {[(k, got[k], want[k]) for k in wrong[:5]]}"
    )


@pytest.mark.parametrize("path", MANIFESTS, ids=[f"golden-manifest-count-{p.stem}" for p in MANIFESTS])
def test_golden_manifest_parameter_count(path):
    manifest = json.loads(path.read_text())
    want = sum(_numel(v["shape"]) for k, v in manifest["state_dict"].items() if k.startswith(COVERED))
    got, _ = _exported(NAMES[path.stem])
    assert sum(_numel(s) for k, s in got.items() if k.startswith(COVERED)) == want


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n

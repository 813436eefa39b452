"""Hub ids (`org/name`, `org/name@revision`) resolve through a Hugging Face cache laid out by the test, offline:
the real `huggingface_hub.snapshot_download` finds the snapshot, and a missing id gives one line saying how to
get it."""
from __future__ import annotations

import shutil

import pytest
import torch

import mmstack
from golden import golden_dir, tokenizer_for
from mmstack.hub import ModelNotFoundError, is_hub_id, resolve_model

SHA = "0123456789abcdef0123456789abcdef01234567"


def lay_out_cache(root, repo: str, src, refs=("main",), sha: str = SHA, extra=()):
    """`root/models--org--name/{refs/<rev>, snapshots/<sha>/...}` as huggingface_hub writes it."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    snap = repo_dir / "snapshots" / sha
    snap.mkdir(parents=True)
    for f in list(src.iterdir()) + list(extra):
        if f.is_file():
            shutil.copyfile(f, snap / f.name)
    (repo_dir / "refs").mkdir()
    for ref in refs:
        (repo_dir / "refs" / ref).write_text(sha)
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch):
    root = tmp_path / "hub"
    src = golden_dir() / "vl2_tiny_mla_moe"
    tok = tokenizer_for(src)
    snap = lay_out_cache(root, "acme/tiny-vl2", src, refs=("main", "v1"), extra=tok.iterdir())
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snap


def test_hub_ids_are_recognised():
    assert is_hub_id("deepseek-ai/deepseek-vl2-tiny") and is_hub_id("deepseek-ai/Janus-Pro-1B@main")
    assert not is_hub_id("a/b/c") and not is_hub_id("../x") and not is_hub_id("folder")


def test_a_hub_id_loads_from_the_offline_cache(hub):
    pipe = mmstack.load("acme/tiny-vl2", device="cpu", dtype=torch.float32)
    assert pipe.source == str(hub)
    src = golden_dir() / "vl2_tiny_mla_moe"
    want = mmstack.load(src, device="cpu", tokenizer=tokenizer_for(src))
    assert pipe.complete([1, 5, 9], max_new_tokens=5) == want.complete([1, 5, 9], max_new_tokens=5)


def test_revisions_resolve_by_ref_and_by_commit(hub):
    assert resolve_model("acme/tiny-vl2@v1") == hub
    assert resolve_model(f"acme/tiny-vl2@{SHA}") == hub


def test_a_missing_id_offline_says_how_to_download_it(hub):
    with pytest.raises(ModelNotFoundError, match=r"acme/nothing: not in the Hugging Face cache .*hf download acme/nothing"):
        mmstack.load("acme/nothing")
    with pytest.raises(ModelNotFoundError, match="no revision|hf download"):
        resolve_model("acme/tiny-vl2@v9")
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        mmstack.load("not/a/folder/or/id")

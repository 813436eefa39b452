"""Paths that come from a model folder, a manifest or training data are read only as regular files of bounded
size: a FIFO (which would block forever) or a symlink to /dev/zero (which would read forever) is refused at once,
with the path named."""
from __future__ import annotations

import os
import shutil
import threading

import pytest

import mmstack
from golden import golden_dir, tokenizer_for
from mmstack.apps import batch
from mmstack.apps.data import DataError, load_examples
from mmstack.errors import CheckpointError, ConfigError, TokenizerError
from mmstack.formats import read_config
from mmstack.tokenizer import Tokenizer

SRC = golden_dir() / "vl2_tiny_mla_moe"


def within(seconds: float, fn):
    """fn()'s exception (or None), failing the test if it has not returned within `seconds` (a hang)."""
    out: dict = {}

    def run():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["e"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"did not return within {seconds} s (blocked or unbounded read)"
    return out.get("e")


def model_copy(tmp_path):
    d = tmp_path / "model"
    shutil.copytree(SRC, d)
    shutil.copytree(tokenizer_for(SRC), d / "tokenizer")
    return d


def special(path, kind: str) -> None:
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    else:
        os.symlink("/dev/zero", path)


@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_config_weights_and_tokenizer_that_are_not_regular_files_are_refused(tmp_path, kind):
    d = model_copy(tmp_path)
    special(d / "config.json", kind)
    e = within(10, lambda: read_config(d))
    assert isinstance(e, ConfigError) and "config.json" in str(e) and "not a regular file" in str(e)

    d = model_copy(tmp_path / "w")
    special(d / "model.safetensors", kind)
    e = within(10, lambda: mmstack.load(d, device="cpu"))
    assert isinstance(e, CheckpointError) and "model.safetensors" in str(e)

    d = model_copy(tmp_path / "t")
    special(d / "tokenizer" / "tokenizer.json", kind)
    e = within(10, lambda: Tokenizer.from_dir(d / "tokenizer"))
    assert isinstance(e, TokenizerError) and "tokenizer.json" in str(e)


@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_a_shard_index_and_its_shards_must_be_regular_files(tmp_path, kind):
    d = model_copy(tmp_path)
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    special(d / "model.safetensors.index.json", kind)
    e = within(10, lambda: mmstack.load(d, device="cpu"))
    assert isinstance(e, CheckpointError) and "index" in str(e)


@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_manifests_and_training_data_that_are_not_regular_files_are_refused(tmp_path, kind):
    for name in ("items.jsonl", "items.csv"):
        special(tmp_path / name, kind)
        e = within(10, lambda: list(batch.iter_items([tmp_path / name])))
        assert isinstance(e, batch.UsageError) and name in str(e)
    for name in ("train.jsonl", "train.json"):
        special(tmp_path / name, kind)
        e = within(10, lambda: load_examples(tmp_path / name))
        assert isinstance(e, DataError) and name in str(e)

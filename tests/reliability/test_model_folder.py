"""A model folder is data: nothing in it is imported or executed, whatever config.json or the tokenizer files
say; a tokenizer without the special tokens a family needs is refused by name; pickled checkpoints (model
weights or a training `state.pt`) load only through `torch.load(weights_only=True)`; shard names cannot leave
the folder. (Lying safetensors headers are fuzzed in test_fuzz.py; more loader cases in tests/test_loading.py.)
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import mmstack
from golden import golden_dir, tokenizer_for
from mmstack.config import ConfigError
from mmstack.formats import read_config
from mmstack.io.checkpoint import CheckpointError, find_weight_files
from mmstack.loading import load_model, save_pretrained
from mmstack.tokenizer import Tokenizer, TokenizerError
from mmstack.vision.vl2_processor import VL2Processor

JANUS = golden_dir() / "janus_pro_tiny"
VL2 = golden_dir() / "vl2_tiny_mla_moe"
VL2_TOK = golden_dir() / "vl2_tokenizer"


def copy_model(src: Path, dst: Path) -> Path:
    """The files `mmstack.load` reads, with the tokenizer inside (`dst/tokenizer/`)."""
    dst.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "processor_config.json", "preprocessor_config.json"):
        if (src / name).exists():
            shutil.copyfile(src / name, dst / name)
    shutil.copytree(tokenizer_for(src) or VL2_TOK, dst / "tokenizer")
    return dst


def without_token(src: Path, dst: Path, token: str) -> Path:
    """A copy of tokenizer folder `src` that does not know `token` at all (added tokens and vocabulary)."""
    shutil.copytree(src, dst)
    tk = json.loads((dst / "tokenizer.json").read_text(encoding="utf-8"))
    tk["added_tokens"] = [t for t in tk["added_tokens"] if t["content"] != token]
    tk["model"]["vocab"].pop(token, None)
    (dst / "tokenizer.json").write_text(json.dumps(tk), encoding="utf-8")
    return dst


class _Payload:
    """Pickles to a call that creates `marker`: proof of execution if the file ever appears."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# ------------------------------------------------------------------------------------------ tokenizers


def test_loading_with_a_tokenizer_missing_a_chat_token_names_it(tmp_path):
    broken = without_token(VL2_TOK, tmp_path / "tok", "<image>")
    with pytest.raises(TokenizerError, match=re.escape("special token '<image>' is missing from the vocabulary")):
        mmstack.load(VL2, device="cpu", tokenizer=broken)


@pytest.mark.parametrize("token", ["<|User|>", "<|Assistant|>"])
def test_vl2_processor_refuses_a_tokenizer_without_its_role_tokens(tmp_path, token):
    with pytest.raises(TokenizerError, match=re.escape(repr(token))):
        VL2Processor.from_pretrained(VL2, without_token(VL2_TOK, tmp_path / "tok", token))


@pytest.mark.parametrize("token", ["<image_placeholder>", "<begin_of_image>", "<end_of_image>", "<｜▁pad▁｜>"])
def test_janus_refuses_a_tokenizer_without_its_image_tokens(tmp_path, token):
    from mmstack.vision.janus_processor import JanusProcessor

    cfg = read_config(JANUS)
    ip, chat = cfg.parts["image_processing"], cfg.parts["chat"]
    tok_dir = without_token(tokenizer_for(JANUS), tmp_path / "tok", token)
    config = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("pad_token", None)  # the pad token is also the tokenizer's pad: test the processor's own check
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (tok_dir / "special_tokens_map.json").unlink()
    with pytest.raises(TokenizerError, match=re.escape(repr(token))):
        JanusProcessor(Tokenizer.from_dir(tok_dir), chat, ip.image_size, ip.image_mean, ip.image_std, ip.min_size)


def test_special_tokens_named_by_the_config_must_exist(tmp_path):
    tok_dir = shutil.copytree(VL2_TOK, tmp_path / "tok")
    config = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": "<no-such-bos>"}))
    (tok_dir / "special_tokens_map.json").unlink()
    with pytest.raises(TokenizerError, match="bos_token '<no-such-bos>' is not in the vocabulary"):
        Tokenizer.from_dir(tok_dir)
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "pad_token"}))
    with pytest.raises(ValueError, match="has no pad_id"):
        VL2Processor(Tokenizer.from_dir(tok_dir), VL2Processor.from_pretrained(VL2, VL2_TOK).cfg)


# ------------------------------------------------------------------------------------------ nothing runs


def test_remote_code_fields_are_data_and_python_files_are_never_imported(tmp_path):
    """`auto_map` / `trust_remote_code` in config.json and tokenizer_config.json, and .py files beside them
    (including a package `__init__.py`), are never imported: loading and answering work, no marker appears."""
    d = copy_model(JANUS, tmp_path / "model")
    marker = tmp_path / "executed"
    evil = f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nraise SystemExit('imported')\n"
    for name in ("modeling_evil.py", "configuration_evil.py", "tokenization_evil.py", "__init__.py",
                 "tokenizer/tokenization_evil.py"):
        (d / name).write_text(evil)
    remote = {"auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel",
                           "AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}, "trust_remote_code": True}
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, **remote}))
    tok_config = json.loads((d / "tokenizer" / "tokenizer_config.json").read_text(encoding="utf-8"))
    (d / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({**tok_config, **remote}), encoding="utf-8")
    modules, path = set(sys.modules), list(sys.path)

    pipe = mmstack.load(d, device="cpu")
    assert isinstance(pipe.describe(JANUS / "und_image.png", max_new_tokens=2), str)
    assert not marker.exists()
    assert not {m for m in set(sys.modules) - modules if "evil" in m or m in ("model", "tokenizer")}
    assert sys.path == path


def test_native_format_refuses_unknown_sections_such_as_auto_map(tmp_path):
    out = save_pretrained(load_model(VL2, device="cpu"), tmp_path / "native")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "modeling.X"}}))
    with pytest.raises(ConfigError, match="unknown section 'auto_map'"):
        read_config(out)


def test_pickled_weights_with_code_are_refused_through_load(tmp_path):
    d = copy_model(VL2, tmp_path / "model")
    marker = tmp_path / "executed"
    weights = load_file(d / "model.safetensors")
    weights[next(iter(weights))] = _Payload(marker)
    torch.save(weights, d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="refused to load"):
        mmstack.load(d, device="cpu", tokenizer=VL2_TOK)
    assert not marker.exists()


def test_a_tampered_training_checkpoint_is_refused_on_resume(tmp_path):
    from mmstack.apps.train import TrainArgs, run

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    record = {"messages": [{"role": "user", "content": "<image>\nColour?"}, {"role": "assistant", "content": "Black."}],
              "images": ["a.png"]}
    (tmp_path / "data.jsonl").write_text(json.dumps(record) + "\n")
    marker = tmp_path / "executed"
    (tmp_path / "run" / "checkpoint").mkdir(parents=True)
    torch.save({"model": {}, "state": _Payload(marker)}, tmp_path / "run" / "checkpoint" / "state.pt")
    args = TrainArgs(model=str(VL2), tokenizer=str(VL2_TOK), data=[str(tmp_path / "data.jsonl")],
                     out=str(tmp_path / "run"), steps=1, batch_size=1, device="cpu", resume=True)
    with pytest.raises(CheckpointError, match="state.pt: cannot resume from it"):
        run(args)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ shards


def test_shard_names_stay_inside_the_folder_while_cache_style_symlinks_load(tmp_path):
    """The index is data: `..` or an absolute name is refused; the folder's own symlinks (how the Hugging
    Face cache links each shard to its blob) load like a single weight file that is a symlink."""
    d = copy_model(VL2, tmp_path / "snapshot")
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    weights = load_file(d / "model.safetensors")
    keys = sorted(weights)
    names = {k: f"model-0000{1 + (i % 2)}-of-00002.safetensors" for i, k in enumerate(keys)}
    for name in set(names.values()):
        save_file({k: weights[k] for k in keys if names[k] == name}, blobs / name)
        os.symlink(blobs / name, d / name)
    (d / "model.safetensors").unlink()
    index = d / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": names}))
    loaded, reference = load_model(d, device="cpu").state_dict(), load_model(VL2, device="cpu").state_dict()
    assert loaded.keys() == reference.keys() and all(torch.equal(loaded[k], reference[k]) for k in reference)
    for bad in ["../blobs/model-00001-of-00002.safetensors", str(blobs / "model-00001-of-00002.safetensors"),
                "sub/../../blobs/model-00001-of-00002.safetensors"]:
        index.write_text(json.dumps({"weight_map": {**names, keys[0]: bad}}))
        with pytest.raises(CheckpointError, match="points outside the model folder"):
            find_weight_files(d)
    for bad in ['{"weight_map": [1, 2]}', "[" * 100_000, '{"weight_map": {"a": 3}}']:
        index.write_text(bad)
        with pytest.raises(CheckpointError):
            find_weight_files(d)

"""Checkpoint I/O: every failure gives a clear message naming the file and keys; native save/load
round-trips exactly; sharded and fused layouts load; nothing is unpickled."""
from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import mmstack
from golden import golden_dir
from mmstack.config import ConfigError
from mmstack.formats import read_config
from mmstack.io.checkpoint import CheckpointError, check_safetensors, find_weight_files
from mmstack.loading import build_model, load_model, save_pretrained
from mmstack.variants import VARIANTS, variant_config


def _tiny_dir(tmp_path, variant="deepseek-vl2-small"):
    """A random debug-size model saved in the native format."""
    cfg = read_config(variant_config(variant, debug=True))
    model = build_model(cfg, "cpu")
    d = tmp_path / "native"
    save_pretrained(model, d)
    return d, model


def test_native_save_load_round_trips_config_and_weights_bitwise(tmp_path):
    for variant in VARIANTS:
        d, model = _tiny_dir(tmp_path / variant, variant)
        loaded = load_model(d, device="cpu", dtype=torch.float32)
        assert loaded.cfg.to_json_dict() == model.cfg.to_json_dict()
        assert read_config(d).to_json_dict() == json.loads((d / "config.json").read_text())
        a, b = model.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
        # saving what was loaded gives the same file contents
        save_pretrained(loaded, tmp_path / variant / "again")
        assert (tmp_path / variant / "again" / "config.json").read_text() == (d / "config.json").read_text()


def test_native_config_language_round_trip_is_exact(tmp_path):
    cfg = read_config(variant_config("deepseek-vl2", debug=True))
    d, _ = _tiny_dir(tmp_path, "deepseek-vl2")
    assert read_config(d).language == cfg.language


def test_missing_folder_and_missing_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        mmstack.load(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps(variant_config("janus-pro-1b", debug=True)))
    with pytest.raises(CheckpointError, match="no weights found"):
        load_model(tmp_path, device="cpu")


def test_unknown_model_type_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(ConfigError, match="unknown model_type 'gpt_neox'"):
        read_config(tmp_path)


def test_invalid_json_and_unknown_native_keys(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_config(tmp_path)
    d, _ = _tiny_dir(tmp_path / "x")
    raw = json.loads((d / "config.json").read_text())
    raw["language"]["hiden_size"] = 3
    with pytest.raises(ConfigError, match="unknown keys \\['hiden_size'\\]"):
        read_config(raw)


def test_official_misspelled_default_routing_is_explained():
    raw = variant_config("deepseek-vl2-small", debug=True)
    del raw["language_config"]["topk_method"]
    with pytest.raises(ConfigError, match="'gready'"):
        read_config(raw)


def test_truncated_safetensors_header(tmp_path):
    d, _ = _tiny_dir(tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:4])
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        check_safetensors(f)
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(d, device="cpu")


def test_header_that_lies_about_its_length(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match="header claims"):
        check_safetensors(f)


def _rewrite(d, fn):
    sd = load_file(d / "model.safetensors")
    fn(sd)
    save_file(sd, d / "model.safetensors")


def test_missing_unexpected_and_misshaped_keys_are_listed(tmp_path):
    d, _ = _tiny_dir(tmp_path)
    _rewrite(d, lambda sd: (sd.pop("language.norm.weight"), sd.__setitem__("language.bogus", torch.zeros(2)),
                            sd.__setitem__("language.embed_tokens.weight", torch.zeros(3, 3))))
    with pytest.raises(CheckpointError) as e:
        load_model(d, device="cpu")
    msg = str(e.value)
    assert "missing keys (1): language.norm.weight" in msg
    assert "unexpected keys (1): language.bogus" in msg
    assert "language.embed_tokens.weight: checkpoint [3, 3] vs model" in msg


def test_missing_expert_is_named_by_its_official_key(tmp_path):
    src = golden_dir() / "vl2_tiny_mla_moe"
    d = tmp_path / "vl2"
    shutil.copytree(src, d)
    _rewrite(d, lambda sd: sd.pop("language.model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): language\.model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight"):
        load_model(d, device="cpu", language_only=True)


def test_sharded_checkpoint_loads_and_index_cannot_escape(tmp_path):
    d, model = _tiny_dir(tmp_path)
    sd = load_file(d / "model.safetensors")
    keys = sorted(sd)
    half = len(keys) // 2
    save_file({k: sd[k] for k in keys[:half]}, d / "model-00001-of-00002.safetensors")
    save_file({k: sd[k] for k in keys[half:]}, d / "model-00002-of-00002.safetensors")
    (d / "model.safetensors").unlink()
    index = {"weight_map": {k: ("model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors")
                            for i, k in enumerate(keys)}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = load_model(d, device="cpu")
    assert all(torch.equal(loaded.state_dict()[k], model.state_dict()[k]) for k in keys)
    index["weight_map"][keys[0]] = "../outside.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="points outside the model folder"):
        find_weight_files(d)


class _Evil:
    def __reduce__(self):
        return (print, ("executed!",))


def test_pickled_bin_with_code_is_refused(tmp_path, capsys):
    d, model = _tiny_dir(tmp_path)
    (d / "model.safetensors").unlink()
    torch.save({"language.norm.weight": _Evil()}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused to load"):
        load_model(d, device="cpu")
    assert "executed!" not in capsys.readouterr().out


def test_plain_tensor_bin_loads_with_weights_only(tmp_path):
    d, model = _tiny_dir(tmp_path)
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    loaded = load_model(d, device="cpu")
    assert torch.equal(loaded.language.norm.weight, model.language.norm.weight)


def test_dtype_choice_keeps_router_bias_fp32(tmp_path):
    d, _ = _tiny_dir(tmp_path, "deepseek-vl2")
    m = load_model(d, device="cpu", dtype="bf16")
    assert m.language.embed_tokens.weight.dtype == torch.bfloat16
    assert m.language.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert not any(p.is_meta for p in m.parameters()) and not any(b.is_meta for b in m.buffers())

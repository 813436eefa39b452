"""`mmstack finetune --plan` and `mmstack bench --config` read files and sizes from the user (round 3 of the
adversarial cases, docs/limits.md): a config file that is not JSON, nests without end, is a FIFO or names an
impossible architecture, and sizes no trainer could run, are each refused in one line naming the file, field or flag,
before anything is built."""
from __future__ import annotations

import json
import os
import re
import threading

import pytest

from mmstack.apps.bench import run_suites
from mmstack.apps.cli import main
from mmstack.apps.finetune_plan import memory_plan
from mmstack.errors import ConfigError

DEEP = "[" * 100_000 + "]" * 100_000


def _bad_files(tmp_path) -> dict:
    files = {"invalid": b"{", "deep": DEEP.encode(), "utf8": b"\xff\xfe{}", "list": b"[1, 2]", "config_5": b'{"config": 5}'}
    out = {}
    for name, raw in files.items():
        out[name] = tmp_path / f"{name}.json"
        out[name].write_bytes(raw)
    out["fifo"] = tmp_path / "fifo.json"
    os.mkfifo(out["fifo"])
    return out


def test_plan_config_files_that_are_not_configs_are_refused_naming_the_file(tmp_path):
    for name, path in _bad_files(tmp_path).items():
        with pytest.raises(ConfigError, match=rf"{path.name}"):
            memory_plan(path)
    with pytest.raises(ConfigError, match=r"no/such/folder: no such model folder or file, and unknown variant"):
        memory_plan("no/such/folder")


@pytest.mark.parametrize("option, value, message", [
    ("seq_len", 0, r"--seq-len must be an integer >= 1"), ("seq_len", 10**12, r"--seq-len 1000000000000 exceeds the model context"),
    ("images", -1, r"--images must be an integer >= 0"), ("gpus", 0, r"--gpus must be"), ("gpus", -2, r"--gpus must be"),
    ("batch", 0, r"--batch-size must be"), ("lora_r", -1, r"--lora-r must be"), ("tiles", (0, 0), r"--tiles 0x0"),
    ("tiles", (-1, 2), r"--tiles -1x2"), ("tiles", (1000, 1000), r"--tiles 1000x1000")])
def test_plan_sizes_no_trainer_could_run_are_refused_by_flag(option, value, message):
    with pytest.raises(ValueError, match=message):
        memory_plan("deepseek-vl2-tiny", **{option: value})


def test_plan_command_prints_one_line_naming_the_file(tmp_path, capsys):
    path = tmp_path / "deep.json"
    path.write_text(DEEP)
    assert main(["finetune", "--plan", "--model", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ConfigError" in err[0] and "deep.json: not valid JSON (RecursionError" in err[0]


def test_bench_config_files_and_architectures_are_refused_naming_the_file(tmp_path):
    def bench(config):
        done = {}
        t = threading.Thread(target=lambda: done.setdefault("e", _raised(lambda: run_suites(
            ["mla-moe-decode"], size="smoke", device="cpu", repeat=1, warmup=0, config=str(config), against="none"))),
            daemon=True)
        t.start()
        t.join(20)
        assert not t.is_alive(), f"{config.name}: not refused within 20 s"
        return done["e"]

    for name, path in _bad_files(tmp_path).items():
        if name == "config_5":
            continue  # a JSON object: its unknown key is not architecture (transformers ignores it)
        e = bench(path)
        assert isinstance(e, ValueError) and path.name in str(e), (name, e)
    for name, fields, field in [("heads", {"num_attention_heads": 0}, "num_(attention_)?heads"),
                                ("layers", {"num_hidden_layers": 100_000}, "num_(hidden_)?layers"),
                                ("hidden", {"hidden_size": True}, "hidden_size"),
                                ("context", {"max_position_embeddings": "x"}, "max_position_embeddings"),
                                ("dense", {"n_routed_experts": 0}, "n_routed_experts")]:
        path = tmp_path / f"arch_{name}.json"
        path.write_text(json.dumps(fields))
        e = bench(path)
        assert isinstance(e, ConfigError) and path.name in str(e) and re.search(field, str(e)), (name, e)


def _raised(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - handed to the test
        return e
    return None


def test_a_plan_allocates_nothing_whatever_the_lora_rank():
    plan = memory_plan("deepseek-vl2-tiny", lora_r=1_000_000)  # peft's adapters used to be built in CPU memory:
    assert plan.trainable > 1e12 and plan.mode == "LoRA r=1000000"  # 327 GB asked for here


def test_the_default_sequence_fits_the_model_context():
    from mmstack.api import default_model_dir

    assert memory_plan(default_model_dir()).setup["seq_len"] == 1024  # its context; 2048 would be refused
    assert memory_plan("deepseek-vl2-tiny").setup["seq_len"] == 2048

"""The side files of a model folder (demo.json, scores.json, build.json) feed the demo's banner and examples,
`mmstack info` and the batch jobs' prompts (round 3 of the adversarial cases, docs/limits.md). They are
information only: absurd nesting, numbers too large for a float, and example names the file system cannot hold
are ignored like any other bad field; nothing escapes, and no example leaves the folder."""
from __future__ import annotations

import json
import types
from argparse import Namespace
from pathlib import Path

import pytest

from mmstack.api import default_model_dir
from mmstack.apps.cli import cmd_info
from mmstack.apps.model_card import banner, read_card
from mmstack.apps.model_settings import demo_settings, task_defaults
from mmstack.formats import read_config

DEMO = default_model_dir()
DEEP = "[" * 100_000 + "]" * 100_000


def _folder(tmp_path: Path, **files) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (d / name).symlink_to(DEMO / name)
    (d / "examples").mkdir()
    (d / "examples" / "chart.png").write_bytes((DEMO / "examples" / "chart.png").read_bytes())
    for name, value in files.items():
        (d / f"{name}.json").write_text(value if isinstance(value, str) else json.dumps(value))
    return d


def _read_everything(d: Path):
    pipe = types.SimpleNamespace(source=str(d), cfg=read_config(d))
    settings = demo_settings(pipe)
    card = read_card(d, pipe.cfg)
    assert cmd_info(Namespace(model=str(d))) == 0
    return settings, card, banner(card), task_defaults(d, "ocr")


def test_deeply_nested_side_files_are_ignored(tmp_path, capsys):
    d = _folder(tmp_path, demo=DEEP, scores=DEEP, build=DEEP)
    settings, card, text, task = _read_everything(d)
    assert settings == {} and card.scores == {} and text is None and task == {}
    assert json.loads(capsys.readouterr().out)["parameters"] > 0  # info still answers


def test_numbers_too_large_or_not_finite_are_dropped_from_the_card(tmp_path, capsys):
    demo = {"about": {"trained_on": "shapes"}}
    scores = {"full": {"scores": {"ocr": 10 ** 4000, "chart": float("nan"), "caption": float("inf"), "ground": 0.5}}}
    d = _folder(tmp_path, demo=demo, scores=scores, build={"seconds": 10 ** 4000})
    _, card, text, _ = _read_everything(d)
    assert card.scores == {"ground": 0.5} and card.train_seconds is None
    assert "0.50" in text and "nan" not in text.lower() and "inf" not in text.lower()
    json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"info printed {c}"))  # no NaN, Infinity


def test_example_names_the_file_system_cannot_hold_are_ignored(tmp_path):
    names = ["a\x00.png", "x" * 5000 + ".png", "y/" * 3000 + "a.png", "examples/loop.png", "examples/chart.png"]
    demo = {"examples": {"documents": names, "chat": [{"text": "hi", "image": n} for n in names]}}
    d = _folder(tmp_path, demo=demo)
    (d / "examples" / "loop.png").symlink_to(d / "examples" / "loop.png")
    settings, _, _, _ = _read_everything(d)
    chart = str((d / "examples" / "chart.png").resolve())
    assert settings["document_examples"] == [chart] and settings["chat_examples"] == [("hi", chart)]


def test_a_model_folders_own_text_cannot_put_links_images_or_html_in_the_banner():
    """The banner is markdown: text from demo.json is escaped, and only a hub id is shown as the real model."""
    import re

    from mmstack.apps.model_card import ModelCard, banner

    hostile = "shapes ![t](http://tracker.example/p.png) <img src=x onerror=alert(1)> [click](http://x.example)"
    text = banner(ModelCard(parameters=9_000_000, input_size=(64, 64), trained_on=hostile,
                            real_model="x` ![t](http://tracker.example/q.png)", scores={"<b>ocr</b>": 0.5}))
    assert not re.search(r"(?<!\\)!\[|(?<!\\)<img|(?<!\\)\[click|(?<!\\)<b>", text)
    assert "mmstack demo --model" not in text  # not a hub id: left out
    assert "deepseek-ai/Janus-Pro-1B" in banner(ModelCard(trained_on="x", real_model="deepseek-ai/Janus-Pro-1B"))

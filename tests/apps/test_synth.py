"""`mmstack.apps.synth`: deterministic synthetic data whose answers agree with the pixels they describe."""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image

from mmstack.apps import synth
from mmstack.apps.chart import table_triples
from mmstack.apps.image_checks import caption_score, parse_caption
from mmstack.vision.grounding import parse_boxes

def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


class Dataset(NamedTuple):
    out: Path
    size: int


@pytest.fixture(scope="module", params=[64, 96], ids=lambda s: f"{s}px")
def dataset(request, tmp_path_factory) -> Dataset:
    out = tmp_path_factory.mktemp("synth") / "data"
    synth.generate(out, 240, seed=0, image_size=request.param, progress=False)
    return Dataset(out, request.param)


def _task(dataset: Dataset, task: str, question_type: str | None = None) -> list[dict]:
    rows = [r for r in _rows(dataset.out / "data.jsonl") if r["task"] == task]
    rows = [r for r in rows if question_type in (None, r["meta"].get("question_type"))]
    assert rows, f"no {task}/{question_type} records generated"
    return rows


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(tmp_path):
    for name, seed, workers in [("a", 3, 1), ("b", 3, 2), ("c", 4, 1)]:  # b: rendered by two worker processes
        synth.generate(tmp_path / name, 24, seed=seed, progress=False, workers=workers)
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert a["data.jsonl"] != c["data.jsonl"] and a["t2i.jsonl"] != c["t2i.jsonl"]
    assert sum(a[k] != c[k] for k in a if k.startswith("images/")) >= 20


def test_a_larger_n_extends_a_smaller_run_without_changing_it(tmp_path):
    synth.generate(tmp_path / "small", 10, seed=1, progress=False)
    synth.generate(tmp_path / "large", 20, seed=1, progress=False)
    small, large = _files(tmp_path / "small"), _files(tmp_path / "large")
    for name in ("data.jsonl", "t2i.jsonl"):
        assert large[name].startswith(small[name])
    assert all(large[k] == v for k, v in small.items() if k.startswith("images/"))


def test_every_record_has_its_image_and_one_image_tag_per_image(dataset):
    rows = _rows(dataset.out / "data.jsonl")
    assert {r["task"] for r in rows} == {"scene", "ocr", "chart"}
    for r in rows:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert r["messages"][0]["content"].count("<image>") == len(r["images"]) == 1
        for rel in r["images"]:
            with Image.open(dataset.out / rel) as img:
                assert img.size == (dataset.size, dataset.size) and img.mode == "RGB"
    t2i = _rows(dataset.out / "t2i.jsonl")
    assert len(t2i) == 60 and len(rows) == 180
    for r in t2i:
        assert set(r) >= {"id", "prompt", "image"} and (dataset.out / r["image"]).is_file()


def test_grounding_boxes_are_in_range_and_cover_the_named_shape(dataset):
    for r in _task(dataset, "scene", "grounding"):
        meta = r["meta"]
        target = meta["objects"][meta["target"]]
        phrase = f"the {target['colour']} {target['shape']}"
        assert r["messages"][0]["content"] == f"<image>\n<|ref|>{phrase}<|/ref|>."
        assert meta["box"] == target["box"]
        grid = synth.to_grid(target["box"], dataset.size, dataset.size)
        answer = r["messages"][1]["content"]
        assert answer == f"<|ref|>{phrase}<|/ref|><|det|>[[{grid[0]}, {grid[1]}, {grid[2]}, {grid[3]}]]<|/det|>"
        assert all(0 <= v <= 999 for v in grid)
        (box,) = parse_boxes(answer, dataset.size, dataset.size)
        assert box.label == phrase
        assert np.allclose(box.xyxy, target["box"], atol=0.1)  # the 0..999 grid is finer than a pixel
        x1, y1, x2, y2 = target["box"]
        crop = np.asarray(Image.open(dataset.out / r["images"][0]))[y1:y2, x1:x2]
        share = (crop == synth.COLOURS[target["colour"]]).all(-1).mean()
        assert share >= 0.45, (r["id"], share)  # a triangle fills half its box, a square all of it


def test_scene_objects_do_not_overlap_and_are_unique(dataset):
    for r in _task(dataset, "scene"):
        objs = r["meta"]["objects"]
        assert 1 <= len(objs) <= 3
        assert len({(o["colour"], o["shape"]) for o in objs}) == len(objs)
        for i, a in enumerate(objs):
            for b in objs[i + 1:]:
                ax1, ay1, ax2, ay2 = a["box"]
                bx1, by1, bx2, by2 = b["box"]
                assert ax2 <= bx1 or bx2 <= ax1 or ay2 <= by1 or by2 <= ay1


def test_captions_name_every_object_left_to_right(dataset):
    for r in _task(dataset, "scene", "caption"):
        truth = [(o["colour"], o["shape"]) for o in r["meta"]["objects"]]
        answer = r["messages"][1]["content"]
        assert answer == synth.caption(truth) and answer.endswith(".")
        assert parse_caption(answer) == truth
        assert caption_score(answer, r["meta"]["objects"]) == 1.0
        assert [o["box"][0] for o in r["meta"]["objects"]] == sorted(o["box"][0] for o in r["meta"]["objects"])


def test_chart_tables_parse_back_to_the_meta_values(dataset):
    for r in _task(dataset, "chart"):
        meta = r["meta"]
        triples = table_triples(r["messages"][1]["content"])
        title = [v for row, _, v in triples if row == "title"]
        assert title == ([meta["title"]] if meta["title"] else [])
        values = {row: int(v) for row, col, v in triples if row != "title"}
        assert values == meta["series"]["value"]
        assert list(values) == list("ABCDE"[: len(values)]) and 3 <= len(values) <= 5
        assert all(0 <= v <= 100 for v in values.values())


def test_bar_heights_and_line_points_encode_the_values(dataset):
    for r in _task(dataset, "chart"):
        meta = r["meta"]
        left, top, right, bottom = meta["plot_box"]
        pix = np.asarray(Image.open(dataset.out / r["images"][0]))
        is_colour = (pix == synth.COLOURS[meta["colour"]]).all(-1)
        for (x, y), v in zip(meta["points"], meta["series"]["value"].values()):
            assert abs((bottom - y) * 100 / (bottom - top) - v) <= 100 / (bottom - top)
            if meta["chart_type"] == "bar":
                height = int(is_colour[top:bottom, x].sum())
                assert abs(height * 100 / (bottom - top) - v) <= 100 / (bottom - top), (r["id"], height, v)
            else:
                assert is_colour[y, x]


def test_ocr_answers_match_the_text_and_stay_inside_the_image(dataset):
    for r in _task(dataset, "ocr"):
        meta, answer = r["meta"], r["messages"][1]["content"]
        assert answer == "\n".join(meta["lines"])
        assert all(set(line) <= set(synth.CHARSET) for line in meta["lines"])
        if meta["question_type"] == "line":
            assert 4 <= len(answer) <= 12
            width = dataset.size - 2 * synth.MARGIN - 2
            if meta["font_size"] < synth.MIN_FONT:  # shrunk only because the preferred size would not fit
                left, _, right, _ = synth.font(synth.MIN_FONT).getbbox(answer)
                assert right - left > width
            if meta["squeeze"] < 1:  # squeezed only below the floor size
                assert meta["font_size"] == synth.FLOOR_FONT
        else:
            assert 2 <= len(meta["lines"]) <= 3
        pix = np.asarray(Image.open(dataset.out / r["images"][0])).astype(int)
        bg = pix[0, 0]
        ring = np.concatenate([pix[:2].reshape(-1, 3), pix[-2:].reshape(-1, 3), pix[:, :2].reshape(-1, 3), pix[:, -2:].reshape(-1, 3)])
        assert (ring == bg).all(), r["id"]  # no glyph touches the frame
        assert (np.abs(pix - bg).sum(-1) > 100).any()  # and there is ink


def test_ocr_curriculum_and_charset_parameters(tmp_path):
    synth.generate(tmp_path, 40, seed=0, kinds=("ocr",), ocr_min_len=1, ocr_max_len=3, charset="AB7", progress=False)
    rows = _rows(tmp_path / "data.jsonl")
    assert len(rows) == 40 and not _rows(tmp_path / "t2i.jsonl")
    for r in rows:
        assert all(1 <= len(line) <= 3 and set(line) <= set("AB7") for line in r["meta"]["lines"])
        if r["meta"]["question_type"] == "line":
            assert r["meta"]["font_size"] >= synth.MIN_FONT
    assert {len(r["meta"]["text"]) for r in rows if r["meta"]["question_type"] == "line"} == {1, 2, 3}


def test_lines_too_long_for_the_image_size_are_warned_about(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="mmstack.apps.synth"):
        synth.generate(tmp_path / "a", 2, seed=0, kinds=("ocr",), image_size=96, progress=False)
        synth.generate(tmp_path / "b", 2, seed=0, kinds=("ocr",), image_size=64, ocr_max_len=8, progress=False)
        assert not caplog.records
        synth.generate(tmp_path / "c", 2, seed=0, kinds=("ocr",), image_size=48, progress=False)
    assert "are squeezed" in caplog.text


def test_t2i_prompts_follow_the_grammar_and_t2i_size(tmp_path):
    synth.generate(tmp_path, 30, seed=0, kinds=("t2i",), t2i_size=32, progress=False)
    for r in _rows(tmp_path / "t2i.jsonl"):
        objs = r["meta"]["objects"]
        expected = " above ".join(f"a {o['colour']} {o['shape']}" for o in objs)
        assert r["prompt"] == expected and len(objs) in (1, 2)
        if len(objs) == 2:
            assert objs[0]["box"][3] <= objs[1]["box"][1]  # the first is above the second
        assert Image.open(tmp_path / r["image"]).size == (32, 32)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError):
        synth.generate(tmp_path / "x", 4, seed=0, kinds=("scene", "video"), progress=False)
    with pytest.raises(ValueError):
        synth.generate(tmp_path / "y", 4, seed=0, image_size=16, progress=False)
    synth.generate(tmp_path / "z", 4, seed=0, progress=False)
    with pytest.raises(FileExistsError):
        synth.generate(tmp_path / "z", 4, seed=0, progress=False)
    synth.generate(tmp_path / "z", 4, seed=0, overwrite=True, progress=False)
    for step in (0, 101, 2.5):
        with pytest.raises(ValueError, match="chart_step"):
            synth.generate(tmp_path / "w", 4, seed=0, chart_step=step, progress=False)


def test_chart_values_sit_on_the_chart_step(tmp_path):
    from mmstack.apps.chart import table_triples

    synth.generate(tmp_path / "s", 40, seed=0, kinds=("chart",), chart_step=10, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "s" / "data.jsonl").read_text().splitlines()]
    values = [v for r in rows for v in r["meta"]["series"]["value"].values()]
    assert values and all(v % 10 == 0 and 0 <= v <= 100 for v in values) and len(set(values)) > 5
    assert all({k: float(v) for k, v in r["meta"]["series"]["value"].items()}
               == {row: val for row, _, val in table_triples(r["messages"][1]["content"]) if row != "title"} for r in rows)


def test_cli_synth_writes_the_dataset(tmp_path, capsys):
    from mmstack import cli

    out = tmp_path / "cli"
    argv = ["synth", "--out", str(out), "--n", "8", "--seed", "5", "--kinds", "scene,t2i", "--image-size", "64"]
    assert cli.main(argv) == 0
    assert "4 records" in capsys.readouterr().out
    assert len(_rows(out / "data.jsonl")) == 4 and len(_rows(out / "t2i.jsonl")) == 4
    assert cli.main(argv) == 1  # refuses to overwrite without --overwrite
    assert cli.main(argv + ["--overwrite"]) == 0


def test_cli_synth_defaults_to_the_embedded_models_sizes(tmp_path):
    from PIL import Image

    from mmstack import cli
    from mmstack.api import default_model_dir
    from mmstack.formats import read_config

    cfg = read_config(default_model_dir())
    out = tmp_path / "default"
    assert cli.main(["synth", "--out", str(out), "--n", "4", "--kinds", "scene,t2i"]) == 0
    scene = Image.open(out / _rows(out / "data.jsonl")[0]["images"][0])
    t2i = Image.open(out / _rows(out / "t2i.jsonl")[0]["image"])
    assert list(scene.size) == list(cfg.parts["image_processing"].fit_size)
    assert t2i.size == (cfg.parts["vq_head"].image_size,) * 2

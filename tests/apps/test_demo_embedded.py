"""The demo on the embedded model explains itself: a banner computed from the model folder's files in every tab,
example inputs from its domain that it answers right (checked against the synthetic generator's truth, through
gradio_client and in headless Chromium), grounding from a plain "Where is ...?", one-line errors without server
paths, a new document clears the last results, and `mmstack info` shows the same card."""
from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys

import pytest
from net import free_port
from golden import REPO, golden_dir, tokenizer_for
from PIL import Image

import mmstack
import mmstack.api
from mmstack.apps.chart import table_triples
from mmstack.apps.demo import build_app, launch
from mmstack.apps.demo_handlers import grounding_request, public_message, to_model_messages, with_grounding
from mmstack.apps.eval_demo import TASK_NAMES
from mmstack.apps.metrics import box_iou, relaxed_accuracy
from mmstack.apps.model_card import read_card
from mmstack.apps.model_settings import demo_settings
from mmstack.vision.grounding import parse_boxes

ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
_spec = importlib.util.spec_from_file_location("demo_examples", REPO / "docs" / "demo_examples.py")
examples = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(examples)


@pytest.fixture(scope="module")
def pipe():
    return mmstack.api.default_pipeline()


@pytest.fixture(scope="module")
def url(pipe):
    demo = build_app(pipe, max_queue=8)
    _, local_url, _ = launch(demo, port=free_port(), prevent_thread_lock=True)
    yield local_url
    demo.close()


@pytest.fixture(scope="module")
def client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def _example(pipe, name: str) -> str:
    shipped = {**dict((img, txt) for txt, img in demo_settings(pipe)["chat_examples"]),
               **{p: None for p in demo_settings(pipe)["document_examples"]}}
    return next(p for p in shipped if p.endswith("/" + name))


def _caption_truth(name: str) -> str:
    from mmstack.apps import synth

    return synth.caption([(o["colour"], o["shape"]) for o in examples.render(name)[3]["objects"]])


# ------------------------------------------------------------------------------------------ files


def test_the_shipped_examples_are_the_documented_synthetic_renders(pipe):
    settings = demo_settings(pipe)
    names = sorted([p.rsplit("/", 1)[1] for _, p in settings["chat_examples"]]
                   + [p.rsplit("/", 1)[1] for p in settings["document_examples"]])
    assert names == sorted(examples.EXAMPLES)
    for name in names:
        shipped = Image.open(_example(pipe, name)).convert("RGB")
        assert shipped.tobytes() == examples.render(name)[0].tobytes(), name
    total = sum(p.stat().st_size for p in mmstack.assets.ROOT.rglob("*") if p.is_file())
    assert total <= 40 * 2**20, f"assets/ holds {total / 2**20:.1f} MB"


def test_examples_outside_the_model_folder_are_ignored(tmp_path, caplog):
    class Folder:
        source = str(tmp_path)

    examples.render("chart.png")[0].save(tmp_path / "ok.png")
    (tmp_path / "demo.json").write_text(json.dumps({"examples": {
        "chat": [{"text": "Describe.", "image": "ok.png"}, {"text": "x", "image": "/etc/passwd"},
                 {"text": "y", "image": "../outside.png"}],
        "documents": ["ok.png", "missing.png", "demo.json"]}}))
    got = demo_settings(Folder())
    assert got == {"chat_examples": [("Describe.", str(tmp_path / "ok.png"))],
                   "document_examples": [str(tmp_path / "ok.png")]}
    assert caplog.text.count("ignored") == 4


def test_mmstack_info_shows_parameters_input_size_and_training_domain(pipe):
    out = subprocess.run([sys.executable, "-m", "mmstack.cli", "info"], capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    about = json.loads((mmstack.api.default_model_dir() / "demo.json").read_text())["about"]
    assert info["parameters"] == sum(p.numel() for p in pipe.model.parameters())
    assert info["input_size"] == list(pipe.understanding.processor.cfg.fit_size)
    assert info["trained_on"] == about["trained_on"]
    recorded = json.loads((mmstack.api.default_model_dir() / "scores.json").read_text())["full"]["scores"]
    assert info["held_out_scores"] == {k: round(v, 3) for k, v in recorded.items()}
    official = subprocess.run([sys.executable, "-m", "mmstack.cli", "info", str(golden_dir() / "vl2_tiny_mla_moe")],
                              capture_output=True, text=True, check=True)
    assert "trained_on" not in json.loads(official.stdout)  # official folders say nothing about themselves


def test_a_banner_tops_every_tab_of_a_model_that_says_what_it_is_and_none_of_an_official_one(pipe):
    def banners(demo):
        return [b for b in demo.blocks.values() if "model-banner" in (getattr(b, "elem_classes", None) or [])]

    assert len(banners(build_app(pipe))) == 3  # Chat, Text to image, Documents
    janus = golden_dir() / "janus_pro_tiny"
    assert banners(build_app(mmstack.load(janus, device="cpu", tokenizer=tokenizer_for(janus)))) == []


# ------------------------------------------------------------------------------------------ handlers


def test_a_plain_where_question_becomes_the_grounding_query(pipe):
    assert grounding_request("Where is the red circle?") == "the red circle"
    assert grounding_request("Describe this image.") is None
    question, image = next((t, p) for t, p in demo_settings(pipe)["chat_examples"] if p.endswith("/scene-ground.png"))
    assert question.startswith("Where is ")  # the shipped example is a plain question, no grounding markup
    history = [{"role": "user", "content": [{"type": "text", "text": question}]}]
    assert with_grounding(to_model_messages(history)) == to_model_messages(history)  # no image: a question
    messages = [{"role": "user", "content": [{"type": "image", "path": image}, {"type": "text", "text": question}]}]
    answer = "".join(pipe.chat(with_grounding(messages), stream=True, max_new_tokens=64, temperature=0.0))
    boxes = parse_boxes(answer, 64, 64)
    meta = examples.render("scene-ground.png")[3]
    truth = next(o["box"] for o in meta["objects"] if f"the {o['colour']} {o['shape']}" == grounding_request(question))
    assert boxes and box_iou([boxes[0].x1, boxes[0].y1, boxes[0].x2, boxes[0].y2], truth) >= 0.5, (answer, truth)


def test_user_mistakes_are_one_line_without_server_paths(client, tmp_path, caplog):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    assert public_message(ValueError("/srv/uploads/abc/x.png: not an image")) == "x.png: not an image"
    bad = tmp_path / "notes.png"
    bad.write_text("this is not a picture")
    with caplog.at_level(logging.WARNING, logger="mmstack.apps.demo_handlers"):
        with pytest.raises(AppError) as e:
            client.predict(handle_file(str(bad)), 1, 16, api_name="/ocr")
    assert "notes.png" in str(e.value) and "/tmp" not in str(e.value) and str(tmp_path) not in str(e.value)
    records = [r for r in caplog.records if r.name == "mmstack.apps.demo_handlers"]
    assert len(records) == 1 and records[0].exc_info is None and "\n" not in records[0].getMessage()


# ------------------------------------------------------------------------------------------ through the server


def test_the_model_answers_its_caption_and_chart_examples_right(pipe, client):
    from gradio_client import handle_file

    text, image = demo_settings(pipe)["chat_examples"][0]
    history = client.predict({"text": text, "files": [handle_file(image)]}, [], 0.0, 1.0, 64, 1.0, api_name="/chat")[0]
    answer = "".join(c["text"] for c in history[-1]["content"] if c["type"] == "text")
    assert answer.strip() == _caption_truth("scene-caption.png")
    _, table, _, answer = client.predict(handle_file(_example(pipe, "chart.png")), 1, 192, api_name="/chart")
    truth = examples.render("chart.png")[3]["series"]["value"]
    got = {row: value for row, _, value in table_triples(answer)}
    assert all(relaxed_accuracy(got.get(k), float(v)) for k, v in truth.items()), (answer, truth)


# ------------------------------------------------------------------------------------------ browser


@pytest.fixture
def chromium():
    from pathlib import Path

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser test needs the playwright package")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"browser test needs {CHROMIUM}")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield browser
        browser.close()


_SETTLED = """() => [...document.querySelectorAll('[data-testid=status-tracker]')].every(e => e.classList.contains('hide'))
    && [...document.images].every(i => i.complete || !i.offsetParent)"""


def test_every_tab_says_what_the_model_is_and_a_clicked_example_is_answered(chromium, url, pipe):
    ARTIFACTS.mkdir(exist_ok=True)
    card = read_card(mmstack.api.default_model_dir())
    expected = [f"{card.parameters / 1e6:.1f} M parameters", f"{card.input_size[0]}-px", card.trained_on,
                f"mmstack demo --model {card.real_model}",
                *(f"{TASK_NAMES[k]} {v:.2f}" for k, v in card.scores.items())]
    page = chromium.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(url)
    assert str(mmstack.api.default_model_dir()) not in page.content()  # no server path on the page
    for tab in ("Chat", "Text to image", "Documents"):
        page.get_by_role("tab", name=tab).click()
        banner = page.locator(".model-banner:visible")
        banner.first.wait_for(timeout=10_000)
        text = banner.first.inner_text()
        assert all(e in text for e in expected), (tab, text)

    page.get_by_role("tab", name="Chat").click()
    page.locator(".gallery-item:visible").first.click()  # the caption example fills the box
    page.wait_for_function("() => document.querySelector('#chat-input textarea').value.length > 0", timeout=10_000)
    page.locator("#chat-input textarea").press("Enter")
    page.wait_for_function("() => document.querySelector('#chatbot [data-testid=bot]')?.innerText.trim()",
                           timeout=30_000)
    page.wait_for_function(_SETTLED, timeout=30_000)
    assert page.locator("#chatbot [data-testid=bot]").first.inner_text().strip() == _caption_truth("scene-caption.png")
    page.screenshot(path=str(ARTIFACTS / "demo-embedded-chat.png"), animations="disabled")

    page.get_by_role("tab", name="Documents").click()
    page.locator(".gallery-item:visible").first.click()  # the chart example
    page.get_by_role("button", name="Chart to table").click()
    page.wait_for_function("() => document.querySelector('#doc-answer textarea').value.length > 0", timeout=30_000)
    page.wait_for_function(_SETTLED, timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "demo-embedded-documents.png"), animations="disabled")
    page.locator(".gallery-item:visible").nth(1).click()  # a new document: the last results go
    page.wait_for_function("() => document.querySelector('#doc-answer textarea').value === ''", timeout=10_000)

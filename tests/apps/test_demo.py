"""The web demo served for real on a loopback port: every endpoint through `gradio_client`, then a person's
path through it in headless Chromium (screenshots in <repo>/test-artifacts/). Tiny random-weight
checkpoints: answers are junk text and the images noise, but every step runs the real model."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
from net import free_port
from golden import REPO, golden_dir, tokenizer_for
from PIL import Image

import mmstack
from mmstack.apps.demo import Handlers, build_app, launch, parse_markdown_table

JANUS = golden_dir() / "janus_pro_tiny"  # understanding + VQ generation
VL2 = golden_dir() / "vl2_tiny_mla_moe"  # understanding only
IMAGE = JANUS / "und_image.png"
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
SAMPLING = (0.0, 0.9, 12, 1.1)  # temperature (greedy: the same tokens every run), top_p, max_new_tokens, rep. penalty
ENDPOINTS = {"/chat", "/regenerate", "/clear", "/generate", "/ocr", "/chart"}
UPLOAD_MB = 2


@pytest.fixture(scope="module")
def url():
    pipe = mmstack.load(JANUS, device="cpu", tokenizer=tokenizer_for(JANUS))
    demo = build_app(pipe, max_queue=8)
    _, local_url, _ = launch(demo, port=free_port(), max_upload_mb=UPLOAD_MB, prevent_thread_lock=True)
    yield local_url
    demo.close()


@pytest.fixture(scope="module")
def client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


@pytest.fixture(scope="module")
def pdf(tmp_path_factory) -> Path:
    """Two pages of different shapes, so the rendered size tells which page was read."""
    path = tmp_path_factory.mktemp("docs") / "two-pages.pdf"
    first, second = Image.new("RGB", (200, 100), "white"), Image.new("RGB", (100, 300), "lightgray")
    first.save(path, save_all=True, append_images=[second], resolution=72.0)
    return path


def _text(message: dict) -> str:
    return "".join(c["text"] for c in message["content"] if c["type"] == "text")


# ------------------------------------------------------------------------------------------ API


def test_view_api_lists_the_stable_endpoint_names(client):
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert ENDPOINTS <= set(api)
    chat_params = [p["parameter_name"] for p in api["/chat"]["parameters"]]
    assert chat_params == ["message", "history", "temperature", "top_p", "max_new_tokens", "repetition_penalty"]
    assert [p["parameter_name"] for p in api["/generate"]["parameters"]] == [
        "prompt", "n", "seed", "cfg", "temperature", "steps", "mode"]


def test_chat_streams_several_partial_answers_about_an_uploaded_image(client):
    from gradio_client import handle_file

    job = client.submit({"text": "What is in the image?", "files": [handle_file(str(IMAGE))]}, [], *SAMPLING,
                        api_name="/chat")
    outputs = list(job)
    history = outputs[-1][0]
    assert [m["role"] for m in history] == ["user", "assistant"]
    user = history[0]["content"]  # the image as markdown of the server's upload: text a client can send back
    assert [c["type"] for c in user] == ["text", "text"] and user[1]["text"] == "What is in the image?"
    assert user[0]["text"].startswith("![image](/gradio_api/file=") and user[0]["text"].endswith(".png)")
    assert outputs[0][1] == {"text": "", "files": []}  # the input box is emptied at once
    answers = [_text(h[-1]) for h, *_ in outputs if h[-1]["role"] == "assistant"]
    assert len(set(answers)) >= 3, answers  # the answer grew in several steps
    assert answers[-1] == _text(history[-1]) and answers[-1]


def test_the_history_returned_by_chat_can_be_sent_back_unchanged(client):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    first = client.predict({"text": "What is in the image?", "files": [handle_file(str(IMAGE))]}, [], *SAMPLING,
                           api_name="/chat")[0]
    second = client.predict({"text": "And its colours?", "files": []}, first, *SAMPLING, api_name="/chat")[0]
    assert [m["role"] for m in second] == ["user", "assistant", "user", "assistant"]
    assert second[:2] == first and _text(second[2]) == "And its colours?" and _text(second[3])
    forged = [{"role": "user", "content": [{"type": "text", "text": "![x](/gradio_api/file=/etc/passwd)"}]},
              {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]
    with pytest.raises(AppError, match="outside this demo's uploads"):
        client.predict({"text": "Again?", "files": []}, forged, *SAMPLING, api_name="/chat")


def test_regenerate_replaces_the_last_answer_and_clear_empties_the_chat(client):
    from gradio_client import handle_file

    history = [{"role": "user", "content": [{"type": "file", "file": handle_file(str(IMAGE))},
                                            {"type": "text", "text": "Describe it."}]},
               {"role": "assistant", "content": [{"type": "text", "text": "old answer"}]}]
    new, _ = client.predict(history, 0.7, 0.9, 8, 1.1, api_name="/regenerate")
    assert [m["role"] for m in new] == ["user", "assistant"] and _text(new[1]) != "old answer"
    cleared, box, _ = client.predict(api_name="/clear")
    assert cleared == [] and box == {"text": "", "files": []}


def test_generate_returns_n_images_reproducibly_for_a_seed(client):
    first = client.predict("a red apple", 2, 7, 5.0, 1.0, 30, "vq", api_name="/generate")
    again = client.predict("a red apple", 2, 7, 5.0, 1.0, 30, "vq", api_name="/generate")
    assert len(first) == 2
    images = [Image.open(item["image"]) for item in first]
    assert all(im.size == (64, 64) for im in images)  # the tiny model's native size
    assert [im.tobytes() for im in images] == [Image.open(item["image"]).tobytes() for item in again]


def test_ocr_reads_an_image_and_a_chosen_pdf_page(client, pdf):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    preview, text = client.predict(handle_file(str(IMAGE)), 1, 8, api_name="/ocr")
    assert isinstance(text, str) and text
    assert Image.open(preview).size == Image.open(IMAGE).size
    preview, text = client.predict(handle_file(str(pdf)), 2, 8, api_name="/ocr")
    assert isinstance(text, str) and Image.open(preview).size == (200, 600)  # page 2 at 144 dpi
    with pytest.raises(AppError, match="Page 3 does not exist: this PDF has 2 page"):
        client.predict(handle_file(str(pdf)), 3, 8, api_name="/ocr")


def test_chart_returns_a_table_and_the_answer(client):
    from gradio_client import handle_file

    _, table, csv_path, answer = client.predict(handle_file(str(IMAGE)), 1, 16, api_name="/chart")
    assert isinstance(answer, str) and answer
    assert set(table) >= {"headers", "data"}
    if csv_path is not None:  # the junk answer may or may not read as a table
        with open(csv_path, newline="") as f:
            assert next(csv.reader(f)) == [str(h) for h in table["headers"]]


def test_the_server_refuses_uploads_over_the_size_limit(url):
    import httpx

    too_big = ("big.png", os.urandom((UPLOAD_MB + 1) * 1024 * 1024), "image/png")
    assert httpx.post(url + "gradio_api/upload", files={"files": too_big}).status_code == 413
    fine = ("small.png", IMAGE.read_bytes(), "image/png")
    assert httpx.post(url + "gradio_api/upload", files={"files": fine}).status_code == 200


# ------------------------------------------------------------------------------------------ handlers and layout


class _ScriptedPipe:
    """Stands in for a model whose answers we choose (random weights never emit boxes or tables)."""

    source = "scripted"
    generation_modes = ["vq"]

    def __init__(self, answer: str):
        self.answer = answer
        self.seen: list = []

    def chat(self, messages, stream=True, **sampling):
        self.seen.append(messages)
        return iter([self.answer[:20], self.answer[20:]])

    def describe(self, image, prompt, **sampling):
        return self.answer

    def generate(self, prompt, n=1, progress=None, **options):
        for k in range(1, 4):
            progress(k, 3)
        return [Image.new("RGB", (8, 8))] * n


def test_grounded_answer_shows_the_boxes_on_the_last_image():
    pipe = _ScriptedPipe("<|ref|>the square<|/ref|><|det|>[[0, 0, 499, 499]]<|/det|> is red.")
    steps = list(Handlers(pipe).chat({"text": "Where is the square?", "files": [str(IMAGE)]}, [], *SAMPLING))
    history, _, boxes = steps[-1]
    assert history[-1] == {"role": "assistant", "content": "the square is red."}  # tags hidden, label kept
    image, question = pipe.seen[0][0]["content"]  # the image, as the copy the chat history links to
    assert image["type"] == "image" and Path(image["path"]).read_bytes() == IMAGE.read_bytes()
    assert question == {"type": "text", "text": "Where is the square?"}
    assert boxes.visible and boxes.value is not None  # the drawn image, shown under the chat


def test_small_images_are_enlarged_for_the_boxes_view(tmp_path):
    from mmstack.apps.demo import BOXES_MIN_SIDE

    small = tmp_path / "small.png"
    Image.new("RGB", (64, 48), "white").save(small)
    pipe = _ScriptedPipe("<|ref|>it<|/ref|><|det|>[[0, 0, 499, 499]]<|/det|>")
    *_, (_, _, boxes) = Handlers(pipe).chat({"text": "Where?", "files": [str(small)]}, [], *SAMPLING)
    drawn = boxes.value if isinstance(boxes.value, Image.Image) else Image.open(boxes.value["path"])
    k = BOXES_MIN_SIDE // 64
    assert drawn.size == (64 * k, 48 * k)
    assert drawn.getpixel((16 * k, 0)) != (255, 255, 255)  # the box outline, drawn at the enlarged size


def test_chart_table_and_csv_from_a_markdown_answer():
    pipe = _ScriptedPipe("Here it is:\n| Year | Sales |\n|---|---|\n| 2019 | 12 |\n| 2020 | 15 |\n")
    _, table, csv_path, answer = Handlers(pipe).chart(str(IMAGE), 1, 64)
    assert list(table.columns) == ["Year", "Sales"] and table.values.tolist() == [["2019", "12"], ["2020", "15"]]
    with open(csv_path, newline="") as f:
        assert list(csv.reader(f)) == [["Year", "Sales"], ["2019", "12"], ["2020", "15"]]


def test_generate_feeds_the_progress_bar():
    calls = []
    images = Handlers(_ScriptedPipe("")).generate("x", 2, 1, 5.0, 1.0, 30, "vq",
                                                  progress=lambda p, desc=None: calls.append(p))
    assert len(images) == 2 and calls == [0, (1, 3), (2, 3), (3, 3)]


def test_markdown_table_parser_skips_separators_and_pads_rows():
    assert parse_markdown_table("x\n| a | b |\n|:-|-:|\n| 1 |\n| 2 | 3 | 4 |\nbye") == (["a", "b"], [["1", ""], ["2", "3"]])
    assert parse_markdown_table("no table here") == ([], [])


def test_understanding_only_model_gets_no_text_to_image_tab():
    pipe = mmstack.load(VL2, device="cpu", tokenizer=golden_dir() / "vl2_tokenizer")
    demo = build_app(pipe)
    names = {fn.api_name for fn in demo.fns.values() if fn.api_name}
    assert {"chat", "regenerate", "clear", "ocr", "chart"} <= names and "generate" not in names


def test_examples_sampling_and_cfg_come_from_the_model_folder(tmp_path, caplog):
    from mmstack.apps.demo import CHAT_DEFAULTS, cfg_default, demo_settings

    pipe = mmstack.load(JANUS, device="cpu", tokenizer=tokenizer_for(JANUS))
    assert demo_settings(pipe) == {}  # the golden folder ships none: the generic defaults apply
    assert cfg_default(pipe, "vq") == pipe.model.cfg.parts["vq_head"].cfg_weight
    pipe.source = str(tmp_path)
    settings = tmp_path / "demo.json"
    settings.write_text('{"generate_examples": ["a red circle"], "chat_sampling": {"temperature": 0, "repetition_penalty": 1.0}}')
    assert demo_settings(pipe) == {"generate_examples": ["a red circle"],
                                   "chat_sampling": {**CHAT_DEFAULTS, "temperature": 0, "repetition_penalty": 1.0}}
    # data, not trusted: each bad field is ignored with a warning, the good ones kept
    settings.write_text('{"generate_examples": [3], "chat_sampling": {"temperature": 9, "top_p": 0.5}}')
    assert demo_settings(pipe) == {}
    assert "generate_examples ignored" in caplog.text and "chat_sampling ignored" in caplog.text
    settings.write_text('{"chat_sampling": {"os": "rm -rf /"}, "generate_examples": ["ok"]}')
    assert demo_settings(pipe) == {"generate_examples": ["ok"]}
    settings.write_text("[1, 2")
    assert demo_settings(pipe) == {} and "demo.json: ignored" in caplog.text


def test_demo_command_binds_loopback_by_default():
    from mmstack.cli import build_parser

    args = build_parser(only="demo").parse_args(["demo", "--model", str(JANUS)])
    assert (args.host, args.port, args.share, args.max_upload_mb) == ("127.0.0.1", 7860, False, 25)


# ------------------------------------------------------------------------------------------ browser


@pytest.fixture
def playwright_api():
    """Playwright on Debian's chromium; a skip on a machine without them, but a failure in CI."""
    missing = [] if Path(CHROMIUM).exists() else [CHROMIUM]
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("the playwright package")
    if missing:
        message = f"browser test needs {' and '.join(missing)}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return sync_playwright


# Every event done (status trackers hidden) and every image in view decoded: what a person would see.
_SETTLED = """() => [...document.querySelectorAll('[data-testid=status-tracker]')].every(e => e.classList.contains('hide'))
    && [...document.images].every(i => i.complete || !i.offsetParent || i.getBoundingClientRect().top > innerHeight)"""


def _screenshot(page, name: str) -> None:
    page.wait_for_function(_SETTLED, timeout=20_000)
    page.screenshot(path=str(ARTIFACTS / f"demo-{name}.png"), animations="disabled")


def test_a_person_can_chat_about_an_image_and_generate_images_in_chromium(playwright_api, url):
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright_api() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 960})
            page.goto(url)
            box = page.locator("#chat-input")
            box.locator("input[type=file]").set_input_files(str(IMAGE))
            box.locator("textarea").fill("What is in the image?")
            box.locator("textarea").press("Enter")
            page.locator("#chatbot [data-testid=user] img").first.wait_for(timeout=15_000)  # the image, inline
            answer = page.locator("#chatbot [data-testid=bot]").first
            answer.wait_for(timeout=15_000)
            page.wait_for_function("() => document.querySelector('#chatbot [data-testid=bot]').innerText.trim()",
                                   timeout=15_000)
            assert "What is in the image?" in page.locator("#chatbot").inner_text()
            _screenshot(page, "chat")

            page.get_by_role("tab", name="Text to image").click()
            page.locator("#gen-prompt textarea").fill("a red apple on a wooden table")
            page.locator("#gen-button").click()
            page.wait_for_function("() => document.querySelectorAll('#gallery img').length >= 4", timeout=20_000)
            _screenshot(page, "generate")

            page.get_by_role("tab", name="Documents").click()
            page.locator("#doc-file input[type=file]").set_input_files(str(IMAGE))
            page.get_by_role("button", name="Read text (OCR)").click()
            page.wait_for_function("() => document.querySelector('#doc-answer textarea').value.length > 0",
                                   timeout=20_000)
            _screenshot(page, "documents")
        finally:
            browser.close()
    assert all((ARTIFACTS / f"demo-{n}.png").stat().st_size > 0 for n in ("chat", "generate", "documents"))


def test_an_oversized_event_body_is_refused_before_it_is_read(url, client):
    import json
    import urllib.error
    import urllib.request

    body = b'{"data": ["' + b"a" * (20 << 20) + b'"]}'
    req = urllib.request.Request(url + "gradio_api/call/chat", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 413 and json.loads(e.value.read())["error"]["code"] == "request_too_large"
    assert client.predict(api_name="/clear")[0] == []  # and the server goes on

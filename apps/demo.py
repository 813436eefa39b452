"""The web demo: chat about images, text to image, and documents (OCR, chart to table).

    mmstack demo --model DIR                 # http://127.0.0.1:7860
    python -m mmstack.apps.demo --model DIR

`build_app(pipe)` returns the `gr.Blocks`. Every event is an API endpoint with a stable name for
`gradio_client`: /chat, /regenerate, /clear, /generate, /ocr, /chart. The app calls only the public
Pipeline API (`chat`, `describe`, `generate`) and the grounding helpers; no model code lives here.

This module builds the layout, launches and holds the `mmstack demo` command; the event functions are in
`demo_handlers`, table parsing and PDF pages in `demo_tables`.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from typing import Optional

from mmstack.api import CapabilityError, Pipeline

from .demo_gradio import gr
from .demo_handlers import BOXES_MIN_SIDE, CHART_PROMPT, OCR_PROMPT, Handlers, to_model_messages
from .demo_tables import chart_table, parse_markdown_table, pdf_page
from .arg_types import at_least, port, positive_float
from .model_args import add_model_arguments, load_kwargs
from .model_settings import CFG_DEFAULTS, CHAT_DEFAULTS, CHAT_LIMITS, SETTINGS_FILE, cfg_default, demo_settings

log = logging.getLogger(__name__)

__all__ = ["build_app", "launch", "demo_settings", "cfg_default", "add_arguments", "main",
           "CHAT_DEFAULTS", "CHAT_LIMITS", "CFG_DEFAULTS", "GENERATE_EXAMPLES", "SETTINGS_FILE", "SEED_DEFAULT",
           "MODEL_QUEUE", "MAX_BATCH",
           # in demo_handlers / demo_tables, importable from here as before the split
           "Handlers", "to_model_messages", "OCR_PROMPT", "CHART_PROMPT", "BOXES_MIN_SIDE", "parse_markdown_table",
           "chart_table", "pdf_page"]

GENERATE_EXAMPLES = ["A red apple on a wooden table", "The face of a beautiful girl", "A city skyline at night"]
SEED_DEFAULT = 12345
# One model serves every tab: all model events share one pool of slots, and the requests of concurrent users
# run batched on the pipeline's engine (`build_app(max_batch=...)` sets the pool's size).
MODEL_QUEUE = dict(concurrency_id="model")
MAX_BATCH = 8


# ---------------------------------------------------------------------------------------------- layout


def _understands(pipe: Pipeline) -> bool:
    return "understanding" in pipe.capabilities


def _max_new_tokens(h: Handlers, default: int) -> gr.Slider:
    """Up to the model's context; the default leaves room for the prompt and images of small models."""
    context = h.pipe.cfg.language.max_position_embeddings
    return gr.Slider(1, context, value=min(default, context // 4), step=1, label="Max new tokens")


def _banner(text: Optional[str]) -> None:
    """What the model is, on top of every tab, when its folder says (`model_card.banner`)."""
    if text:
        gr.Markdown(text, elem_classes=["model-banner"])


def _model_name(pipe: Pipeline) -> str:
    """The model's name or its folder's, never a server path."""
    from pathlib import Path

    return pipe.cfg.name or (Path(str(pipe.source)).name if pipe.source else "model")


def _chat_tab(h: Handlers, examples: list) -> None:
    chatbot = gr.Chatbot(label="Chat", height=440, elem_id="chatbot")
    box = gr.MultimodalTextbox(file_types=["image"], file_count="multiple", show_label=False, elem_id="chat-input",
                               placeholder="Ask about one or more images (drop them here), then press Enter")
    if examples:  # in the model's domain, from its folder: a click fills the box, Enter asks
        gr.Examples([[{"text": text, "files": [image]}] for text, image in examples], inputs=box,
                    label="Examples (click one, then press Enter)")
    with gr.Row():
        stop = gr.Button("Stop", variant="stop")
        regen = gr.Button("Regenerate")
        clear = gr.Button("Clear")
    boxes = gr.Image(label="Boxes in the last image", visible=False, interactive=False, format="png",
                     elem_id="chat-boxes")
    d = demo_settings(h.pipe).get("chat_sampling", CHAT_DEFAULTS)
    with gr.Accordion("Sampling", open=False):
        sampling = [
            gr.Slider(*CHAT_LIMITS["temperature"], value=d["temperature"], step=0.05, label="Temperature (0 = greedy)"),
            gr.Slider(*CHAT_LIMITS["top_p"], value=d["top_p"], step=0.05, label="Top-p"),
            _max_new_tokens(h, d["max_new_tokens"]),
            gr.Slider(*CHAT_LIMITS["repetition_penalty"], value=d["repetition_penalty"], step=0.05, label="Repetition penalty"),
        ]
    asked = box.submit(h.chat, [box, chatbot, *sampling], [chatbot, box, boxes], api_name="chat", **MODEL_QUEUE)
    again = regen.click(h.regenerate, [chatbot, *sampling], [chatbot, boxes], api_name="regenerate", **MODEL_QUEUE)
    stop.click(None, cancels=[asked, again])
    clear.click(h.clear, None, [chatbot, box, boxes], api_name="clear", cancels=[asked, again], queue=False)


def _generate_tab(h: Handlers, modes: list[str]) -> None:
    with gr.Row():
        with gr.Column(scale=1):
            prompt = gr.Textbox(label="Prompt", lines=3, elem_id="gen-prompt",
                                placeholder="A watercolour fox in a snowy forest")
            mode = gr.Radio(modes, value=modes[0], label="Mode", visible=len(modes) > 1)
            n = gr.Slider(1, 8, value=4, step=1, label="Number of images")
            seed = gr.Number(value=SEED_DEFAULT, precision=0, label="Seed (-1 = random)")
            cfg = gr.Slider(1.0, 10.0, value=cfg_default(h.pipe, modes[0]), step=0.5, label="CFG weight")
            temperature = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Temperature", visible="vq" in modes)
            steps = gr.Slider(1, 50, value=30, step=1, label="Steps", visible="flow" in modes)
            button = gr.Button("Generate", variant="primary", elem_id="gen-button")
        with gr.Column(scale=2):
            gallery = gr.Gallery(label="Images", columns=2, rows=2, format="png", interactive=False,
                                 buttons=["download", "download_all", "fullscreen"], elem_id="gallery")
    gr.Examples([[x] for x in demo_settings(h.pipe).get("generate_examples", GENERATE_EXAMPLES)], inputs=prompt)
    gr.on([button.click, prompt.submit], h.generate, [prompt, n, seed, cfg, temperature, steps, mode], gallery,
          api_name="generate", **MODEL_QUEUE)


def _documents_tab(h: Handlers, examples: list) -> None:
    with gr.Row():
        with gr.Column():
            file = gr.File(label="Image or PDF", file_types=["image", ".pdf"], type="filepath", elem_id="doc-file")
            if examples:
                gr.Examples([[path] for path in examples], inputs=file, label="Examples (click one, then a button)")
            page = gr.Number(value=1, precision=0, minimum=1, label="PDF page")
            max_new = _max_new_tokens(h, 1024)
            with gr.Row():
                ocr = gr.Button("Read text (OCR)", variant="primary")
                chart = gr.Button("Chart to table")
            preview = gr.Image(label="Page", interactive=False, format="png")
        with gr.Column():
            answer = gr.Textbox(label="Answer", lines=12, buttons=["copy"], elem_id="doc-answer")
            table = gr.Dataframe(label="Table", interactive=False)
            csv_file = gr.File(label="Table as CSV")
    file.change(h.new_document, file, [preview, answer, table, csv_file], api_name="new_document", queue=False)
    ocr.click(h.ocr, [file, page, max_new], [preview, answer], api_name="ocr", **MODEL_QUEUE)
    chart.click(h.chart, [file, page, max_new], [preview, table, csv_file, answer], api_name="chart", **MODEL_QUEUE)


def build_app(pipe: Pipeline, max_queue: int = 20, title: str = "mmstack demo", max_batch: int = MAX_BATCH) -> gr.Blocks:
    """The demo for `pipe`: a Chat and a Documents tab for understanding models, Text to image for generators.
    Up to `max_batch` events run at once (their model calls batch in the engine); `max_queue` more wait.

    Raises:
        CapabilityError: the model can neither read images nor generate them.
    """
    understands = _understands(pipe)
    modes = list(getattr(pipe, "generation_modes", None) or [])
    if not understands and not modes:
        raise CapabilityError(f"{pipe.source or 'this model'} neither reads nor generates images: nothing to demo")
    h = Handlers(pipe)
    settings = demo_settings(pipe)
    about = _about(pipe)
    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"## {title}\n`{_model_name(pipe)}`")
        if understands:
            with gr.Tab("Chat"):
                _banner(about)
                _chat_tab(h, settings.get("chat_examples", []))
        if modes:
            with gr.Tab("Text to image"):
                _banner(about)
                _generate_tab(h, modes)
        if understands:
            with gr.Tab("Documents"):
                _banner(about)
                _documents_tab(h, settings.get("document_examples", []))
    demo.queue(max_size=max_queue, default_concurrency_limit=max_batch)
    return demo


def _about(pipe: Pipeline) -> Optional[str]:
    """The banner of a model whose folder says what it was trained on (`model_card`), else None."""
    from pathlib import Path

    from .model_card import banner, read_card

    if not pipe.source or not Path(pipe.source).is_dir():
        return None
    try:
        return banner(read_card(pipe.source, pipe.cfg))
    except (OSError, ValueError) as e:  # the card is information only: a bad side file hides it
        log.warning("no model banner: %s", e)
        return None


MAX_JSON_BODY_MB = 2  # event payloads are text (chat histories link to uploads): anything larger is refused


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: Optional[int] = 7860, share: bool = False,
           max_upload_mb: float = 25, prevent_thread_lock: bool = False, max_body_mb: float = MAX_JSON_BODY_MB):
    """`demo.launch` on `host:port` with uploads capped at `max_upload_mb` and every other request body at
    `max_body_mb`, both refused (413) before the body is read. Returns launch's (app, url, share_url)."""
    from starlette.middleware import Middleware

    from .http_limits import BodyLimit

    if not _is_loopback(host):
        log.warning("serving on %s: anyone who can reach this address can use the model", host)
    limits = Middleware(BodyLimit, limit=int(max_body_mb * 2**20), upload_limit=int((max_upload_mb + 1) * 2**20))
    return demo.launch(server_name=host, server_port=port, share=share, max_file_size=f"{max_upload_mb}mb",
                       prevent_thread_lock=prevent_thread_lock, show_error=True, quiet=prevent_thread_lock,
                       app_kwargs={"middleware": [limits]})


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


# ---------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `mmstack demo` flags."""
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=port(1), default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--max-queue", type=at_least(0), default=20, help="requests that may wait in the queue")
    parser.add_argument("--max-batch", type=at_least(1), default=MAX_BATCH,
                        help=f"requests served at once, batched by the engine (default {MAX_BATCH})")
    parser.add_argument("--max-upload-mb", type=positive_float, default=25, help="largest accepted upload")


def main(args: argparse.Namespace) -> int:
    """Load the model and serve the demo until interrupted."""
    import mmstack
    from mmstack.api import default_model_dir

    if args.model is None:
        try:
            args.model = default_model_dir()
        except FileNotFoundError:
            raise FileNotFoundError("no --model given, and this installation has no embedded demo model: "
                                    "pass --model DIR") from None
    pipe = mmstack.load(args.model, **load_kwargs(args))
    demo = build_app(pipe, max_queue=args.max_queue, max_batch=args.max_batch)
    launch(demo, host=args.host, port=args.port, share=args.share, max_upload_mb=args.max_upload_mb)
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m mmstack.apps.demo", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main(_parser.parse_args()))

"""The demo's event functions (`Handlers`), bound to one pipeline and kept apart from the layout so that tests
call them directly; and the conversion of gr.Chatbot messages to the pipeline's chat messages.

The handlers call only the public Pipeline API (`chat`, `describe`, `generate`) and the grounding helpers;
a failure is shown in the UI as one line.
"""
from __future__ import annotations

import contextlib
import csv
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Optional
from urllib.parse import quote, unquote

from PIL import Image

from mmstack.api import Pipeline
from mmstack.errors import CapabilityError, EngineBusy
from mmstack.vision.grounding import draw_boxes, grounding_prompt, parse_boxes, strip_grounding
from mmstack.vision.image_io import NATIVE, load_image

from .demo_gradio import gr
from .demo_tables import chart_table, pdf_page, unique_headers

log = logging.getLogger(__name__)

OCR_PROMPT = "Read the text in the image."
CHART_PROMPT = "Convert the chart to a table."
BOXES_MIN_SIDE = 320  # the boxes view enlarges smaller images by a whole factor


# Mistakes a user can make (an unreadable image, a prompt too long, a model that cannot do that) and a full
# queue: shown as their message, logged as one line. Anything else is a bug: its traceback goes to the log.
USER_ERRORS = (ValueError, CapabilityError, EngineBusy, FileNotFoundError)
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][^\s'\"\\/]+)+[\\/]([^\s'\"\\/]+)")


def public_message(e: BaseException) -> str:
    """An error's message with every absolute path cut to its file name: the page never shows server paths."""
    return _PATH.sub(lambda m: m.group(1), str(e)).strip() or type(e).__name__


@contextlib.contextmanager
def _user_errors():
    """Show failures in the UI as one line without server paths: a user's mistake is logged as one line, an
    unexpected error with its traceback."""
    try:
        yield
    except gr.Error:
        raise
    except USER_ERRORS as e:
        log.warning("demo request refused: %s: %s", type(e).__name__, public_message(e))
        raise gr.Error(public_message(e)) from None
    except Exception as e:  # the UI boundary: a bug, logged in full
        log.exception("demo request failed")
        raise gr.Error(f"{type(e).__name__} (details in the server log)") from None


# A user's image is shown in the chat history as a markdown image of the server's copy (the upload folder), so
# that the history is text a client can send back unchanged; the model reads the copy, after checking that the
# link names a file inside gradio's upload folder and nowhere else.
_IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(/gradio_api/file=([^)\s]+)\)")


def image_link(path: str) -> str:
    """The markdown a chat history shows an uploaded image with."""
    return f"![image](/gradio_api/file={quote(str(path))})"


def _uploaded(path: str) -> str:
    """`path` if it names a regular file inside gradio's upload folder (ValueError otherwise)."""
    root = Path(gr.utils.get_upload_folder()).resolve()
    target = Path(os.path.realpath(unquote(path)))
    if root not in target.parents or not target.is_file():
        raise ValueError("the chat history names an image outside this demo's uploads")
    return str(target)


def keep_upload(path: str) -> str:
    """The path of `path` inside gradio's upload folder, copying it there when it is elsewhere (a caller of the
    handlers in Python): every image a history links to lives in the folder the links are checked against."""
    import hashlib
    import shutil

    root = Path(gr.utils.get_upload_folder()).resolve()
    src = Path(os.path.realpath(path))
    if root in src.parents:
        return str(src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:32]
    dst = root / f"mmstack-{digest}" / src.name
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return str(dst)


def _text_parts(text: str) -> list[dict]:
    """Text with markdown image links of uploads -> image parts and text parts, in order."""
    out, pos = [], 0
    for m in _IMAGE_LINK.finditer(text):
        if text[pos:m.start()].strip():
            out.append({"type": "text", "text": text[pos:m.start()]})
        out.append({"type": "image", "path": _uploaded(m.group(1))})
        pos = m.end()
    if text[pos:].strip():
        out.append({"type": "text", "text": text[pos:]})
    return out


def to_model_messages(history: list) -> list[dict]:
    """gr.Chatbot messages (text, markdown images of uploads, file parts) -> transformers-style messages for
    `pipe.chat`."""
    out = []
    for m in history:
        parts = m["content"] if isinstance(m["content"], list) else [m["content"]]
        content = []
        for p in parts:
            if isinstance(p, str):
                content.extend(_text_parts(p) if m["role"] == "user" else [{"type": "text", "text": p}])
            elif p.get("type") == "text":
                content.extend(_text_parts(p["text"]) if m["role"] == "user" else [{"type": "text", "text": p["text"]}])
            elif "file" in p or "path" in p:
                f = p.get("file") or p
                content.append({"type": "image", "path": _uploaded(f["path"] if isinstance(f, dict) else f)})
        if m["role"] == "assistant":  # images belong in user turns
            content = "".join(c["text"] for c in content if c["type"] == "text")
        out.append({"role": m["role"], "content": content})
    return out


# A plain request for a box, as a person would type it: "Where is the red circle?", "find the giraffe".
_WHERE = re.compile(r"^\s*(?:where\s+(?:is|are)|where's|find|locate|show\s+me)\s+(.+?)\s*[?.!]*\s*$", re.IGNORECASE)


def grounding_request(text: str) -> Optional[str]:
    """The phrase of a plain request for boxes ("Where is the red circle?" -> "the red circle"), else None."""
    m = _WHERE.match(text or "")
    return m.group(1) if m and "<|" not in text else None


def with_grounding(messages: list[dict]) -> list[dict]:
    """`messages` with each user text that asks where something is turned into the model's grounding query
    (`grounding_prompt`), when the conversation has an image: the model answers it with boxes."""
    if not any(isinstance(m["content"], list) and any(c["type"] == "image" for c in m["content"]) for m in messages):
        return messages
    out = []
    for m in messages:
        if m["role"] == "user" and isinstance(m["content"], list):
            parts = []
            for c in m["content"]:
                phrase = grounding_request(c["text"]) if c["type"] == "text" else None
                parts.append({"type": "text", "text": grounding_prompt(phrase)} if phrase else c)
            m = {**m, "content": parts}
        out.append(m)
    return out


def _last_image(messages: list[dict]) -> Optional[str]:
    paths = [c["path"] for m in messages if isinstance(m["content"], list) for c in m["content"] if c["type"] == "image"]
    return paths[-1] if paths else None


class Handlers:
    """The event functions of the demo, bound to one pipeline (apart from the layout so tests can call them)."""

    def __init__(self, pipe: Pipeline, work_dir: Optional[Path] = None):
        self.pipe = pipe
        self.policy = getattr(pipe, "policy", NATIVE)  # load boxed images as the pipeline loads them
        # In the system temp folder, which gradio serves files from.
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="mmstack-demo-"))

    # ------------------------------------------------------------------ chat
    def chat(self, message: Optional[dict], history: Optional[list], temperature, top_p, max_new_tokens,
             repetition_penalty):
        """Append the user turn (text + images) and stream the answer. Yields (history, textbox, boxes)."""
        message = message or {}
        text = (message.get("text") or "").strip()
        with _user_errors():
            files = [keep_upload(f if isinstance(f, str) else f["path"]) for f in message.get("files") or []]
        if not text and not files:
            raise gr.Error("Type a question or attach an image.")
        # the images as markdown of the uploads: a history any client can send back as it got it
        content: list = [{"type": "text", "text": "\n".join(image_link(p) for p in files)}] if files else []
        if text:
            content.append({"type": "text", "text": text})
        history = list(history or []) + [{"role": "user", "content": content}]
        yield history, None, gr.Image(value=None, visible=False)
        sampling = dict(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                        repetition_penalty=repetition_penalty)
        for hist, boxes in self._answer(history, sampling):
            yield hist, gr.skip(), boxes

    def regenerate(self, history: Optional[list], temperature, top_p, max_new_tokens, repetition_penalty):
        """Drop the last answer and answer the last user turn again. Yields (history, boxes)."""
        history = list(history or [])
        while history and history[-1]["role"] == "assistant":
            history.pop()
        if not history:
            raise gr.Error("Nothing to regenerate: ask something first.")
        yield history, gr.Image(value=None, visible=False)
        sampling = dict(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                        repetition_penalty=repetition_penalty)
        yield from self._answer(history, sampling)

    def clear(self):
        return [], None, gr.Image(value=None, visible=False)

    def _answer(self, history: list, sampling: dict):
        sampling["max_new_tokens"] = int(sampling["max_new_tokens"])
        raw = ""
        with _user_errors():
            messages = to_model_messages(history)
            if "grounding" in getattr(self.pipe, "capabilities", ()):
                messages = with_grounding(messages)
            for delta in self.pipe.chat(messages, stream=True, **sampling):
                raw += delta
                yield history + [{"role": "assistant", "content": strip_grounding(raw)}], gr.skip()
            yield history + [{"role": "assistant", "content": strip_grounding(raw)}], self._boxes_view(raw, messages)

    def _boxes_view(self, answer: str, messages: list[dict]):
        """The last image with the answer's `<|det|>` boxes drawn, or a hidden image when there are none."""
        path = _last_image(messages)
        if "<|det|>" in answer and path is not None:
            image = load_image(path, self.policy)
            # small images are enlarged (whole pixels, nearest) so the boxes and their labels can be read
            k = max(1, BOXES_MIN_SIDE // max(image.size))
            if k > 1:
                image = image.resize((image.width * k, image.height * k), Image.NEAREST)
            # the pipeline's reading of the boxes (a model with a fit size answers in its fitted frame)
            understanding = getattr(self.pipe, "understanding", None)
            boxes = (understanding.boxes(answer, image) if understanding is not None
                     else parse_boxes(answer, image.width, image.height))
            if boxes:
                return gr.Image(value=draw_boxes(image, boxes), visible=True)
        return gr.Image(value=None, visible=False)

    # ------------------------------------------------------------------ text to image
    def generate(self, prompt: str, n, seed, cfg, temperature, steps, mode: Optional[str] = None,
                 progress=gr.Progress()):
        """`pipe.generate` with the controls of the chosen mode; returns the images for the gallery."""
        modes = self.pipe.generation_modes
        mode = mode if mode in modes else modes[0]
        options = dict(temperature=float(temperature)) if mode == "vq" else dict(steps=int(steps))
        if len(modes) > 1:
            options["mode"] = mode
        seed = None if seed is None or seed < 0 else int(seed)
        progress(0, desc="Generating")
        with _user_errors():
            return self.pipe.generate(prompt, n=int(n), seed=seed, cfg=float(cfg),
                                      progress=lambda done, total: progress((done, total), desc="Generating"),
                                      **options)

    # ------------------------------------------------------------------ documents
    def new_document(self, path: Optional[str] = None):
        """A new file replaces the last one's results: (page, answer, table, CSV) all emptied."""
        import pandas as pd

        return None, "", pd.DataFrame(), None

    def _document(self, path: Optional[str], page):
        if not path:
            raise gr.Error("Upload an image or a PDF first.")
        with open(path, "rb") as f:
            is_pdf = f.read(5) == b"%PDF-"
        with _user_errors():
            return pdf_page(path, int(page or 1)) if is_pdf else load_image(path, self.policy)

    def ocr(self, path: Optional[str], page, max_new_tokens):
        """(page image, text read from it)."""
        image = self._document(path, page)
        with _user_errors():
            text = self.pipe.describe(image, OCR_PROMPT, max_new_tokens=int(max_new_tokens), temperature=0.0)
        return image, text

    def chart(self, path: Optional[str], page, max_new_tokens):
        """(page image, table, CSV file, the model's answer)."""
        import pandas as pd

        image = self._document(path, page)
        with _user_errors():
            answer = self.pipe.describe(image, CHART_PROMPT, max_new_tokens=int(max_new_tokens), temperature=0.0)
        header, rows = chart_table(answer)
        if not header:
            gr.Warning("No table found in the answer; see the model's answer below.")
            return image, pd.DataFrame(), None, answer
        with tempfile.NamedTemporaryFile("w", suffix=".csv", prefix="table-", dir=self.work_dir, delete=False,
                                         newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([header, *rows])
        return image, pd.DataFrame(rows, columns=unique_headers(header)), f.name, answer

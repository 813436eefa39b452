"""Hostile inputs shared by the reliability tests (hypothesis, in CI) and the standalone fuzzer
(`tests/fuzz/fuzz_inputs.py`): seed files, mutations, and one `Target` per input surface with the
exceptions its module documents. Anything else escaping a target is a bug; so is a case that runs past
the per-case deadline or allocates past the pixel and token limits.

No pytest here: the standalone fuzzer imports this module too.
"""
from __future__ import annotations

import atexit
import copy
import functools
import io
import json
import shutil
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from hypothesis import strategies as st
from PIL import Image

from golden import golden_dir, tokenizer_for

MAX_PIXELS = 1 << 22  # the fuzzed intake runs with a strict limit: a case may never decode more than this
MAX_TOKENS = 4096  # prompt limit handed to the Janus processor (expanded image spans included)

# ------------------------------------------------------------------------------------------ image files

IMAGE_KINDS = [("PNG", "RGBA"), ("PNG", "P"), ("PNG", "LA"), ("PNG", "I;16"), ("PNG", "1"), ("JPEG", "RGB"),
               ("JPEG", "CMYK"), ("JPEG", "L"), ("GIF", "P"), ("WEBP", "RGBA"), ("WEBP", "RGB"), ("TIFF", "RGB"),
               ("TIFF", "F"), ("TIFF", "I;16"), ("TIFF", "CMYK"), ("BMP", "RGB"), ("BMP", "P")]
PIL_MODES = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "F",
             "I;16", "I;16L", "I;16B", "I;16N"]


def _encode(im: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **options)
    return buf.getvalue()


@functools.lru_cache(maxsize=None)
def image_seeds() -> tuple[bytes, ...]:
    """Small valid files: every format the intake meets, in several modes (the fuzzer mutates these)."""
    rgba = np.random.default_rng(0).integers(0, 256, (9, 7, 4), dtype=np.uint8)
    out = []
    for fmt, mode in IMAGE_KINDS:
        if mode == "I;16":
            im = Image.fromarray(rgba[..., 0].astype(np.uint16) * 257)
        elif mode == "F":
            im = Image.fromarray(rgba[..., 0].astype(np.float32) / 255)
        else:
            im = Image.fromarray(rgba, "RGBA").convert(mode)
        out.append(_encode(im, fmt))
    im = Image.fromarray(rgba[..., :3])
    out.append(_encode(im, "WEBP", lossless=True))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 (NATIVE transposes; a mutated EXIF block is a classic crash)
    out.append(_encode(im, "JPEG", exif=exif.tobytes()))
    frames = [Image.new("P", (5, 4), k) for k in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])  # animated
    out.append(buf.getvalue())
    return tuple(out)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_headers(width: int = 65_535, height: int = 65_535) -> dict[str, bytes]:
    """Tiny files whose headers declare `width` x `height` pixels, one per format (valid checksums, so
    the size, not a broken chunk, is what the intake meets first)."""
    png = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + _png_chunk(b"IDAT", zlib.compress(b"\0" * 16)) + _png_chunk(b"IEND", b""))
    small = Image.new("RGB", (3, 2), (200, 10, 10))
    bmp = bytearray(_encode(small, "BMP"))
    bmp[18:26] = struct.pack("<ii", width, height)
    gif = bytearray(_encode(small.convert("P"), "GIF"))
    gif[6:10] = struct.pack("<HH", min(width, 65_535), min(height, 65_535))
    k = gif.index(b"\x2c", 13)  # image descriptor: separator, left, top, width, height
    gif[k + 5:k + 9] = struct.pack("<HH", min(width, 65_535), min(height, 65_535))
    jpeg = bytearray(_encode(small, "JPEG"))
    k = jpeg.index(b"\xff\xc0")  # SOF0: marker, length, precision, height, width
    jpeg[k + 5:k + 9] = struct.pack(">HH", min(height, 65_535), min(width, 65_535))
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8 + 2 + 12 * 8 + 4),
            (278, 4, height), (279, 4, 16)]
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(tags))
    tiff += b"".join(struct.pack("<HHII", tag, kind, 1, value) for tag, kind, value in tags) + b"\0" * 4 + b"\0" * 16
    webp = bytearray(_encode(small, "WEBP", lossless=True))  # lossless VP8L: 14-bit sizes after the 0x2f signature byte
    k = webp.index(b"VP8L") + 9
    flags = struct.unpack("<I", webp[k:k + 4])[0] & ~((1 << 28) - 1)
    webp[k:k + 4] = struct.pack("<I", (min(width, 1 << 14) - 1) | (min(height, 1 << 14) - 1) << 14 | flags)
    return {"png": png, "bmp": bytes(bmp), "gif": bytes(gif), "jpeg": bytes(jpeg), "tiff": tiff, "webp": bytes(webp)}


MUTATIONS = ("flip", "truncate", "insert", "delete", "overwrite32", "duplicate")
mutation = st.tuples(st.sampled_from(MUTATIONS), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=8))


def mutate(data: bytes, ops) -> bytes:
    """Apply (op, position, bytes) edits; positions wrap around the current length."""
    b = bytearray(data)
    for op, pos, chunk in ops:
        if not b:
            break
        p = pos % len(b)
        if op == "flip":
            b[p] ^= chunk[0] or 0xFF
        elif op == "truncate":
            del b[p:]
        elif op == "insert":
            b[p:p] = chunk
        elif op == "delete":
            del b[p:p + len(chunk)]
        elif op == "overwrite32":  # sizes, lengths and offsets are 32-bit fields in most headers
            b[p:p + 4] = int.from_bytes(chunk[:4].ljust(4, b"\xff"), "big").to_bytes(4, "big")
        else:
            b[p:p] = b[p:p + len(chunk) * 8]
    return bytes(b)


image_bytes = st.one_of(
    st.tuples(st.sampled_from(image_seeds()), st.lists(mutation, max_size=4)).map(lambda t: mutate(*t)),
    st.builds(lambda w, h, fmt: huge_headers(w, h)[fmt], st.integers(1, 1 << 16), st.integers(1, 1 << 16),
              st.sampled_from(sorted(huge_headers()))),
    st.binary(max_size=256),
)

# ------------------------------------------------------------------------------------------ text and JSON

SPECIAL = ["<image>", "<image_placeholder>", "<begin_of_image>", "<end_of_image>", "<|User|>", "<|Assistant|>",
           "<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>", "<｜▁pad▁｜>", "<|ref|>", "<|/ref|>", "<|det|>",
           "<|/det|>", "<|grounding|>", "[[1, 2, 3, 4]]", "User:", "Assistant:", "\n\n", "|", "\t", "\x00", "\ud800",
           "\u202e", "<0x0A>", "1,234", "$5", "-", "```"]
hostile_text = st.lists(st.one_of(st.text(max_size=24), st.sampled_from(SPECIAL)), max_size=12).map("".join)

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.floats(), hostile_text)


def json_values(keys=st.text(max_size=8), max_leaves: int = 16):
    return st.recursive(json_leaf, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(keys, c, max_size=4)),
                        max_leaves=max_leaves)


ROLES = ["user", "assistant", "system", "<|User|>", "<|Assistant|>", "deepseekapi-sys", "gpt", "human", ""]
message = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(ROLES), hostile_text), "content": hostile_text})
messages = st.lists(st.one_of(message, message, json_values(max_leaves=4)), max_size=5)
DEEP = ["[" * 50_000, "{\"a\":" * 50_000, "[" * 500 + "]" * 500]

# ------------------------------------------------------------------------------------------ targets


@dataclass(frozen=True)
class Target:
    """One input surface: `run(example)` calls it and swallows only the exceptions its module documents
    (`allowed` names them, for reports); anything else escaping is a finding."""

    name: str
    strategy: Any
    run: Callable[[Any], None]
    allowed: tuple  # the exceptions the module documents for bad input
    ci_examples: int  # hypothesis examples per CI run


def _check_image(case) -> None:
    from mmstack.vision.image_io import NATIVE, OFFICIAL, ImageError, load_image

    data, official = case
    try:
        im = load_image(data, OFFICIAL if official else NATIVE, max_pixels=MAX_PIXELS)
    except ImageError:
        return
    assert im.mode == "RGB" and 0 < im.width * im.height <= MAX_PIXELS


def _check_mode(case) -> None:
    from mmstack.vision.image_io import NATIVE, OFFICIAL, ImageError, load_image

    mode, w, h, colour, official = case
    src = Image.new(mode, (w, h), colour % 2 if mode == "1" else colour % 256)
    try:
        im = load_image(src, OFFICIAL if official else NATIVE)
    except ImageError:
        assert w * h == 0, "only an empty image may be refused"
        return
    assert im.mode == "RGB" and im.size == (w, h) and im is not src


def _check_chat(case) -> None:
    from mmstack.chat import CHAT_FORMATS, ChatConfig

    msgs, system, fmt = case
    try:
        chat = ChatConfig().with_format(sorted(CHAT_FORMATS)[fmt % len(CHAT_FORMATS)])
        out = chat.prompt(msgs, system)
    except ValueError:
        well_formed = all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                          for m in msgs) and isinstance(system, (str, type(None)))
        assert not well_formed, "well-formed messages must give a prompt"
        return
    assert isinstance(out, str)


@functools.lru_cache(maxsize=None)
def vl2_processor():
    from mmstack.vision.vl2_processor import VL2Processor

    return VL2Processor.from_pretrained(golden_dir() / "vl2_tiny_mla_moe", golden_dir() / "vl2_tokenizer")


@functools.lru_cache(maxsize=None)
def janus_processor():
    from mmstack.formats import read_config
    from mmstack.tokenizer import Tokenizer
    from mmstack.vision.janus_processor import JanusProcessor

    model = golden_dir() / "janus_pro_tiny"
    cfg = read_config(model)
    ip = cfg.parts["image_processing"]
    return JanusProcessor(Tokenizer.from_dir(tokenizer_for(model)), cfg.parts["chat"], ip.image_size, ip.image_mean,
                          ip.image_std, ip.min_size)


def _check_vl2(case) -> None:
    conversation, sizes, inference = case
    try:
        out = vl2_processor().tokenize(conversation, sizes, inference)
    except ValueError:
        return
    assert len(out.input_ids) == len(out.images_seq_mask) == len(out.assistant_mask)
    assert sum(out.images_seq_mask) == sum(out.num_image_tokens) and len(out.num_image_tokens) == len(sizes)


def _check_janus(case) -> None:
    msgs, system = case
    try:
        ids = janus_processor().tokens(msgs, system, max_prompt_tokens=MAX_TOKENS)
    except ValueError:  # malformed messages (ChatConfig.prompt), or GenerationError: over MAX_TOKENS
        return
    assert len(ids) <= MAX_TOKENS


def _check_boxes(case) -> None:
    from mmstack.vision.grounding import parse_boxes

    text, w, h = case
    try:
        boxes = parse_boxes(text, w, h)
    except ValueError:
        assert w <= 0 or h <= 0, "parse_boxes raised on a valid image size"
        return
    assert all(0 <= b.x1 <= b.x2 <= w and 0 <= b.y1 <= b.y2 <= h for b in boxes)


def _check_table(case) -> None:
    from mmstack.apps.chart import Table, parse_table

    table = parse_table(case)  # documented: never raises
    assert isinstance(table, Table) and all(len(r) == len(table.columns) for r in table.rows)
    json.dumps(table.to_json(), allow_nan=False)
    table.to_csv()


_TMP: list = []


def scratch() -> Path:
    """A private temporary folder for the targets that read files (removed at exit)."""
    if not _TMP:
        _TMP.append(Path(tempfile.mkdtemp(prefix="mmstack-fuzz-")))
        atexit.register(shutil.rmtree, _TMP[0], True)
        Image.new("RGB", (4, 4)).save(_TMP[0] / "a.png")
        (_TMP[0] / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return _TMP[0]


data_keys = st.one_of(st.sampled_from(["id", "image", "images", "messages", "conversations", "prompt", "role",
                                       "content", "from", "value", "task"]), st.text(max_size=4))
data_leaf = st.one_of(json_leaf, st.sampled_from(["a.png", "bad.png", "../a.png", "/etc/passwd", "a" * 5000, "x\x00y",
                                                  "<image>\nWhat?", "user", "assistant", "gpt", "human"]))
data_records = st.lists(st.recursive(data_leaf, lambda c: st.one_of(st.lists(c, max_size=3),
                                                                     st.dictionaries(data_keys, c, max_size=5)),
                                     max_leaves=14), max_size=4)


def _check_data(case) -> None:
    from mmstack.apps.data import DataError, load_examples

    records, jsonl, junk, skip = case
    path = scratch() / ("data.jsonl" if jsonl else "data.json")
    if jsonl:
        path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in records) + junk)
    else:
        path.write_bytes(json.dumps(records).encode() + junk)
    try:
        good, bad = load_examples(path, skip_bad=skip)
    except DataError:
        return
    assert all(isinstance(m["content"], str) for ex in good for m in ex.messages)


@functools.lru_cache(maxsize=None)
def real_configs() -> tuple:
    return tuple(json.loads(p.read_text()) for p in sorted(golden_dir().glob("*/config.json")))


def _paths(node, prefix=()):
    yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield from _paths(v, prefix + (k,))


@st.composite
def mutated_config(draw):
    """A real config.json with 1-3 fields replaced by random JSON or deleted."""
    cfg = copy.deepcopy(draw(st.sampled_from(real_configs())))
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(cfg) if p]
        if not paths:
            break
        *parent, key = draw(st.sampled_from(paths))
        node = cfg
        for k in parent:
            node = node[k]
        if draw(st.booleans()):
            del node[key]
        else:
            node[key] = draw(json_values())
    return cfg


deep = st.sampled_from([d.encode() for d in DEEP])
config_case = st.one_of(
    st.tuples(st.just("dict"), mutated_config()),
    st.tuples(st.just("dict"), st.dictionaries(st.text(max_size=8), json_values(), max_size=6)),
    st.tuples(st.just("file"), st.one_of(deep, st.binary(max_size=64),
                                         st.one_of(mutated_config(), json_values()).map(lambda c: json.dumps(c).encode()),
                                         )),
)


def _check_config(case) -> None:
    from mmstack.config import ConfigError
    from mmstack.formats import read_config

    kind, value = case
    try:
        if kind == "dict":
            read_config(value)
        else:
            folder = scratch() / "model"
            folder.mkdir(exist_ok=True)
            (folder / "config.json").write_bytes(value)
            read_config(folder)
    except ConfigError:
        return


@functools.lru_cache(maxsize=None)
def _checkpoint() -> tuple[dict, bytes]:
    raw = (golden_dir() / "vl2_tiny_mla_moe" / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


@st.composite
def safetensors_case(draw):
    """The real tiny VL2 checkpoint with one header entry replaced, damaged, or the length field lying."""
    header, body = _checkpoint()
    header = copy.deepcopy(header)
    key = draw(st.sampled_from(sorted(header)))
    field = draw(st.sampled_from([None, "dtype", "shape", "data_offsets"]))
    value = draw(st.one_of(json_values(max_leaves=6), st.lists(st.integers(-(1 << 65), 1 << 65), max_size=3)))
    if field is None or not isinstance(header[key], dict):
        header[key] = value
    else:
        header[key][field] = value
    text = json.dumps(header).encode()
    length = draw(st.one_of(st.just(len(text)), st.integers(0, (1 << 64) - 1)))
    cut = draw(st.one_of(st.just(len(body)), st.integers(0, len(body))))
    return struct.pack("<Q", length) + text + body[:cut]


def _check_safetensors(case) -> None:
    from mmstack.io.checkpoint import CheckpointError, check_safetensors

    path = scratch() / "model.safetensors"
    path.write_bytes(case)
    try:
        check_safetensors(path)
    except CheckpointError:
        return


# ------------------------------------------------------------------------------------------ server requests

@functools.lru_cache(maxsize=None)
def _server():
    """The real `mmstack serve` ASGI app on the embedded demo model, driven in-process (httpx's ASGI transport)."""
    import argparse

    from mmstack.apps.serve import add_arguments, build, load_pipeline

    parser = argparse.ArgumentParser()
    add_arguments(parser)  # the real flags, so new ones get their defaults
    args = parser.parse_args(["--served-model-name", "m", "--port", "0", "--device", "cpu", "--max-batch", "4",
                              "--max-waiting", "8", "--max-body-mb", "1.0"])
    asgi, state = build(args)
    state.pipe = load_pipeline(args)
    return asgi


request_leaf = st.one_of(json_leaf, st.sampled_from(["data:image/png;base64,iVBORw0KGgo=", "data:,x", "/etc/passwd",
                                                     "file:///etc/passwd", "http://127.0.0.1:1/x.png", "ftp://x",
                                                     "a" * 3000]))
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool", 3]),
     "content": st.one_of(hostile_text, st.lists(st.one_of(
         st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "image", "audio"]), "text": hostile_text}),
         st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.one_of(
             request_leaf, st.fixed_dictionaries({"url": request_leaf}))}),
         json_values(max_leaves=4)), max_size=3))})
chat_body = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(message, max_size=3), json_values(max_leaves=4))},
    optional={"max_tokens": st.one_of(st.integers(-5, 1 << 40), json_leaf), "n": st.integers(-2, 20),
              "temperature": st.one_of(st.floats(allow_nan=True), json_leaf), "stop": json_values(max_leaves=4),
              "stream": st.booleans(), "seed": st.integers(-5, 1 << 70), "top_p": st.floats(allow_nan=True)})
image_body = st.fixed_dictionaries({"prompt": st.one_of(hostile_text, json_leaf)},
                                   optional={"n": st.integers(-2, 40), "size": st.one_of(hostile_text, json_leaf),
                                             "response_format": st.sampled_from(["b64_json", "url", 7]),
                                             "steps": st.integers(-3, 5000)})


def _check_request(case) -> None:
    import httpx

    route, body, raw = case
    payload = raw if raw is not None else json.dumps(body).encode()

    async def go():
        transport = httpx.ASGITransport(app=_server())
        async with httpx.AsyncClient(transport=transport, base_url="http://m") as c:
            return await c.post(route, content=payload, headers={"content-type": "application/json"}, timeout=60)

    import asyncio

    r = asyncio.run(go())
    assert r.status_code in (200, 400, 413, 429), (r.status_code, r.text[:300])
    if r.status_code != 200:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["type"], err


request_case = st.one_of(
    st.tuples(st.just("/v1/chat/completions"), chat_body, st.none()),
    st.tuples(st.just("/v1/images/generations"), image_body, st.none()),
    st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/images/generations"]), st.none(),
              st.one_of(st.binary(max_size=64), deep)),
)


# ------------------------------------------------------------------------------------------ native configs

@functools.lru_cache(maxsize=None)
def _native_config() -> dict:
    from mmstack.api import default_model_dir

    return json.loads((default_model_dir() / "config.json").read_text())


@st.composite
def native_config(draw):
    """The embedded model's native config.json with 1-3 fields set to absurd sizes, wrong types or junk."""
    cfg = copy.deepcopy(_native_config())
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(cfg) if p]
        *parent, key = draw(st.sampled_from(paths))
        node = cfg
        for k in parent:
            node = node[k]
        node[key] = draw(st.one_of(st.sampled_from([0, -1, 10**6, 10**12, 256.0, True, None, "8", [], {}, float("nan"),
                                                    1e308, [[65536, 65536]]]), json_values(max_leaves=4)))
    return cfg


def _check_native_config(cfg) -> None:
    from mmstack.config import ConfigError
    from mmstack.formats import read_config
    from mmstack.model import build_model

    try:
        parsed = read_config(cfg)
    except ConfigError:
        return
    build_model(parsed, "meta")  # whatever validates must also build (bounded sizes: on the meta device, quickly)


TARGETS = [
    Target("load_image", st.tuples(image_bytes, st.booleans()), _check_image, ("ImageError",), 300),
    Target("load_image_modes", st.tuples(st.sampled_from(PIL_MODES), st.integers(0, 9), st.integers(0, 9),
                                         st.integers(0, 1 << 16), st.booleans()), _check_mode, ("ImageError",), 150),
    Target("chat_prompt", st.tuples(messages, st.one_of(st.none(), hostile_text, json_leaf), st.integers(0, 9)),
           _check_chat, ("ValueError",), 300),
    Target("vl2_tokenize", st.tuples(st.one_of(hostile_text, messages),
                                     st.lists(st.one_of(st.tuples(st.integers(1, 1 << 20), st.integers(1, 1 << 20)),
                                                        st.tuples(st.integers(-5, 5), st.integers(-5, 5)),
                                                        json_leaf), max_size=3),
                                     st.booleans()), _check_vl2, ("ValueError",), 300),
    Target("janus_tokens", st.tuples(messages, st.one_of(st.none(), hostile_text)), _check_janus,
           ("ValueError", "GenerationError"), 300),
    Target("parse_boxes", st.tuples(st.one_of(hostile_text, st.text()), st.integers(-3, 1 << 31),
                                    st.integers(-3, 1 << 31)), _check_boxes, ("ValueError (size <= 0)",), 300),
    Target("parse_table", st.one_of(hostile_text, st.text(), json_values(), st.sampled_from(DEEP)), _check_table,
           ("none: never raises",), 300),
    Target("load_examples", st.tuples(data_records, st.booleans(),
                                      st.one_of(st.just(b""), st.binary(max_size=16), deep), st.booleans()),
           _check_data, ("DataError",), 200),
    Target("read_config", config_case, _check_config, ("ConfigError",), 300),
    Target("safetensors_header", safetensors_case(), _check_safetensors, ("CheckpointError",), 150),
    Target("server_request", request_case, _check_request, ("HTTP 400 / 413 / 429 in the OpenAI error shape",), 150),
    Target("native_config", native_config(), _check_native_config, ("ConfigError",), 200),
]

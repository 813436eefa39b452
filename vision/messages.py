"""Chat messages as users write them (the transformers / OpenAI shapes) -> template messages with one image
tag per image, and the image sources in order.

    {"role": "user"|"assistant"|"system", "content": str | [parts]}
    parts: {"type": "text", "text": ...}
           {"type": "image", "image"|"path"|"url"|"base64": ...}        (transformers 5)
           {"type": "image_url", "image_url": {"url": ...} | "..."}     (OpenAI)
    an image source: a path, bytes, a PIL image, an array, a `data:image/...;base64,` URI, a `file://` URI, or an
    `http(s)://` URL when the caller allows remote media.

Only the text is templated; user text is never parsed for special tokens (see `mmstack.tokenizer`).
"""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Sequence

ROLES = ("user", "assistant", "system")


@dataclass(frozen=True)
class RemoteImage:
    """An `http(s)://` image the caller must fetch (only where remote media is allowed)."""

    url: str


def _decode_base64(data: str, i: int) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"message {i}: an image's base64 data is not valid base64") from None


def image_source(src, i: int, allow_remote: bool = False):
    """Normalise one image source: `data:` URIs and base64 strings become bytes, `file://` a path, remote
    URLs a `RemoteImage` (refused unless `allow_remote`). Other values pass through to the image loader."""
    if not isinstance(src, str):
        return src
    if src.startswith("data:"):
        head, sep, data = src.partition(",")
        if not sep or ";base64" not in head:
            raise ValueError(f"message {i}: a data: URI must be base64 encoded (data:image/png;base64,...)")
        if not head[5:].startswith("image/"):
            raise ValueError(f"message {i}: a data: URI must hold an image, got {head[5:40]!r}")
        return _decode_base64(data, i)
    if src.startswith(("http://", "https://")):
        if not allow_remote:
            raise ValueError(f"message {i}: remote images ({src[:60]!r}) are not allowed here; pass the image itself, "
                             "a data: URI, or enable remote media")
        return RemoteImage(src)
    if src.startswith("file://"):
        return src[len("file://"):]
    return src


def _part_image(part: dict, i: int, allow_remote: bool):
    kind = part.get("type")
    if kind == "image_url":
        ref = part.get("image_url")
        url = ref.get("url") if isinstance(ref, dict) else ref
        if not isinstance(url, str):
            raise ValueError(f"message {i}: an image_url part needs {{\"image_url\": {{\"url\": ...}}}}")
        return image_source(url, i, allow_remote)
    if "base64" in part:
        if not isinstance(part["base64"], str):
            raise ValueError(f"message {i}: an image part's 'base64' must be a string")
        data = part["base64"]
        return _decode_base64(data.partition(",")[2] if data.startswith("data:") else data, i)
    for key in ("image", "path", "url"):
        if key in part:
            return image_source(part[key], i, allow_remote)
    raise ValueError(f"message {i}: image part without 'image', 'path', 'url' or 'base64'")


def split_messages(messages: Sequence[dict], image_tag: str, max_images: int,
                   allow_remote: bool = False, protect=None) -> tuple[list[dict], list]:
    """Messages -> (text messages with `image_tag` + newline per image, image sources in order).

    `protect` (the tokenizer's) marks special-token strings inside the messages' own text, so that only the
    tags inserted here (and the chat template's) become special tokens.

    Raises:
        ValueError: a malformed message or part (named by index), an image outside a user turn, or more
            than `max_images` images (counted before any is opened).
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    out, images = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r:.80}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ValueError(f"message {i}: role must be user, assistant or system, got {role!r:.40}")
        protect_text = protect or (lambda t: t)
        if isinstance(content, str):
            text = protect_text(content)
        elif isinstance(content, (list, tuple)):
            text = ""
            for part in content:
                if not isinstance(part, dict):
                    raise ValueError(f"message {i}: a content part must be a dict, got {part!r:.80}")
                kind = part.get("type")
                if kind == "text":
                    if not isinstance(part.get("text", ""), str):
                        raise ValueError(f"message {i}: a text part's 'text' must be a str")
                    text += protect_text(part.get("text", ""))
                elif kind in ("image", "image_url"):
                    if role != "user":
                        raise ValueError(f"message {i}: images belong in user turns")
                    images.append(_part_image(part, i, allow_remote))
                    text += image_tag + "\n"
                else:
                    raise ValueError(f"message {i}: unknown content part type {kind!r:.40} "
                                     "(known: text, image, image_url)")
        else:
            raise ValueError(f"message {i}: content must be a str or a list of parts, got {type(content).__name__}")
        out.append({"role": role, "content": text})
    if len(images) > max_images:
        raise ValueError(f"{len(images)} images in one request; the limit is {max_images}")
    return out, images


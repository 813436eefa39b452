"""Where a client's images may come from, for `mmstack serve` (a security boundary, as in vLLM):

- `data:image/...;base64,...` URIs: always (decoded here; the image loader's byte and pixel limits apply);
- `http(s)://` URLs: only with `--allow-remote-media`, fetched with a timeout and a size cap;
- local files (`file://` or a plain path): only inside `--allowed-local-media-path`, after resolving symlinks.

Everything else is refused with a `MediaError` naming the reason. The result is messages whose image parts
hold bytes or an allowed path, ready for `Pipeline.submit_chat`.
"""
from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


class MediaError(ValueError):
    """A client's image source that this server does not accept."""


@dataclass(frozen=True)
class MediaPolicy:
    allow_remote: bool = False
    local_root: Optional[Path] = None
    max_bytes: int = 16 * 1024 * 1024
    timeout_s: float = 10.0


def _data_uri(url: str) -> bytes:
    head, sep, data = url.partition(",")
    if not sep or ";base64" not in head or not head[5:].startswith("image/"):
        raise MediaError("a data: URI must be data:image/<type>;base64,<data>")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("the data: URI is not valid base64") from None


def _remote(url: str, policy: MediaPolicy) -> bytes:
    if not policy.allow_remote:
        raise MediaError(f"remote images are not allowed on this server ({url[:60]!r}): send a data: URI, or start "
                         "the server with --allow-remote-media")
    import httpx

    try:
        with httpx.stream("GET", url, timeout=policy.timeout_s, follow_redirects=True) as r:
            if r.status_code != 200:
                raise MediaError(f"fetching {url[:60]!r} answered HTTP {r.status_code}")
            declared = r.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                raise MediaError(f"{url[:60]!r} has {declared} bytes; the limit is {policy.max_bytes}")
            out = bytearray()
            for chunk in r.iter_bytes():
                out += chunk
                if len(out) > policy.max_bytes:
                    raise MediaError(f"{url[:60]!r} is larger than the limit of {policy.max_bytes} bytes")
            return bytes(out)
    except httpx.HTTPError as e:
        raise MediaError(f"fetching {url[:60]!r} failed ({type(e).__name__})") from None


def _local(url: str, policy: MediaPolicy) -> str:
    path = url[len("file://"):] if url.startswith("file://") else url
    if policy.local_root is None:
        raise MediaError("local files are not allowed on this server: send a data: URI, or start the server with "
                         "--allowed-local-media-path DIR")
    root = policy.local_root.resolve()
    target = Path(os.path.realpath(root / path if not os.path.isabs(path) else path))
    if root != target and root not in target.parents:
        raise MediaError(f"{path[:80]!r} is outside the allowed media folder")
    if not target.is_file():
        raise MediaError(f"{path[:80]!r}: no such file in the allowed media folder")
    return str(target)


def resolve_source(url: str, policy: MediaPolicy):
    """One `image_url` -> bytes or an allowed local path."""
    if url.startswith("data:"):
        return _data_uri(url)
    if url.startswith(("http://", "https://")):
        return _remote(url, policy)
    if "://" in url and not url.startswith("file://"):
        raise MediaError(f"unsupported image URL scheme in {url[:40]!r} (data:, https:, file:)")
    return _local(url, policy)


def resolve_messages(messages, policy: MediaPolicy) -> list[dict]:
    """Request messages (`serve_schemas.Message`) -> pipeline messages, every image resolved under `policy`."""
    out = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        if m.content is None or isinstance(m.content, str):
            out.append({"role": role, "content": m.content or ""})
            continue
        parts = []
        for p in m.content:
            if p.type == "text":
                parts.append({"type": "text", "text": p.text or ""})
            else:
                url = p.url()
                if not url:
                    raise MediaError("an image part without image_url.url")
                parts.append({"type": "image", "image": resolve_source(url, policy)})
        out.append({"role": role, "content": parts})
    return out

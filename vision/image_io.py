"""Safe image intake: any path, bytes, file, PIL image, array or tensor -> a loaded RGB `PIL.Image`.

Two policies. `OFFICIAL` reproduces the official DeepSeek-VL2 / Janus loaders, which call
`PIL.Image.open(path).convert("RGB")` (deepseek_vl2/utils/io.py `load_pil_images`): alpha is dropped and
EXIF orientation ignored. `NATIVE` composites transparency onto a grey background and applies EXIF
orientation, which is what a photo viewer shows.

`NATIVE` scales high-bit-depth pixels to 8 bits, where `convert("RGB")` (and so `OFFICIAL`) clips them (a
16-bit PNG comes out nearly white through the official loader):
    I;16*          v >> 8 (the high byte)
    I (32-bit)     kept when all values lie in 0..255, else clipped to 0..65535 and v >> 8
    F (float)      v * 255 when all values lie in 0..1, else clipped to 0..255
Array inputs are scaled by dtype instead: uint8 kept, uint16 >> 8, bool * 255, float in [0, 1] * 255,
other integer dtypes accepted when their values lie in 0..255.

The pixel limit is checked on the header, before any pixel data is decoded (for WebP, on the RIFF header
before PIL opens the file: libwebp allocates the canvas as it opens). PIL's own decompression-bomb
guard (`Image.MAX_IMAGE_PIXELS`, which rejects above twice its value) still applies first; it is reported
as an `ImageError` and never changed here.
"""
from __future__ import annotations

import dataclasses
import io
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageOps

ImageSource = Union[str, os.PathLike, bytes, bytearray, BinaryIO, Image.Image, np.ndarray, Any]

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


class ImageError(ValueError):
    """An image could not be loaded; the message names the input and the problem."""


@dataclass(frozen=True)
class ImagePolicy:
    """How `load_image` turns an input into RGB.

    Args:
        composite_alpha: True composites transparency onto `background`; False drops alpha exactly like
            PIL `convert("RGB")` (a transparent pixel keeps its hidden colour).
        exif_transpose: apply the EXIF Orientation tag.
        background: RGB colour under transparent pixels when `composite_alpha`.
        max_pixels: largest accepted width * height, checked before decoding.
        max_bytes: largest accepted size of a file, `bytes` or file-object input.
        max_request_pixels: largest width * height summed over the images of one request (`load_images`),
            checked from every image's header before any is decoded.
        scale_high_bit_depth: scale 16-bit / float files to 8 bits; False converts them as PIL
            `convert("RGB")` does (clipping), as the official loaders.
    """

    composite_alpha: bool
    exif_transpose: bool
    scale_high_bit_depth: bool = True
    background: tuple[int, int, int] = (127, 127, 127)
    max_pixels: int = 64_000_000
    max_bytes: int = 64 * 1024 * 1024
    max_request_pixels: int = 96_000_000

    def __post_init__(self):
        if len(self.background) != 3 or not all(0 <= int(c) <= 255 for c in self.background):
            raise ValueError(f"background must be three values in 0..255, got {self.background!r}")
        if self.max_pixels <= 0 or self.max_bytes <= 0 or self.max_request_pixels <= 0:
            raise ValueError(f"max_pixels, max_bytes and max_request_pixels must be positive, got {self.max_pixels}, "
                             f"{self.max_bytes}, {self.max_request_pixels}")


# The formats the intake decodes. Others are refused before PIL opens them: some decoders allocate the whole
# image while opening (ICO decodes its largest frame in `Image.open`), before any size check could run.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


OFFICIAL = ImagePolicy(composite_alpha=False, exif_transpose=False, scale_high_bit_depth=False)
NATIVE = ImagePolicy(composite_alpha=True, exif_transpose=True)


def load_image(src: ImageSource, policy: ImagePolicy = NATIVE, **overrides) -> Image.Image:
    """Load one image as a fully decoded RGB `PIL.Image`, never aliasing the input.

    Args:
        src: a path (str / Path), bytes / bytearray, a binary file object, a PIL image of any mode, a numpy
            array (H W, H W 1, H W 3, H W 4) or a torch tensor (C H W or H W C). Animated files give their
            first frame; a PIL image gives its current frame.
        policy: `NATIVE` (default) or `OFFICIAL`, or any `ImagePolicy`.
        **overrides: replace policy fields for this call, e.g. `load_image(p, OFFICIAL, exif_transpose=True)`.

    Returns:
        An image of mode "RGB".

    Raises:
        ImageError: missing or unreadable file, unusable path, unsupported input, an empty (0-pixel) image,
            too many bytes or pixels, truncated or undecodable data. The message names the input.
        TypeError: an override that is not an `ImagePolicy` field.
    """
    policy = dataclasses.replace(policy, **overrides) if overrides else policy
    if isinstance(src, Image.Image):
        _check_pixels("<PIL image>", src.size, policy)
        with _decoding("<PIL image>", policy):  # a lazily opened image may still fail to decode
            return _convert(src, policy)
    if isinstance(src, (str, os.PathLike)):
        return _open(str(src), _checked_path(src, policy), policy)
    if isinstance(src, (bytes, bytearray, memoryview)):
        name = f"<bytes {len(src)}>"
        _check_bytes(name, len(src), policy)
        return _open(name, io.BytesIO(bytes(src)), policy)
    if hasattr(src, "read"):
        name = str(getattr(src, "name", f"<{type(src).__name__}>"))
        return _open(name, _seekable(name, src, policy), policy)
    if hasattr(src, "detach") and hasattr(src, "numpy"):  # torch.Tensor, without importing torch
        return _from_array(f"<tensor shape {tuple(src.shape)}>", _tensor_to_hwc(src), policy)
    if isinstance(src, np.ndarray):
        return _from_array(f"<array shape {src.shape}>", src, policy)
    raise ImageError(f"<{type(src).__name__}>: unsupported image input type")


def load_images(srcs: Sequence[ImageSource], policy: ImagePolicy = NATIVE, **overrides) -> list[Image.Image]:
    """`load_image` over a sequence, same policy and overrides for each; raises on the first failure.

    The pixels of all images together are checked against `max_request_pixels` from their headers before any
    is decoded (16 images each within the per-image limits may still be too many for one request).
    """
    policy = dataclasses.replace(policy, **overrides) if overrides else policy
    if len(srcs) > 1:
        total = sum(w * h for w, h in (image_size(s, policy) for s in srcs))
        if total > policy.max_request_pixels:
            raise ImageError(f"the request's {len(srcs)} images have {total} pixels together; the limit is "
                             f"max_request_pixels={policy.max_request_pixels}")
    return [load_image(s, policy) for s in srcs]


def image_size(src: ImageSource, policy: ImagePolicy = NATIVE) -> tuple[int, int]:
    """(width, height) of an input from its header, without decoding pixels. Raises ImageError."""
    if isinstance(src, Image.Image):
        return src.size
    if isinstance(src, np.ndarray):
        return (src.shape[1], src.shape[0]) if src.ndim >= 2 else (0, 0)
    if hasattr(src, "detach") and hasattr(src, "numpy"):
        return _tensor_to_hwc(src).shape[1::-1]
    if isinstance(src, (str, os.PathLike)):
        fp, name = _checked_path(src, policy), str(src)
    elif isinstance(src, (bytes, bytearray, memoryview)):
        name = f"<bytes {len(src)}>"
        _check_bytes(name, len(src), policy)
        fp = io.BytesIO(bytes(src))
    elif hasattr(src, "read"):
        name = str(getattr(src, "name", f"<{type(src).__name__}>"))
        fp = _seekable(name, src, policy)
        start = fp.tell()
    else:
        raise ImageError(f"<{type(src).__name__}>: unsupported image input type")
    size = _webp_size(_peek(name, fp, 30))
    if size is None:
        with _decoding(name, policy), Image.open(fp, formats=FORMATS) as im:
            size = im.size
    if hasattr(src, "read"):
        fp.seek(start)
    return size


def _checked_path(src, policy: ImagePolicy) -> Path:
    """A path to a regular file (a FIFO, device or socket is refused before it is opened) within max_bytes."""
    path = Path(src)
    try:
        exists, is_file = path.exists(), path.is_file()
        size = path.stat().st_size if is_file else 0
    except (OSError, ValueError) as e:  # a name too long for the file system, an embedded NUL byte
        raise ImageError(f"{str(path)[:200]}: not a usable path ({type(e).__name__})") from None
    if not exists:
        raise ImageError(f"{path}: no such file")
    if not is_file:
        raise ImageError(f"{path}: not a regular file")
    _check_bytes(str(path), size, policy)
    return path


def _check_bytes(name: str, n: int, policy: ImagePolicy):
    if n > policy.max_bytes:
        raise ImageError(f"{name}: {n} bytes exceeds the byte limit max_bytes={policy.max_bytes}")


def _check_pixels(name: str, size: tuple[int, int], policy: ImagePolicy):
    w, h = size
    if w <= 0 or h <= 0:  # PIL builds 0-wide images; no model can use one (tiling divides by the size)
        raise ImageError(f"{name}: empty image ({w}x{h})")
    if w * h > policy.max_pixels:
        raise ImageError(f"{name}: {w}x{h} = {w * h} pixels exceeds the pixel limit max_pixels={policy.max_pixels}")


def _seekable(name: str, f, policy: ImagePolicy):
    """Check the remaining size of a file object; read a non-seekable one into memory (PIL needs seek)."""
    if getattr(f, "seekable", lambda: False)():
        start = f.tell()
        _check_bytes(name, f.seek(0, io.SEEK_END) - start, policy)
        f.seek(start)
        return f
    data = f.read(policy.max_bytes + 1)
    _check_bytes(name, len(data), policy)
    return io.BytesIO(data)


def _open(name: str, fp, policy: ImagePolicy) -> Image.Image:
    """Open (header only), check the size, then decode the first frame and convert."""
    size = _webp_size(_peek(name, fp, 30))
    if size is not None:  # libwebp allocates the whole canvas while PIL opens the file: check before that
        _check_pixels(name, size, policy)
    with _decoding(name, policy), Image.open(fp, formats=FORMATS) as im:
        _check_pixels(name, im.size, policy)
        im.load()
        return _convert(im, policy)


def _peek(name: str, fp, n: int) -> bytes:
    """The first `n` bytes of a path or a seekable file object, leaving its position as it was."""
    try:
        if isinstance(fp, Path):
            with open(fp, "rb") as f:
                return f.read(n)
        start = fp.tell()
        head = fp.read(n)
        fp.seek(start)
        return head
    except OSError as e:
        raise ImageError(f"{name}: cannot read file ({e})") from None


def _webp_size(head: bytes) -> Optional[tuple[int, int]]:
    """(width, height) a WebP file declares in its first 30 bytes; None when it is not WebP.

    VP8X canvas: 24-bit sizes minus one; VP8L: 14-bit sizes minus one after the 0x2f signature; VP8 (lossy):
    14-bit sizes after the 9d 01 2a start code (https://developers.google.com/speed/webp/docs/riff_container).
    """
    if len(head) < 30 or head[:4] != b"RIFF" or head[8:12] != b"WEBP":
        return None
    kind = head[12:16]
    if kind == b"VP8X":
        return 1 + int.from_bytes(head[24:27], "little"), 1 + int.from_bytes(head[27:30], "little")
    if kind == b"VP8L" and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + (bits >> 14 & 0x3FFF)
    if kind == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(head[26:28], "little") & 0x3FFF, int.from_bytes(head[28:30], "little") & 0x3FFF
    return None


@contextmanager
def _decoding(name: str, policy: ImagePolicy):
    """Turn every PIL failure inside the block into an `ImageError` naming the input."""
    try:
        with warnings.catch_warnings():
            # Our own limit decides; PIL's warning between its two thresholds would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: exceeds the pixel limit (max_pixels={policy.max_pixels}; PIL: {e})") from e
    except Image.UnidentifiedImageError as e:
        raise ImageError(f"{name}: cannot decode: not a recognised image format (supported: {', '.join(FORMATS)})") from e
    except PermissionError as e:
        raise ImageError(f"{name}: cannot read file ({e})") from e
    except OSError as e:
        kind = "truncated image data" if "truncated" in str(e).lower() else "cannot decode image data"
        raise ImageError(f"{name}: {kind} ({e})") from e
    except Exception as e:  # PIL plugins also raise SyntaxError, ValueError, struct.error, zlib.error, ...
        raise ImageError(f"{name}: cannot decode or convert image ({type(e).__name__}: {e})") from e


def _convert(im: Image.Image, policy: ImagePolicy) -> Image.Image:
    """Any PIL mode -> a new RGB image following `policy`."""
    if policy.exif_transpose:
        im = ImageOps.exif_transpose(im)
    if policy.scale_high_bit_depth:
        im = _to_8bit(im)
    if im.mode == "La":  # premultiplied L + alpha: PIL converts it to LA only (RGBa already converts to anything)
        im = im.convert("LA")
    has_alpha = im.mode in _ALPHA_MODES or "transparency" in im.info
    if policy.composite_alpha and has_alpha:
        background = Image.new("RGBA", im.size, (*policy.background, 255))
        return Image.alpha_composite(background, im.convert("RGBA")).convert("RGB")
    return im.convert("RGB")  # always a copy, even from RGB


def _to_8bit(im: Image.Image) -> Image.Image:
    """Scale I;16*, I and F images to L (see the module docstring); other modes pass through."""
    if not (im.mode.startswith("I") or im.mode == "F") or 0 in im.size:
        return im
    a = np.asarray(im)
    if im.mode.startswith("I;16"):
        a = a.astype(np.uint16) >> 8
    elif im.mode == "I":
        a = a if a.min() >= 0 and a.max() <= 255 else np.clip(a, 0, 65535) >> 8
    else:  # F
        a = np.nan_to_num(a)
        a = np.rint(a * 255) if a.min() >= 0 and a.max() <= 1 else np.rint(np.clip(a, 0, 255))
    return Image.fromarray(a.astype(np.uint8))


def _tensor_to_hwc(t) -> np.ndarray:
    t = t.detach().cpu()
    a = (t.float() if t.is_floating_point() else t).numpy()
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[2] not in (1, 3, 4):
        a = a.transpose(1, 2, 0)  # C H W -> H W C
    return a


def _from_array(name: str, a: np.ndarray, policy: ImagePolicy) -> Image.Image:
    """H W / H W 1 / H W 3 / H W 4 array -> RGB, scaled by dtype (see the module docstring)."""
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))) or a.size == 0:
        raise ImageError(f"{name}: expected an H W, H W 1, H W 3 or H W 4 array")
    _check_pixels(name, (a.shape[1], a.shape[0]), policy)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = a >> 8
    elif np.issubdtype(a.dtype, np.floating):
        a = np.rint(np.clip(np.nan_to_num(a), 0.0, 1.0) * 255)
    elif not np.issubdtype(a.dtype, np.integer):
        raise ImageError(f"{name}: unsupported dtype {a.dtype}")
    elif a.dtype != np.uint8 and (a.min() < 0 or a.max() > 255):
        raise ImageError(f"{name}: {a.dtype} values outside 0..255 (pass uint8, uint16, bool or float in [0, 1])")
    with _decoding(name, policy):
        return _convert(Image.fromarray(np.ascontiguousarray(a, dtype=np.uint8)), policy)

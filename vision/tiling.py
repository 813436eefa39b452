"""DeepSeek-VL2 dynamic tiling: best-resolution choice, global + local tiles, image-token count.

Reproduces `select_best_resolution` and the pixel part of `DeepseekVLV2Processor.tokenize_with_images`
in https://github.com/deepseek-ai/DeepSeek-VL2/blob/ef9f91e2/deepseek_vl2/models/processing_deepseek_vl_v2.py

# S tile side (image_size), tw x th local tiles (width x height), N = 1 + tw*th tiles per image,
# h = w tokens per tile side after the projector's downsampling. (0, 0) is the global view alone (native
# `single_tile_global_only`), N = 1.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps


@dataclass(frozen=True)
class TilingConfig:
    """VL2 processor settings (`processor_config.json`).

    `candidate_resolutions` are `(width, height)` pairs in config order: the official loop reads them as
    `for width, height in candidate_resolutions`. Order matters, since ties keep the earlier candidate.
    `image_size` (the tile side S) defaults to `candidate_resolutions[0][0]` as in the official
    processor, and `pad_color` to `int(mean * 255)` per channel (127 for mean 0.5).
    `fit_size` (W, H), set by native models only (`image_processing.fit_size`): every image is first fitted to
    it (`pad`: aspect-preserving, centred on `pad_color`), so any image gets the tiles of a W x H one; None, as
    in every official processor, tiles each image at its own size.
    `single_tile_global_only`, set by native models only (`image_processing.single_tile_global_only`): an image
    whose tile grid is 1x1 gets grid (0, 0), its global view alone, since its one local tile would be the
    same `pad(img, (S, S))` picture again. False, as in every official processor: global + 1 local.
    """

    candidate_resolutions: tuple[tuple[int, int], ...]
    patch_size: int = 14
    downsample_ratio: int = 2
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    normalize: bool = True
    image_size: Optional[int] = None
    pad_color: Optional[tuple[int, ...]] = field(default=None)
    fit_size: Optional[tuple[int, int]] = None
    single_tile_global_only: bool = False

    def __post_init__(self):
        # frozen dataclass: derived defaults are filled in once, here
        cands = tuple((int(w), int(h)) for w, h in self.candidate_resolutions)
        if not cands:
            raise ValueError("TilingConfig: candidate_resolutions is empty")
        object.__setattr__(self, "candidate_resolutions", cands)
        size = int(self.image_size if self.image_size is not None else cands[0][0])
        object.__setattr__(self, "image_size", size)
        if self.pad_color is None:
            object.__setattr__(self, "pad_color", tuple(int(m * 255) for m in self.image_mean))
        if self.fit_size is not None:
            object.__setattr__(self, "fit_size", (int(self.fit_size[0]), int(self.fit_size[1])))
        # the official crop loop steps by S while the token count floors W // S: both agree only for multiples
        bad = [c for c in cands if c[0] % size or c[1] % size]
        if bad:
            raise ValueError(f"TilingConfig: candidate resolutions {bad} are not multiples of image_size {size}")

    @classmethod
    def from_processor_config(cls, cfg: Mapping) -> "TilingConfig":
        """Read the official processor_config.json dict (unknown keys such as `sft_format` are ignored)."""
        if "candidate_resolutions" not in cfg or "patch_size" not in cfg or "downsample_ratio" not in cfg:
            raise ValueError("processor config needs candidate_resolutions, patch_size and downsample_ratio")
        return cls(
            candidate_resolutions=tuple(tuple(c) for c in cfg["candidate_resolutions"]),
            patch_size=int(cfg["patch_size"]),
            downsample_ratio=int(cfg["downsample_ratio"]),
            image_mean=tuple(cfg.get("image_mean", (0.5, 0.5, 0.5))),
            image_std=tuple(cfg.get("image_std", (0.5, 0.5, 0.5))),
            normalize=bool(cfg.get("normalize", True)),
            image_size=cfg.get("image_size"),
        )

    @classmethod
    def from_json(cls, path: Union[str, Path]) -> "TilingConfig":
        return cls.from_processor_config(json.loads(Path(path).read_text(encoding="utf-8")))

    @property
    def tokens_per_side(self) -> int:
        """h = w: tokens per tile side after the projector (14 for 384 / 14 / 2)."""
        return math.ceil((self.image_size // self.patch_size) / self.downsample_ratio)

    def tiles_for(self, size_wh: tuple[int, int], cropping: bool = True) -> tuple[int, int]:
        """Local tile grid (tw, th) for an image of `size_wh`; `cropping=False` forces 1x1. A 1x1 grid is (0, 0)
        (no local tile) with `single_tile_global_only`."""
        if cropping:
            bw, bh = select_best_resolution(self.fit_size or size_wh, self.candidate_resolutions)
            tw, th = bw // self.image_size, bh // self.image_size
        else:
            tw, th = 1, 1
        if self.single_tile_global_only and (tw, th) == (1, 1):
            return 0, 0
        return tw, th


def select_best_resolution(size_wh: tuple[int, int], candidates: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The candidate (W, H) that keeps the most pixels of a `size_wh` image, then wastes the least.

    Examples:
        >>> cands = [(384, 384), (768, 384), (384, 768), (768, 768)]
        >>> select_best_resolution((640, 480), cands)
        (768, 768)
    """
    w0, h0 = size_wh
    best, best_eff, best_waste = None, 0, float("inf")
    for W, H in candidates:
        s = min(W / w0, H / h0)  # float division then int() truncation, as official
        eff = min(int(w0 * s) * int(h0 * s), w0 * h0)
        waste = W * H - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (W, H), eff, waste
    return best


def num_image_tokens(tw: int, th: int, image_size: int, patch_size: int, downsample_ratio: int) -> int:
    """Image-token span length: global h*(w+1), 1 view separator, (th*h) rows of (tw*w + 1).

    With the real settings (384, 14, 2) this is 211 + 14*th*(14*tw + 1): 421 for 1x1, 2101 for 1x9; a global
    view alone (0, 0) is 211.
    """
    h = w = math.ceil((image_size // patch_size) / downsample_ratio)
    return h * (w + 1) + 1 + (th * h) * (tw * w + 1)


def to_tensor(img: Image.Image, cfg: TilingConfig) -> torch.Tensor:
    """torchvision `ToTensor` then `Normalize(mean, std)`, with the same float32 ops.

    Returns: [3, H, W] float32 (x/255 - mean) / std.
    """
    x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))  # [H, W, 3]
    x = x.permute(2, 0, 1).contiguous().to(torch.float32).div(255)  # [3, H, W]
    if cfg.normalize:
        mean = torch.as_tensor(cfg.image_mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.as_tensor(cfg.image_std, dtype=torch.float32).view(-1, 1, 1)
        x = x.sub_(mean).div_(std)
    return x


def tile_image(img: Image.Image, cfg: TilingConfig, tiles_wh: tuple[int, int]) -> torch.Tensor:
    """Global view then the tw x th local tiles (row-major) of one RGB image.

    Both views are `ImageOps.pad` (aspect-preserving bicubic resize, centred on `pad_color`): the
    global one to (S, S), the local one to (tw*S, th*S), which is then cut into S x S tiles. With
    `cfg.fit_size` the image is first padded to that size, as the native model's training images were.

    Args:
        img: PIL image in mode "RGB".
        tiles_wh: (tw, th) from `TilingConfig.tiles_for`; (0, 0) gives the global view alone.
    Returns:
        [1 + tw*th, 3, S, S] float32.
    Raises:
        ValueError: if `img` is not RGB.
    """
    if img.mode != "RGB":
        raise ValueError(f"tile_image: expected an RGB image, got mode {img.mode!r}; use img.convert('RGB')")
    S, (tw, th) = cfg.image_size, tiles_wh
    if cfg.fit_size is not None and img.size != cfg.fit_size:
        img = pad(img, cfg.fit_size, cfg.pad_color)  # [fit H, fit W]: the size the model was trained at
    glob = to_tensor(pad(img, (S, S), cfg.pad_color), cfg)  # [3, S, S]
    if (tw, th) == (0, 0):
        return glob[None]  # [1, 3, S, S]
    local = to_tensor(pad(img, (tw * S, th * S), cfg.pad_color), cfg)  # [3, th*S, tw*S]
    # elementwise transforms commute with cropping, so crop the tensor: tile k is at row k // tw, col k % tw
    local = local.view(3, th, S, tw, S).permute(1, 3, 0, 2, 4).reshape(th * tw, 3, S, S)
    return torch.cat([glob[None], local], dim=0)


def fitted_region(size_wh: tuple[int, int], frame_wh: tuple[int, int]) -> tuple[int, int, int, int]:
    """(x, y, w, h) that a `size_wh` image covers once `ImageOps.pad` fits it to `frame_wh`: boxes a model gives
    in the frame's coordinates map back to the image through it.

    Examples:
        >>> fitted_region((200, 100), (64, 64))
        (0, 16, 64, 32)
    """
    w, h = size_wh
    W, H = frame_wh
    if w / h > W / H:
        ch = max(1, round(h / w * W))
        return 0, round((H - ch) * 0.5), W, ch
    if w / h < W / H:
        cw = max(1, round(w / h * H))
        return round((W - cw) * 0.5), 0, cw, H
    return 0, 0, W, H


def pad(img: Image.Image, size: tuple[int, int], color) -> Image.Image:
    """`ImageOps.pad` (the official resize + centre), except that an image too thin to keep one pixel across
    after the resize (a 1 x 5000 strip) is first widened to the least width that keeps one: the official
    code fails there; everything else is exactly `ImageOps.pad`.

    Examples:
        >>> pad(Image.new("RGB", (1, 5000)), (384, 384), (127, 127, 127)).size
        (384, 384)
    """
    w, h = img.size
    if w / h > size[0] / size[1]:  # fitted by width: the height shrinks by size[0] / w
        if round(h / w * size[0]) < 1:
            img = img.resize((w, math.ceil(0.5 * w / size[0]) + 1), Image.BICUBIC)
    elif w / h < size[0] / size[1] and round(w / h * size[1]) < 1:
        img = img.resize((math.ceil(0.5 * h / size[1]) + 1, h), Image.BICUBIC)
    return ImageOps.pad(img, size, color=color)

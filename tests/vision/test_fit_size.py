"""A native model's declared input size (`image_processing.fit_size`): every image is fitted to it before tiling,
so photos, scans and larger synthetic images reach the model in the layout its training used; official
processors (no fit_size) tile exactly as before, and the config field is validated."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from mmstack.errors import ConfigError
from mmstack.part_configs import ImageProcessingConfig
from mmstack.vision.tiling import TilingConfig, pad, tile_image

CANDIDATES = ((64, 64), (64, 128), (128, 64), (128, 128))
OFFICIAL = TilingConfig(CANDIDATES, patch_size=8)
FITTED = dataclasses.replace(OFFICIAL, fit_size=(64, 64))


def _stripes(size_wh) -> Image.Image:
    img = Image.new("RGB", size_wh, (240, 240, 240))
    for x in range(0, size_wh[0], 7):
        img.paste((200, 30, 90), (x, 0, x + 3, size_wh[1]))
    return img


@pytest.mark.parametrize("size", [(64, 64), (96, 96), (640, 480), (30, 500), (128, 64)])
def test_every_image_gets_the_tiles_of_the_trained_size(size):
    assert FITTED.tiles_for(size) == (1, 1)
    tiles = tile_image(_stripes(size), FITTED, FITTED.tiles_for(size))
    assert tiles.shape == (2, 3, 64, 64)  # global view + one local tile, as every 64-px training image had


def test_official_tiling_is_unchanged_without_a_fit_size():
    assert OFFICIAL.fit_size is None
    assert OFFICIAL.tiles_for((96, 96)) == (2, 2) and OFFICIAL.tiles_for((128, 64)) == (2, 1)
    assert tile_image(_stripes((96, 96)), OFFICIAL, (2, 2)).shape == (5, 3, 64, 64)


def test_images_of_the_trained_size_are_tiled_bit_for_bit_as_before():
    img = _stripes((64, 64))
    assert torch.equal(tile_image(img, FITTED, (1, 1)), tile_image(img, OFFICIAL, (1, 1)))


def test_other_sizes_are_fitted_aspect_preserving_on_the_background():
    wide = _stripes((200, 100))
    tiles = tile_image(wide, FITTED, (1, 1))
    fitted = pad(wide, (64, 64), FITTED.pad_color)
    assert torch.equal(tiles, tile_image(fitted, OFFICIAL, (1, 1)))
    # 200 x 100 fits as 64 x 32, centred: the rows above and below are the padding colour
    pad_value = (FITTED.pad_color[0] / 255 - 0.5) / 0.5
    assert torch.allclose(tiles[0, :, :15], torch.full_like(tiles[0, :, :15], pad_value))
    assert not torch.allclose(tiles[0, :, 20:44], torch.full_like(tiles[0, :, 20:44], pad_value))


def test_a_processor_counts_the_same_image_tokens_for_any_size():
    from mmstack.api import default_pipeline

    proc = default_pipeline().understanding.processor
    assert proc.cfg.fit_size == (64, 64)  # the embedded model declares the size it was trained at
    conv = [{"role": "<|User|>", "content": "<image>\nWhat is this?"}, {"role": "<|Assistant|>", "content": ""}]
    n = {size: proc.tokenize(conv, [size]).num_image_tokens for size in [(64, 64), (96, 96), (1024, 300)]}
    assert len(set(map(tuple, n.values()))) == 1, n


@pytest.mark.parametrize("bad, message", [
    (dict(fit_size=[64]), "must be \\[width, height\\]"),
    (dict(fit_size=[64, 0]), "fit_size"),
    (dict(kind="square_pad", fit_size=[64, 64]), "applies to vl2_tiling"),
])
def test_a_bad_fit_size_is_refused_by_name(bad, message):
    fields = dict(kind="vl2_tiling", image_size=64, candidate_resolutions=[list(c) for c in CANDIDATES], patch_size=8)
    cfg = ImageProcessingConfig(**{**fields, **bad})
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_boxes_are_read_back_out_of_the_fitted_frame():
    from mmstack.api import default_pipeline
    from mmstack.vision.grounding import parse_boxes

    u = default_pipeline().understanding
    answer = "<|ref|>it<|/ref|><|det|>[[0, 250, 999, 749]]<|/det|>"  # the middle half of the 64 x 64 frame
    wide = Image.new("RGB", (200, 100))  # fitted as 64 x 32 at y = 16: that half is the whole image
    (box,) = u.boxes(answer, wide)
    assert [round(v) for v in (box.x1, box.y1, box.x2, box.y2)] == [0, 0, 200, 100]
    square = Image.new("RGB", (96, 96))  # a square image fills the frame: the plain reading
    (got,), (plain,) = u.boxes(answer, square), parse_boxes(answer, 96, 96)
    assert (got.x1, got.y1, got.x2, got.y2) == pytest.approx((plain.x1, plain.y1, plain.x2, plain.y2))

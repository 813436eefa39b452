"""A native model's `image_processing.single_tile_global_only`: an image whose tile grid is 1x1 is encoded as its
global view alone (grid (0, 0)) instead of the global view plus the identical local tile. Tiles, token counts,
the layout and the embedding agree; the field round-trips through config.json; off (the default, every official
format) the official layout is unchanged.

Sizes: 64-px tiles, 8-px patches, downsample 2 -> h = w = 4 tokens per tile side; one view's rows are
h * (w + 1) = 20 slots, the view separator 1, a tw x th local grid h*th * (w*tw + 1).
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from PIL import Image

import mmstack
import mmstack.assets
from mmstack.api import default_model_dir
from mmstack.apps.recipe import demo_config
from mmstack.errors import ConfigError
from mmstack.loading import build_model, save_pretrained
from mmstack.part_configs import ImageProcessingConfig
from mmstack.testing import randomise_weights
from mmstack.tokenizer import Tokenizer
from mmstack.vision.understanding import Understanding

GLOBAL_ONLY = 4 * 5 + 1  # global rows + separator
TWO_VIEWS = GLOBAL_ONLY + 4 * 5  # + one local tile: the layout the field removes for one-tile images
WIDE = GLOBAL_ONLY + 4 * (8 + 1)  # 128 x 64: global + a 2 x 1 local grid
CANDIDATES = [[64, 64], [64, 128], [128, 64], [128, 128]]


def _recipe(**vision) -> dict:
    recipe = json.loads((mmstack.assets.ROOT / "demo-recipe.json").read_text())
    recipe["model"]["vision"].update(vision)
    return recipe


def _config(single: bool):
    """The demo architecture from the recipe, tiling every image at its own size (no fit_size), so that a
    128 x 64 image gets two local tiles."""
    tok = Tokenizer.from_dir(default_model_dir())
    cfg = demo_config(_recipe(single_tile_global_only=single), tok.vocab_size)
    ip = dataclasses.replace(cfg.parts["image_processing"], fit_size=None)
    return cfg.with_parts(image_processing=ip), tok


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """A saved random-weight native model with the field on, loaded back through `mmstack.load`."""
    cfg, _ = _config(True)
    torch.manual_seed(0)
    model = build_model(cfg, "cpu").eval()
    randomise_weights(model)  # the newline / separator start at zero: give them values the checks can see
    d = tmp_path_factory.mktemp("single_view")
    save_pretrained(model, d, tokenizer_dir=default_model_dir())
    return d, mmstack.load(d, device="cpu")


def _img(w: int, h: int, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def _prepare(u: Understanding, images):
    batch, _ = u.prepare([u.describe_messages(images, "What is this?")])
    return batch


def test_a_one_tile_image_is_its_global_view_alone(native):
    u = native[1].understanding
    batch = _prepare(u, [_img(64, 64)])
    assert batch.image_tiles == [(0, 0)] and batch.pixel_values.shape == (1, 3, 64, 64)
    assert int(batch.images_seq_mask.sum()) == GLOBAL_ONLY == 21


def test_a_wider_image_keeps_its_global_view_and_local_tiles(native):
    batch = _prepare(native[1].understanding, [_img(128, 64)])
    assert batch.image_tiles == [(2, 1)] and batch.pixel_values.shape == (3, 3, 64, 64)
    assert int(batch.images_seq_mask.sum()) == WIDE


def test_without_the_field_a_one_tile_image_keeps_its_duplicate_local_tile():
    cfg, tok = _config(False)
    assert cfg.parts["image_processing"].single_tile_global_only is False
    batch = _prepare(Understanding(cfg, tok), [_img(64, 64)])
    assert batch.image_tiles == [(1, 1)] and int(batch.images_seq_mask.sum()) == TWO_VIEWS == 41
    assert torch.equal(batch.pixel_values[0], batch.pixel_values[1])  # the local tile is the global view again
    single = _prepare(Understanding(*_config(True)), [_img(64, 64)])
    assert torch.equal(single.pixel_values[0], batch.pixel_values[0])  # the kept view is bit-for-bit the same


@pytest.mark.parametrize("sizes, grids", [
    ([(64, 64)], [(0, 0)]),
    ([(64, 64), (128, 64)], [(0, 0), (2, 1)]),
    ([(128, 64)] * 3, [(0, 0)] * 3),  # over 2 images: no cropping, every image one tile
])
def test_count_tokens_matches_the_prepared_training_batch(native, sizes, grids):
    u = native[1].understanding
    images = [_img(w, h, k) for k, (w, h) in enumerate(sizes)]
    messages = [{"role": "user", "content": "<image>" * len(images) + "\nWhat is this?"},
                {"role": "assistant", "content": "A picture."}]
    batch, _ = u.prepare_tagged([messages], [images])
    assert batch.image_tiles == grids
    assert u.count_tokens(messages, images) == batch.input_ids.shape[1]
    slots = sum(GLOBAL_ONLY + 4 * th * (4 * tw + 1) for tw, th in grids)
    assert int(batch.images_seq_mask.sum()) == slots
    assert batch.pixel_values.shape[0] == sum(batch.views_per_image())


def test_the_model_embeds_the_global_view_then_the_separator(native):
    pipe = native[1]
    batch = _prepare(pipe.understanding, [_img(64, 64)])
    with torch.no_grad():
        emb = pipe.model.embed(batch)  # [1, T, D]
        feats = pipe.model.image_features(batch.pixel_values)[0]  # [16, D]
    layout = pipe.model.layout
    rows = torch.cat([feats.view(4, 4, -1), layout.image_newline.expand(4, 1, -1)], 1).reshape(-1, feats.shape[-1])
    want = torch.cat([rows, layout.view_separator[None]])  # [21, D]
    torch.testing.assert_close(emb[batch.images_seq_mask], want, rtol=0, atol=0)


def test_the_pipeline_describes_and_generates_with_single_views(native):
    pipe = native[1]
    text = pipe.describe(_img(64, 64), "What is this?", max_new_tokens=4)
    two = pipe.describe([_img(64, 64), _img(128, 64, 1)], "Compare.", max_new_tokens=4)
    assert isinstance(text, str) and isinstance(two, str)


def test_config_json_round_trips_the_field(native):
    d, pipe = native
    stored = json.loads((d / "config.json").read_text())["image_processing"]
    assert stored["single_tile_global_only"] is True
    assert pipe.cfg.parts["image_processing"].single_tile_global_only is True
    assert pipe.understanding.processor.cfg.single_tile_global_only is True


def test_the_demo_recipe_sets_the_field():
    vocab = Tokenizer.from_dir(default_model_dir()).vocab_size
    assert demo_config(_recipe(single_tile_global_only=True), vocab).parts["image_processing"].single_tile_global_only
    recipe = _recipe()
    recipe["model"]["vision"].pop("single_tile_global_only", None)
    assert not demo_config(recipe, vocab).parts["image_processing"].single_tile_global_only


def test_the_official_tensors_and_formats_refuse_single_views(native):
    from mmstack.export import plan_export
    from mmstack.formats import ExportError

    pipe = native[1]
    conv = [{"role": "<|User|>", "content": "<image>\nWhat?"}, {"role": "<|Assistant|>", "content": ""}]
    with pytest.raises(ValueError, match="single-view"):
        pipe.processor(conv, [_img(64, 64)])  # a (0, 0) crop row is padding in the official tensors
    with pytest.raises(ExportError, match="single_tile_global_only"):
        plan_export(pipe.cfg, "deepseek_vl_v2")  # the official code would lay out two views


@pytest.mark.parametrize("bad, message", [
    (dict(single_tile_global_only=1), "must be true or false"),
    (dict(single_tile_global_only="yes"), "must be true or false"),
    (dict(kind="square_pad", single_tile_global_only=True), "applies to vl2_tiling"),
])
def test_a_bad_single_tile_global_only_is_refused_by_name(bad, message):
    fields = dict(kind="vl2_tiling", image_size=64, candidate_resolutions=CANDIDATES, patch_size=8)
    with pytest.raises(ConfigError, match=message):
        ImageProcessingConfig(**{**fields, **bad}).validate()

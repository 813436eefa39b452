"""DeepSeek-VL2 dynamic tiling and processor against the official goldens (vl2_tiling.json, vl2_processor/,
the tiny VL2 model fixtures), a layout property over all image sizes, and bad-input errors."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file

from golden import golden_dir, model_dirs, tokenizer_for
from mmstack.tokenizer import Tokenizer
from mmstack.vision.tiling import TilingConfig, num_image_tokens, select_best_resolution, tile_image, to_tensor
from mmstack.vision.vl2_processor import VL2Processor

PIXEL_ATOL = 1e-6  # same PIL resize and float32 ops as the official transform; only op-order noise allowed
TILING = golden_dir() / "vl2_tiling.json"
SPEC = json.loads(TILING.read_text()) if TILING.exists() else {"cases": [], "multi_image_cases": []}
TINY = [d for d in model_dirs()
        if json.loads((d / "config.json").read_text()).get("model_type") == "deepseek_vl_v2" and (d / "io.safetensors").exists()]
TILING_CONV = [{"role": "<|User|>", "content": "<image>\nDescribe this image."}, {"role": "<|Assistant|>", "content": ""}]


@pytest.fixture(scope="module")
def real():
    """The processor with the real deepseek-vl2 settings stored in vl2_tiling.json."""
    tok = Tokenizer.from_dir(golden_dir() / "vl2_tokenizer")
    return VL2Processor(tok, TilingConfig.from_processor_config(SPEC["processor_config"]))


def _solid(size_wh):
    return Image.new("RGB", tuple(size_wh), (200, 30, 90))


def test_golden_vl2_tiling_fixtures_present():
    assert TILING.exists(), f"{TILING} missing (set MMSTACK_GOLDEN_DIR)"
    assert SPEC["cases"] and SPEC["multi_image_cases"]
    assert (golden_dir() / "vl2_processor" / "processor_outputs.safetensors").exists()
    assert len(TINY) >= 3, "expected the three tiny DeepSeek-VL2 model fixtures"


@pytest.mark.parametrize("case", SPEC["cases"], ids=[f"golden-{c['image_size_wh'][0]}x{c['image_size_wh'][1]}" for c in SPEC["cases"]])
def test_tiling_matches_official_golden_case(real, case):
    cfg = real.cfg
    tw, th = case["num_tiles_wh"]
    assert list(select_best_resolution(tuple(case["image_size_wh"]), cfg.candidate_resolutions)) == case["best_resolution_wh"]
    out = real(TILING_CONV, [_solid(case["image_size_wh"])])
    ids, mask = out["input_ids"][0].tolist(), out["images_seq_mask"][0]
    assert out["images_spatial_crop"][0].tolist() == [[tw, th]]
    n = case["num_image_tokens"]
    assert out["num_image_tokens"] == [[n]]
    assert num_image_tokens(tw, th, cfg.image_size, cfg.patch_size, cfg.downsample_ratio) == n
    assert len(ids) == case["seq_len"] and int(mask.sum()) == n
    pos = mask.nonzero().flatten()
    first, last = case["first_image_token_index"], case["last_image_token_index"]
    assert (pos[0].item(), pos[-1].item()) == (first, last) and last - first + 1 == n  # one contiguous span
    assert ids[:first] == case["input_ids_prefix"] and ids[last + 1:] == case["input_ids_suffix"]
    assert set(ids[first:last + 1]) == {real.image_token_id}
    assert list(out["images"].shape) == case["pixel_values_shape"]


@pytest.mark.parametrize("case", SPEC["multi_image_cases"], ids=[f"golden-multi-{len(c['image_sizes_wh'])}" for c in SPEC["multi_image_cases"]])
def test_tiling_multi_image_matches_official_golden(real, case):
    k = len(case["image_sizes_wh"])
    # vl2_tiling.json does not record the multi-image prompt; this one has the recorded number of text tokens
    conv = [{"role": "<|User|>", "content": "<image>\n" * k + "Compare the images."}, {"role": "<|Assistant|>", "content": ""}]
    out = real(conv, [_solid(s) for s in case["image_sizes_wh"]])
    assert (k <= 2) == case["cropping"]
    assert out["images_spatial_crop"][0].tolist() == case["images_spatial_crop"]
    assert sum(out["num_image_tokens"][0]) == case["num_image_tokens"] == int(out["images_seq_mask"].sum())
    assert out["input_ids"].shape[1] == case["seq_len"]
    assert list(out["images"].shape) == case["pixel_values_shape"]


def _assert_matches(out, want):
    for key in ("input_ids", "attention_mask", "images_seq_mask", "images_spatial_crop"):
        if key in want:
            assert out[key].long().tolist() == want[key].tolist(), key
    assert out["images"].dtype == torch.float32 and out["images"].shape == want["images"].shape
    diff = (out["images"] - want["images"]).abs().max().item()
    assert diff <= PIXEL_ATOL, f"pixel max abs diff {diff:.3g}"


def test_golden_vl2_processor_two_images_exact():
    d = golden_dir() / "vl2_processor"
    meta = json.loads((d / "meta.json").read_text())
    proc = VL2Processor(Tokenizer.from_dir(golden_dir() / "vl2_tokenizer"),
                        TilingConfig.from_processor_config(meta["processor_config"]))
    images = [Image.open(d / im["file"]).convert("RGB") for im in meta["images"]]
    _assert_matches(proc(meta["conversation"], images), load_file(str(d / "processor_outputs.safetensors")))


@pytest.mark.parametrize("model_dir", TINY, ids=[f"golden-{d.name}" for d in TINY])
def test_golden_vl2_tiny_model_inputs_exact(model_dir):
    meta = json.loads((model_dir / "meta.json").read_text())
    proc = VL2Processor.from_pretrained(model_dir, tokenizer_for(model_dir))
    out = proc(meta["conversation"], [Image.open(model_dir / "image.png").convert("RGB")])
    io = load_file(str(model_dir / "io.safetensors"))
    _assert_matches(out, {k: io[k] for k in ("input_ids", "attention_mask", "images", "images_seq_mask", "images_spatial_crop")})


@settings(max_examples=200, deadline=None)
@given(w=st.integers(1, 8000), h=st.integers(1, 8000))
def test_layout_token_count_matches_closed_form_for_any_image_size(real, w, h):
    t = SPEC["tokens_per_tile_side"]  # 14 with the real settings: 211 + 14*th*(14*tw + 1)
    toks = real.tokenize(TILING_CONV, [(w, h)])  # ids and mask only: no pixels
    (tw, th), = toks.images_spatial_crop
    bw, bh = select_best_resolution((w, h), real.cfg.candidate_resolutions)
    assert (tw, th) == (bw // real.cfg.image_size, bh // real.cfg.image_size)
    want = t * (t + 1) + 1 + t * th * (t * tw + 1)
    assert toks.num_image_tokens == [want] and sum(toks.images_seq_mask) == want
    assert len(toks.input_ids) == len(toks.images_seq_mask)
    assert all(i == real.image_token_id for i, m in zip(toks.input_ids, toks.images_seq_mask) if m)


def test_batch_left_pads_each_sample_like_a_single_call():
    model_dir = TINY[0]
    proc = VL2Processor.from_pretrained(model_dir, tokenizer_for(model_dir))
    img = Image.open(model_dir / "image.png").convert("RGB")
    convs = [[{"role": "user", "content": "<image>\n<image>\nCompare."}, {"role": "assistant", "content": ""}],
             [{"role": "user", "content": "Hello there, no image in this one."}, {"role": "assistant", "content": ""}]]
    imgs = [[img, img.resize((30, 200))], []]
    batch = proc(convs, imgs)
    singles = [proc(c, i) for c, i in zip(convs, imgs)]
    T, N = batch["input_ids"].shape[1], batch["images"].shape[1]
    assert N == max(s["images"].shape[1] for s in singles) and batch["images_spatial_crop"].shape == (2, 2, 2)
    for b, s in enumerate(singles):
        L, n = s["input_ids"].shape[1], s["images"].shape[1]
        assert batch["input_ids"][b, T - L:].equal(s["input_ids"][0])
        assert (batch["input_ids"][b, : T - L] == proc.tokenizer.pad_id).all()
        assert batch["attention_mask"][b].tolist() == [0] * (T - L) + [1] * L
        assert batch["images_seq_mask"][b, T - L:].equal(s["images_seq_mask"][0]) and not batch["images_seq_mask"][b, : T - L].any()
        assert batch["images"][b, :n].equal(s["images"][0]) and not batch["images"][b, n:].any()
    assert batch["images_spatial_crop"][1].tolist() == [[0, 0], [0, 0]]  # no image: zero rows, like official
    assert batch["num_image_tokens"] == [singles[0]["num_image_tokens"][0], []]


def test_to_tensor_is_bit_exact_with_torchvision():
    T = pytest.importorskip("torchvision.transforms")
    cfg = TilingConfig(candidate_resolutions=((70, 70),), image_mean=(0.48, 0.46, 0.41), image_std=(0.27, 0.26, 0.28))
    img = Image.fromarray(torch.randint(0, 256, (37, 53, 3), dtype=torch.uint8).numpy())
    want = T.Normalize(cfg.image_mean, cfg.image_std)(T.ToTensor()(img))
    assert torch.equal(to_tensor(img, cfg), want)


def test_tiling_without_cropping_gives_one_local_tile():
    cfg = TilingConfig(candidate_resolutions=((70, 70), (140, 70), (140, 140)))
    assert cfg.tiles_for((500, 220), cropping=False) == (1, 1) and cfg.tiles_for((500, 220)) == (2, 1)
    assert tile_image(_solid((500, 220)), cfg, (1, 1)).shape == (2, 3, 70, 70)


def test_bad_inputs_raise_clear_errors(real):
    img = _solid((64, 48))
    with pytest.raises(ValueError, match="1 <image> tag.*2 image"):
        real(TILING_CONV, [img, img])
    with pytest.raises(ValueError, match="1 <image> tag.*0 image"):
        real(TILING_CONV, [])
    with pytest.raises(ValueError, match="mode 'RGBA'"):
        real(TILING_CONV, [img.convert("RGBA")])
    with pytest.raises(TypeError, match="PIL image"):
        real(TILING_CONV, [torch.zeros(3, 8, 8)])
    with pytest.raises(ValueError, match="unknown role"):
        real([{"role": "robot", "content": "hi"}])
    with pytest.raises(ValueError, match="only appear in user turns"):
        real([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<image>"}], [img])
    with pytest.raises(ValueError, match="not multiples"):
        TilingConfig(candidate_resolutions=((384, 384), (500, 384)))

"""describe / chat / ground through `mmstack.load` on the tiny official-format folders: multi-image
conversations, chunked prefill, chat formats, streaming, and a clear error for each bad input."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import mmstack
from golden import golden_dir
from mmstack.vision.grounding import Box
from mmstack.vision.image_io import ImageError


@pytest.fixture(scope="module")
def vl2():
    return mmstack.load(golden_dir() / "vl2_tiny_mla_moe", device="cpu", tokenizer=golden_dir() / "vl2_tokenizer")


def _img(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_describe_returns_text_and_streams_the_same(vl2):
    img = _img(150, 100)
    text = vl2.describe(img, "What is this?", max_new_tokens=6)
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What is this?"}]}]
    deltas = list(vl2.chat(msgs, max_new_tokens=6))
    assert isinstance(text, str) and "".join(deltas) == text


def test_chunked_prefill_gives_the_same_answer(vl2):
    img = _img(300, 120, 1)
    a = vl2.describe(img, max_new_tokens=6)
    vl2.prefill_chunk = 7
    try:
        assert vl2.describe(img, max_new_tokens=6) == a
    finally:
        vl2.prefill_chunk = 512


def test_multi_image_and_multi_turn_conversations(vl2):
    imgs = [_img(80, 60, s) for s in range(3)]
    two = vl2.describe(imgs[:2], "Compare.", max_new_tokens=4)
    three = vl2.describe(imgs, "Compare.", max_new_tokens=4)  # > 2 images: one global + one local tile each
    assert isinstance(two, str) and isinstance(three, str)
    msgs = [{"role": "user", "content": [{"type": "image", "image": imgs[0]}, {"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": [{"type": "image", "image": imgs[1]}, {"type": "text", "text": "And this?"}]}]
    assert isinstance(vl2.chat(msgs, stream=False, max_new_tokens=4), str)
    emb, mask, loaded = vl2.encode([msgs])
    assert len(loaded[0]) == 2


def test_ground_returns_boxes_in_image_pixels(vl2):
    boxes = vl2.ground(_img(150, 100), "the thing", max_new_tokens=24)
    assert all(isinstance(b, Box) and 0 <= b.x1 <= b.x2 <= 150 and 0 <= b.y1 <= b.y2 <= 100 for b in boxes)


def test_bad_inputs_give_clear_errors(vl2, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ImageError, match="broken.png"):
        vl2.describe(str(bad))
    with pytest.raises(ImageError, match="no such file"):
        vl2.describe(str(tmp_path / "missing.jpg"))
    with pytest.raises(ValueError, match="limit is"):
        vl2.describe([_img(8, 8)] * 17)
    with pytest.raises(ValueError, match="unknown content part type 'video'"):
        vl2.chat([{"role": "user", "content": [{"type": "video"}]}], stream=False)
    with pytest.raises(ValueError, match="role must be"):
        vl2.chat([{"role": "robot", "content": "hi"}], stream=False)
    with pytest.raises(mmstack.api.GenerationError if hasattr(mmstack.api, "GenerationError") else Exception, match="phrase"):
        vl2.ground(_img(20, 20), "  ")


def test_janus_chat_format_override_changes_role_strings():
    d = golden_dir() / "janus_pro_tiny"
    from mmstack.loading import load_model
    from mmstack.tokenizer import Tokenizer
    from mmstack.vision.pipeline import UnderstandingPipeline

    model = load_model(d, device="cpu", parts=("vision", "projector", "layout", "image_processing", "chat"))
    tk = Tokenizer.from_dir(d / "tokenizer")
    pro = UnderstandingPipeline(model, tk, str(d))
    old = UnderstandingPipeline(model, tk, str(d), chat_format="janus-1.3b")
    msgs = [{"role": "user", "content": "<image_placeholder>\nHi"}]
    pro_text = tk.decode(pro.processor.tokens(msgs), skip_special_tokens=False)
    old_text = tk.decode(old.processor.tokens(msgs), skip_special_tokens=False)
    assert "<|User|>: " in pro_text and "<|Assistant|>:" in pro_text
    assert "User: " in old_text and "<|User|>" not in old_text and old_text.endswith("Assistant:")
    a = pro.describe([_img(50, 40), _img(40, 50, 2)], max_new_tokens=3)  # two images in one turn
    assert isinstance(a, str)


def test_text_only_model_refuses_understanding(tmp_path):
    from mmstack.api import CapabilityError
    from mmstack.formats import read_config
    from mmstack.loading import build_model, save_pretrained
    from mmstack.variants import variant_config

    cfg = read_config(variant_config("deepseek-vl2-tiny", debug=True))
    cfg = cfg.only(())
    save_pretrained(build_model(cfg, "cpu"), tmp_path)
    pipe = mmstack.load(tmp_path, device="cpu")
    with pytest.raises(CapabilityError, match="cannot describe images"):
        pipe.describe(_img(10, 10))


def test_official_checkpoints_use_the_official_image_policy_and_calls_can_override(vl2):
    from mmstack.vision import image_io

    assert vl2.policy == image_io.OFFICIAL  # convert("RGB"): alpha dropped, EXIF ignored (goldens rely on it)
    rgba = Image.new("RGBA", (4, 4), (200, 10, 10, 0))
    assert image_io.load_image(rgba, vl2.policy).getpixel((0, 0)) == (200, 10, 10)
    native = mmstack.load(golden_dir() / "vl2_tiny_mla_moe", device="cpu", tokenizer=golden_dir() / "vl2_tokenizer",
                          image_policy="native")
    assert native.policy.composite_alpha and native.policy.exif_transpose
    assert image_io.load_image(rgba, native.policy).getpixel((0, 0)) == (127, 127, 127)

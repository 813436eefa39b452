"""Official understanding goldens, end to end from the folder: processor outputs (ids exact, pixels
<= 1e-6), vision features, projector output, spliced embeddings, full-model logits (<= 1e-4) and greedy
tokens, for the DeepSeek-VL2 tiny models, Janus-Pro and JanusFlow."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from golden import fixture_image, golden_dir, tokenizer_for, understanding_fixtures
import mmstack
from mmstack.vision.embed import embed_janus, embed_vl2

FIXTURES = understanding_fixtures()
IDS = [f.id for f in FIXTURES]
ATOL = 1e-4


def test_golden_understanding_fixture_kinds_present():
    kinds = {f.model_type for f in FIXTURES}
    assert golden_dir().is_dir()
    assert kinds >= {"deepseek_vl_v2", "multi_modality"}, kinds
    assert sum(f.model_type == "multi_modality" for f in FIXTURES) >= 2  # Janus-Pro and JanusFlow


@pytest.fixture(scope="module")
def loaded():
    cache = {}

    def get(fx):
        if fx.model_dir not in cache:  # the whole folder, strictly, through the public API
            cache[fx.model_dir] = mmstack.load(fx.model_dir, device="cpu", dtype=torch.float32,
                                               tokenizer=tokenizer_for(fx.model_dir))
            assert "understanding" in cache[fx.model_dir].capabilities
        return cache[fx.model_dir], load_file(fx.file)

    return get


def _embeds(pipe, io, p, fx):
    m = pipe.model
    if fx.has("images"):
        return embed_vl2(m, io[f"{p}input_ids"], io[f"{p}images"], io[f"{p}images_seq_mask"], io[f"{p}images_spatial_crop"])
    return embed_janus(m, io[f"{p}input_ids"], io[f"{p}pixel_values"], io[f"{p}images_seq_mask"], io[f"{p}images_emb_mask"])


@pytest.mark.parametrize("fx", FIXTURES, ids=IDS)
def test_golden_understanding_vision_projector_embeds_logits(fx, loaded):
    pipe, io = loaded(fx)
    p = fx.prefix
    with torch.no_grad():
        if fx.has("vision_features"):
            pix = io[f"{p}images"][0] if fx.has("images") else io[f"{p}pixel_values"].flatten(0, 1)
            feats = pipe.model.vision(pix)
            assert (feats - io[f"{p}vision_features"]).abs().max().item() <= ATOL
            proj_key = "projector_output" if fx.has("projector_output") else "aligner_output"
            assert (pipe.model.projector(feats) - io[f"{p}{proj_key}"]).abs().max().item() <= ATOL
        emb = _embeds(pipe, io, p, fx)
        d_emb = (emb - io[f"{p}inputs_embeds"]).abs().max().item()
        lm = pipe.model.language
        logits = lm.logits(lm(inputs_embeds=emb, attention_mask=io[f"{p}attention_mask"]))
    d_logits = (logits - io[f"{p}logits"]).abs().max().item()
    print(f"{fx.id}: inputs_embeds {d_emb:.3g}, logits {d_logits:.3g}")
    assert d_emb <= ATOL and d_logits <= ATOL


def _conversation(fx, pipe=None, io=None):
    """The fixture's conversation (meta.json), else the user turn recovered from the stored prompt ids
    (the image span collapsed to one tag; roles and system prompt then come from our chat format)."""
    meta = json.loads((fx.model_dir / "meta.json").read_text())
    conv = meta.get("conversation") or meta.get("conversation_understanding")
    if conv:
        return [{"role": "user" if "User" in m["role"] else "assistant", "content": m["content"]} for m in conv]
    import re

    c = pipe.chat_cfg
    text = pipe.tokenizer.decode(io[f"{fx.prefix}input_ids"][0].tolist(), skip_special_tokens=False)
    text = re.sub(re.escape(c.image_start_tag) + "(" + re.escape(c.image_tag) + ")+" + re.escape(c.image_end_tag), c.image_tag, text)
    user = text.split(f"{c.user_role}: ", 1)[1].rsplit(f"{c.sep}{c.assistant_role}:", 1)[0]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": ""}]


@pytest.mark.parametrize("fx", FIXTURES, ids=IDS)
def test_golden_understanding_processor_from_image_file(fx, loaded):
    """The pipeline's own processor, fed the fixture's PNG and conversation, gives the stored inputs."""
    pipe, io = loaded(fx)
    p = fx.prefix
    conv = _conversation(fx, pipe, io)
    img = Image.open(fixture_image(fx.model_dir)).convert("RGB")
    if fx.has("images"):
        batch = pipe.processor([pipe.understanding._vl2_conversation(conv)], [[img]])
        pix, want_pix = batch["images"], io[f"{p}images"]
        assert torch.equal(batch["images_spatial_crop"], io[f"{p}images_spatial_crop"])
    else:
        batch = pipe.processor([[m for m in conv if m["content"] or m["role"] == "user"]], [[img]])
        pix, want_pix = batch["pixel_values"], io[f"{p}pixel_values"]
        assert torch.equal(batch["images_emb_mask"], io[f"{p}images_emb_mask"].bool())
    assert batch["input_ids"].tolist() == io[f"{p}input_ids"].tolist()
    assert torch.equal(batch["images_seq_mask"], io[f"{p}images_seq_mask"].bool())
    assert (pix - want_pix).abs().max().item() <= 1e-6


@pytest.mark.parametrize("fx", [f for f in FIXTURES if f.has("greedy_new_tokens")],
                         ids=[f.id for f in FIXTURES if f.has("greedy_new_tokens")])
def test_golden_understanding_greedy_tokens_through_chat(fx, loaded):
    """`pipe.chat` on the fixture's image and question reproduces the official greedy tokens."""
    pipe, io = loaded(fx)
    conv = _conversation(fx, pipe, io)
    tag = pipe.chat_cfg.image_tag
    text = conv[0]["content"].replace(tag + "\n", "").replace(tag, "")
    msgs = [{"role": "user", "content": [{"type": "image", "path": str(fixture_image(fx.model_dir))},
                                         {"type": "text", "text": text}]}]
    want = io[f"{fx.prefix}greedy_new_tokens"].flatten().tolist()
    emb, mask, _ = pipe.encode([msgs])
    from mmstack.decoding import SamplingParams, generate_ids

    got = [int(t[0]) for t in generate_ids(pipe.model.language, SamplingParams(max_new_tokens=len(want)),
                                          inputs_embeds=emb, prefill_chunk=16)]
    assert got == want
    # and the public streaming API runs on the same inputs
    assert isinstance("".join(pipe.chat(msgs, max_new_tokens=4)), str)

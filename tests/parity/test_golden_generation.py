"""Official generation goldens: Janus-Pro teacher-forced gen_head logits (cond, uncond, CFG), the
unconditional prompt rows, greedy CFG image tokens, generation embeddings; JanusFlow 3-step Euler with
fixed noise (prompt-KV reuse and full recomputation), and the VAE decode. All parameters (prompts, cfg,
steps, pad ids) come from the fixtures' own files."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import mmstack
from golden import fixture_files_with, meta, tokenizer_for
from mmstack.generation.flow import generate_latents
from mmstack.generation.sampler import cfg_rows, generate_codes
from mmstack.generation.vae import decode_latents, load_vae
from mmstack.generation.vq import to_uint8

ATOL = 1e-4
VQ_FIX = fixture_files_with("cfg_tokens", "forced_image_token_ids", "logits_cond", "logits_uncond", "logits_cfg")
FLOW_FIX = fixture_files_with("gen_prompt_input_ids", "sample_z0", "sample_velocities", "sample_z_final")
VAE_FIX = fixture_files_with("sample_z_final", "vae_decoded")


def _id(pair):
    return f"golden-{pair[0].name}-{pair[1].stem}"


def test_golden_generation_fixture_kinds_present():
    assert VQ_FIX, "no Janus generation fixture (cfg_tokens / teacher-forced logits) found"
    assert FLOW_FIX, "no JanusFlow sampling fixture found"
    assert VAE_FIX, "no VAE decode fixture found"


_PIPES = {}


def _pipe(d):
    if d not in _PIPES:
        _PIPES[d] = mmstack.load(d, device="cpu", dtype=torch.float32, tokenizer=tokenizer_for(d))
    return _PIPES[d]


def _user_text(pipe, prompt_text: str) -> str:
    """The user prompt inside the fixture's recorded generation string."""
    chat = pipe.chat_cfg
    return prompt_text.split(f"{chat.user_role}: ", 1)[1].split(chat.sep, 1)[0]


@pytest.mark.parametrize("pair", VQ_FIX, ids=[_id(p) for p in VQ_FIX])
def test_golden_janus_prompt_and_unconditional_rows(pair):
    d, f = pair
    io, m = load_file(f), meta(d)
    pipe = _pipe(d)
    ids = pipe.generation_prompt_ids(_user_text(pipe, m["generation_prompt"]), "vq")
    assert ids == io["prompt_input_ids"].tolist()
    assert torch.equal(cfg_rows(ids, 1, m["pad_id"]), io["cfg_tokens"])
    assert torch.equal(cfg_rows(ids, 1, m["pad_id"], uncond="keep_bos_boi"), io["cfg_tokens"])


@pytest.mark.parametrize("layout", ["interleaved", "blocked"])
@pytest.mark.parametrize("pair", VQ_FIX, ids=[_id(p) for p in VQ_FIX])
def test_golden_janus_teacher_forced_gen_logits(pair, layout):
    d, f = pair
    io, m = load_file(f), meta(d)
    model = _pipe(d).model
    forced = io["forced_image_token_ids"]
    codes, (cond, unc) = generate_codes(model, io["prompt_input_ids"].tolist(), 1, len(forced), m["pad_id"],
                                        cfg_weight=m["cfg_weight"], forced=forced, layout=layout, record_logits=True)
    cfg = unc + m["cfg_weight"] * (cond - unc)
    diffs = [(a[:, 0] - io[k]).abs().max().item() for a, k in ((cond, "logits_cond"), (unc, "logits_uncond"), (cfg, "logits_cfg"))]
    print(f"{_id(pair)} [{layout}]: cond {diffs[0]:.3g} uncond {diffs[1]:.3g} cfg {diffs[2]:.3g}")
    assert max(diffs) <= ATOL
    with torch.no_grad():
        emb = model.vq_head.embed_codes(forced)
    assert (emb - io["gen_img_embeds"]).abs().max().item() <= ATOL


@pytest.mark.parametrize("pair", VQ_FIX, ids=[_id(p) for p in VQ_FIX])
def test_golden_janus_greedy_cfg_image_tokens(pair):
    d, f = pair
    io, m = load_file(f), meta(d)
    want = io["greedy_cfg_image_token_ids"]
    codes = generate_codes(_pipe(d).model, io["prompt_input_ids"].tolist(), 1, len(want), m["pad_id"],
                           cfg_weight=m["cfg_weight"], temperature=0)
    assert codes[0].tolist() == want.tolist()


@pytest.mark.parametrize("reuse", [True, False], ids=["prompt_kv_reuse", "full_recompute"])
@pytest.mark.parametrize("pair", FLOW_FIX, ids=[_id(p) for p in FLOW_FIX])
def test_golden_janusflow_euler_sampling(pair, reuse):
    d, f = pair
    io, m = load_file(f), meta(d)
    pipe = _pipe(d)
    ids = pipe.generation_prompt_ids(_user_text(pipe, m["generation_text"]), "flow")
    assert ids == io["gen_prompt_input_ids"].tolist()
    z, v = generate_latents(pipe.model, ids, io["sample_z0"].shape[0], m["pad_id"], steps=m["num_steps"],
                            cfg_weight=m["cfg_weight"], z0=io["sample_z0"], reuse_prompt_kv=reuse, record=True)
    dv = (v - io["sample_velocities"]).abs().max().item()
    dz = (z - io["sample_z_final"]).abs().max().item()
    print(f"{_id(pair)} reuse={reuse}: velocities {dv:.3g}, z_final {dz:.3g}")
    assert dv <= ATOL and dz <= ATOL
    if "sample_trajectory" in load_file(f):
        assert torch.allclose(io["sample_trajectory"][0], io["sample_z0"])


@pytest.mark.parametrize("pair", FLOW_FIX, ids=[_id(p) for p in FLOW_FIX])
def test_janusflow_prompt_kv_reuse_equals_full_recompute(pair):
    d, f = pair
    io, m = load_file(f), meta(d)
    model = _pipe(d).model
    ids = io["gen_prompt_input_ids"].tolist()
    z0 = torch.randn(2, *io["sample_z0"].shape[1:], generator=torch.Generator().manual_seed(3))
    a = generate_latents(model, ids, 2, m["pad_id"], steps=4, cfg_weight=3.0, z0=z0, reuse_prompt_kv=True)
    b = generate_latents(model, ids, 2, m["pad_id"], steps=4, cfg_weight=3.0, z0=z0, reuse_prompt_kv=False)
    assert (a - b).abs().max().item() <= 1e-5


@pytest.mark.parametrize("pair", VAE_FIX, ids=[_id(p) for p in VAE_FIX])
def test_golden_vae_decode(pair):
    d, f = pair
    io = load_file(f)
    vae = load_vae(d)
    dec = decode_latents(vae, io["sample_z_final"])
    assert (dec - io["vae_decoded"]).abs().max().item() <= ATOL
    if "vae_image01" in io:
        assert (dec.clamp(-1, 1) * 0.5 + 0.5 - io["vae_image01"]).abs().max().item() <= ATOL


@pytest.mark.parametrize("pair", VQ_FIX + FLOW_FIX, ids=[_id(p) for p in VQ_FIX + FLOW_FIX])
def test_generate_returns_seeded_images_from_the_folder(pair):
    d, _ = pair
    pipe = _pipe(d)
    kw = {"steps": 2} if "flow" in pipe.generation_modes else {}
    a = pipe.generate("a red circle", n=2, seed=11, **kw)
    b = pipe.generate("a red circle", n=2, seed=11, **kw)
    c = pipe.generate("a red circle", n=2, seed=12, **kw)
    assert len(a) == 2 and all(im.mode == "RGB" for im in a)
    assert [im.tobytes() for im in a] == [im.tobytes() for im in b]
    assert [im.tobytes() for im in a] != [im.tobytes() for im in c]


def test_uint8_conversion_truncates():
    x = torch.tensor([[[[0.999]]], [[[-0.999]]]]).expand(2, 3, 1, 1)
    out = to_uint8(x)
    assert out[0, 0, 0, 0].item() == int((0.999 + 1) / 2 * 255) and out[1, 0, 0, 0].item() == 0

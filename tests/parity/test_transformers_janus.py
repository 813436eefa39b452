"""Parity with transformers' `JanusForConditionalGeneration` on a tiny random model, loaded through
mmstack's production path (`mmstack.load` on the `save_pretrained` folder: `vision/hf_janus.py` config
translation + the `hf_janus` key table, strict).

Proves: understanding logits (1e-4) and 32 greedy text tokens; greedy CFG image codes for the whole grid
(with our official row layout and with transformers' blocked rows) and their decoded pixels (1e-4); VQ
encode with a unit-norm codebook; and the key table's round trip (names, shapes and values).
fp32 on CPU: the differences are accumulation order only (~1e-6); 1e-4 leaves two orders of margin while
a wrong mapping moves values by ~1e-1.
"""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mmstack  # noqa: E402
from mmstack.config import ConfigError  # noqa: E402
from mmstack.decoding import SamplingParams, generate_ids  # noqa: E402
from mmstack.formats import read_config  # noqa: E402
from mmstack.generation.sampler import generate_codes  # noqa: E402
from mmstack.io.keymaps import export_names  # noqa: E402
from mmstack.testing import randomise_weights  # noqa: E402
from mmstack.loading import build_model, key_table  # noqa: E402
from mmstack.vision.embed import embed_janus  # noqa: E402

ATOL = 1e-4
PAD, BOS, EOS, IMG, BOI, EOI = 0, 1, 2, 3, 4, 5
SPECIAL = ["<｜▁pad▁｜>", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<image_placeholder>",
           "<begin_of_image>", "<end_of_image>", "<unk>"]
VOCAB = 160
HIDDEN = 64
N_IMG = 16  # (32 // 8)^2 image tokens
CFG_WEIGHT = 5.0

TEXT = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=256, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
              projection_dim=HIDDEN, num_image_tokens=N_IMG)
VQ = dict(embed_dim=8, num_embeddings=64, base_channels=32, channel_multiplier=[1, 1, 2], latent_channels=32,
          projection_dim=HIDDEN, image_token_embed_dim=HIDDEN)


def _write_tokenizer(d) -> None:
    """A word-level tokenizer whose special-token ids are the ones the config uses."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIAL)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL), VOCAB)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens(SPECIAL[:6])
    tk.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": SPECIAL[BOS], "eos_token": SPECIAL[EOS], "pad_token": SPECIAL[PAD], "add_bos_token": True}))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    cfg = transformers.JanusConfig(text_config=TEXT, vision_config=VISION, vq_config=VQ, image_token_id=IMG,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.JanusForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()
    randomise_weights(hf, seed=1)  # a seed whose greedy code grid is not one repeated code
    d = tmp_path_factory.mktemp("hf_janus")
    hf.save_pretrained(d)
    _write_tokenizer(d)
    # transformers' class default mean/std (CLIP's), to see that preprocessor_config.json is read
    transformers.JanusImageProcessor(size={"height": 32, "width": 32}).save_pretrained(d)
    pipe = mmstack.load(d, device="cpu", dtype=torch.float32)
    return hf, pipe, d


def _understanding_inputs():
    g = torch.Generator().manual_seed(1)
    ids = [BOS, 17, 42, 99, BOI] + [IMG] * N_IMG + [EOI, 64, 7, 120, 33]
    return torch.tensor([ids]), torch.randn(1, 3, 32, 32, generator=g).clamp(-1, 1)


def _our_embeds(model, ids, pixels):
    return embed_janus(model, ids, pixels[:, None], images_seq_mask=ids == IMG)


def test_hf_janus_config_reads_every_part(pair):
    _, pipe, d = pair
    parts = pipe.model.cfg.parts
    assert set(parts) >= {"vision", "projector", "layout", "image_processing", "chat", "vq", "vq_head"}
    assert parts["vision"].global_pool == "" and parts["layout"].kind == "janus"
    pre = json.loads((d / "preprocessor_config.json").read_text())
    ip = parts["image_processing"]
    assert (ip.kind, ip.image_size, ip.image_mean, ip.image_std) == ("square_pad", 32, pre["image_mean"], pre["image_std"])
    assert (parts["projector"].kind, parts["projector"].depth) == ("mlp_gelu", 2)
    assert parts["chat"].num_image_tokens == N_IMG and parts["chat"].image_tag == "<image_placeholder>"
    assert parts["vq"].codebook_show_usage is False and parts["vq"].ch_mult == (1, 1, 2)
    head = parts["vq_head"]
    assert (head.row_layout, head.uncond, head.image_top_k) == ("interleaved", "official_slice", None)
    assert (head.image_size // parts["vq"].downsample) ** 2 == N_IMG  # the grid transformers decodes


def test_hf_janus_gen_head_shape_mismatch_is_a_config_error():
    """transformers' head is Linear(image_token_embed_dim -> projection_dim): unless image_token_embed_dim
    equals the LLM width it neither runs nor matches the official head, so the reader refuses it."""
    raw = transformers.JanusConfig(text_config=TEXT, vision_config=VISION, vq_config={**VQ, "image_token_embed_dim": 48},
                                   tie_word_embeddings=False).to_dict()
    with pytest.raises(ConfigError, match="image_token_embed_dim 48"):
        read_config(raw)


def test_hf_janus_key_table_matches_janus_pro_1b_layout():
    """At the released Janus-Pro-1B sizes (24-layer SigLIP-L, 5-level VQ-16, 2048-wide LLaMA), built on the
    meta device: our model exported through the table has exactly transformers' names and shapes."""
    text = dict(vocab_size=102400, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=16384)
    cfg = transformers.JanusConfig(text_config=text, vision_config=dict(projection_dim=2048),
                                   vq_config=dict(projection_dim=2048, image_token_embed_dim=2048),
                                   tie_word_embeddings=False)
    with torch.device("meta"):
        hf = transformers.JanusForConditionalGeneration._from_config(cfg)
    ours = read_config(cfg.to_dict())
    assert ours.parts["vq_head"].image_size == 384 and ours.parts["chat"].num_image_tokens == 576
    model = build_model(ours, "meta")
    exported = export_names(key_table("hf_janus"), {k: tuple(v.shape) for k, v in model.state_dict().items()})
    assert exported == {k: tuple(v.shape) for k, v in hf.state_dict().items()}


def test_hf_janus_key_table_round_trip_names_shapes_and_values(pair):
    """Every transformers key maps to a filled internal tensor holding its values, and exporting our
    internal names through the table reproduces the transformers checkpoint's names and shapes."""
    from safetensors.torch import load_file

    hf, pipe, d = pair
    table = key_table("hf_janus")
    src = load_file(str(d / "model.safetensors"))
    ours = pipe.model.state_dict()
    for key, t in src.items():
        slot = table.to_internal(key)
        assert slot is not None and slot.name in ours, key
        v = ours[slot.name]
        if slot.part is not None:
            v = v.chunk(slot.part[1], 0)[slot.part[0]]
        if slot.squeeze is not None:
            v = v.squeeze(slot.squeeze)
        assert torch.equal(v, t), key
    exported = export_names(table, {k: tuple(v.shape) for k, v in ours.items()})
    assert exported == {k: tuple(t.shape) for k, t in src.items()}
    assert set(src) == set(hf.state_dict())  # save_pretrained wrote every key (no tie: lm_head included)


def test_hf_janus_understanding_logits_match(pair):
    hf, pipe, _ = pair
    ids, pixels = _understanding_inputs()
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=pixels).logits
        emb = _our_embeds(pipe.model, ids, pixels)
        got = pipe.model.language.logits(pipe.model.language(inputs_embeds=emb))
    diff = (got - want).abs().max().item()
    print(f"hf_janus understanding: logits max abs diff {diff:.3g}")
    assert diff <= ATOL


def test_hf_janus_understanding_greedy_32_text_tokens_match(pair):
    hf, pipe, _ = pair
    ids, pixels = _understanding_inputs()
    with torch.no_grad():
        want = hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                           generation_mode="text", max_new_tokens=32, do_sample=False, eos_token_id=None,
                           pad_token_id=PAD)[0, ids.shape[1]:]
        emb = _our_embeds(pipe.model, ids, pixels)
    got = torch.cat(list(generate_ids(pipe.model.language, SamplingParams(max_new_tokens=32), inputs_embeds=emb)))
    assert got.tolist() == want.tolist()


GEN_PROMPT = [BOS, 17, 42, 99, 5 + 60, 7, 8, BOI]


@pytest.fixture(scope="module")
def hf_image(pair):
    """transformers' greedy CFG codes for GEN_PROMPT and its decoded pixels [1, 3, H, W]."""
    hf, _, _ = pair
    ids = torch.tensor([GEN_PROMPT])
    # image mode needs an attention mask and reads the BOI id only from generation_config.generation_kwargs
    gc = transformers.GenerationConfig(bos_token_id=BOS, pad_token_id=PAD, do_sample=False,
                                       guidance_scale=CFG_WEIGHT, generation_kwargs={"boi_token_id": BOI})
    with torch.no_grad():
        codes = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_mode="image",
                            generation_config=gc)
        pixels = hf.decode_image_tokens(codes).permute(0, 3, 1, 2)
    return codes, pixels


@pytest.mark.parametrize("layout,uncond", [("interleaved", "official_slice"), ("blocked", "keep_bos_boi")],
                         ids=["official-rows", "transformers-rows"])
def test_hf_janus_greedy_cfg_image_codes_and_pixels_match(pair, hf_image, layout, uncond):
    """The whole grid of greedy CFG codes equals transformers' `generate(generation_mode="image")`, whichever
    row layout / unconditional rule we use, and `vq.decode_code` equals `decode_image_tokens`."""
    _, pipe, _ = pair
    want_codes, want_pixels = hf_image
    assert want_codes.shape == (1, N_IMG)
    got = generate_codes(pipe.model, GEN_PROMPT, 1, N_IMG, PAD, cfg_weight=CFG_WEIGHT, temperature=0,
                         layout=layout, uncond=uncond)
    assert got.tolist() == want_codes.tolist()
    with torch.no_grad():
        pixels = pipe.model.vq.decode_code(got)
    diff = (pixels - want_pixels).abs().max().item()
    print(f"hf_janus image ({layout}): {N_IMG}/{N_IMG} codes equal, decoded pixels max abs diff {diff:.3g}")
    assert pixels.shape == want_pixels.shape and diff <= ATOL


def test_hf_janus_vq_encode_matches_with_unit_norm_codebook(pair):
    """transformers' quantizer normalises neither z nor the codebook (the official one does both); with a
    unit-norm codebook the nearest code is the same, so indices and quantised latents agree."""
    hf, pipe, _ = pair
    ours, theirs = pipe.model.vq, hf.model.vqmodel
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)).clamp(-1, 1)
    saved = (ours.quantize.embedding.weight.detach().clone(), theirs.quantize.embedding.weight.detach().clone())
    try:
        with torch.no_grad():
            unit = torch.nn.functional.normalize(saved[0], dim=-1)
            ours.quantize.embedding.weight.copy_(unit)
            theirs.quantize.embedding.weight.copy_(unit)
            out = theirs.encode(x)
            pre = (ours.encoder(x) - out.last_hidden_state).abs().max().item()  # HF: before quant_conv
            quant, idx = ours.encode(x)
            qdiff = (quant - out.quantized_last_hidden_state).abs().max().item()
    finally:
        with torch.no_grad():
            ours.quantize.embedding.weight.copy_(saved[0])
            theirs.quantize.embedding.weight.copy_(saved[1])
    print(f"hf_janus VQ encode (unit-norm codebook): encoder {pre:.3g}, quant {qdiff:.3g}")
    assert idx.tolist() == out.image_tokens.tolist()
    assert pre <= ATOL and qdiff <= ATOL

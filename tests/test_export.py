"""Export (`mmstack convert --to`, `mmstack.loading.export_pretrained`): a native model -> official or
transformers folders.

Proves: every golden fixture (official VL2 MLA / q_lora / MHA, Janus-Pro, JanusFlow) goes official ->
native -> official with the fixture's exact key set and bitwise-equal tensors, reads back to the same
config, and writes config.json / processor files that agree with the fixture's on every shared field;
transformers DeepseekV2 / DeepseekV3 / Llama / Janus folders go load -> export -> `from_pretrained` with
equal logits (the same weights and the same code: the difference is exactly 0, checked at 1e-5); an
official Janus becomes a transformers Janus and a VL2 language model a transformers causal LM (different
code: fp32 accumulation order only, ~2e-6, checked at 1e-4 as the parity tests); every named variant's
config round-trips through its official format; impossible combinations fail naming what is missing.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from golden import golden_dir, model_dirs, tokenizer_for
from mmstack import cli
from mmstack.export import export_pretrained as export_with_shards
from mmstack.export import plan_export
from mmstack.formats import read_config
from mmstack.loading import build_model, export_pretrained, load_model, save_pretrained
from mmstack.testing import randomise_weights
from mmstack.variants import variant_config, variant_names
from mmstack.formats.common import custom_entries
from mmstack.writers import ExportError

transformers = pytest.importorskip("transformers")

PROMPT = torch.tensor([[3, 17, 42, 99, 5, 64, 7, 8, 120, 33, 2, 11]])
SAME_CODE_ATOL = 1e-5  # our export read by the very code that wrote the source: bitwise in practice
OTHER_CODE_ATOL = 1e-4  # our model vs transformers' implementation (see tests/parity)

# config.json fields where the export differs from a fixture on purpose. The fixtures name their test-only
# architectures ("siglip_golden_tiny", "VQ-golden-tiny"); the export calls any architecture the official
# look-up tables lack "siglip_custom" / "VQ-custom" and writes its own note: the entries are compared by
# content instead (test_golden_config_files_agree_on_every_shared_field).
RENAMED = {"vision_config.params.model_name", "vision_und_enc_config.params.model_name", "gen_vision_config.cls",
           "_golden_overrides", "custom_architectures"}
# Written by the fixtures, omitted by the export: training-only DeepseekV2Config fields (auxiliary-loss
# weight and mode, weight-init spread) that inference code never reads.
OMITTED = {"language_config.aux_loss_alpha", "language_config.seq_aux", "language_config.initializer_range"}


def _shared(a: dict, b: dict, path: str = ""):
    """(path, a value, b value) for every leaf both dicts have and that differs; `only_a` paths too."""
    for k, v in a.items():
        p = f"{path}{k}"
        if p in RENAMED:
            continue
        if k not in b:
            yield p, v, "<absent>"
        elif isinstance(v, dict) and isinstance(b[k], dict):
            yield from _shared(v, b[k], p + ".")
        elif v != b[k]:
            yield p, v, b[k]


# ------------------------------------------------------------------------------------------ golden fixtures


@pytest.fixture(scope="module", params=model_dirs(), ids=lambda d: d.name)
def golden_export(request, tmp_path_factory):
    """official fixture -> native (save_pretrained) -> reloaded -> exported to the fixture's own format."""
    src = request.param
    fmt = read_config(src).source_format
    tmp = tmp_path_factory.mktemp(src.name)
    official = load_model(src, device="cpu", dtype=torch.float32)
    save_pretrained(official, tmp / "native", tokenizer_dir=tokenizer_for(src))
    native = load_model(tmp / "native", device="cpu", dtype=torch.float32)
    out = export_pretrained(native, tmp / fmt, fmt, tokenizer_dir=tmp / "native")
    return src, out


def test_golden_fixtures_cover_every_official_format():
    assert {read_config(d).source_format for d in model_dirs()} >= {"deepseek_vl_v2", "janus", "janusflow"}


def test_golden_weights_export_bitwise(golden_export):
    src, out = golden_export
    want, got = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(got) == sorted(want)
    for key, t in want.items():
        assert got[key].dtype == t.dtype and torch.equal(got[key], t), key


def test_golden_config_reads_back_equal(golden_export):
    src, out = golden_export
    assert read_config(out).to_json_dict() == read_config(src).to_json_dict()


def test_golden_config_files_agree_on_every_shared_field(golden_export):
    """config.json and the processor files the fixture has: every field of the fixture's is written with
    the fixture's value, except the documented RENAMED and OMITTED ones."""
    src, out = golden_export
    names = [n for n in ("config.json", "processor_config.json", "preprocessor_config.json") if (src / n).exists()]
    for name in names:
        want, got = json.loads((src / name).read_text()), json.loads((out / name).read_text())
        problems = [(p, a, b) for p, a, b in _shared(want, got) if not (b == "<absent>" and p in OMITTED)]
        assert problems == [], name
        # the test-only architectures: the same entries under another name
        for table in ("siglip_model_config", "vq_model"):
            entries = [list(custom_entries(c, table).values()) for c in (want, got)]
            assert entries[0] == entries[1], (name, table)


def test_golden_tokenizer_is_copied(golden_export):
    src, out = golden_export
    assert (out / "tokenizer.json").read_bytes() == (tokenizer_for(src) / "tokenizer.json").read_bytes()


# ------------------------------------------------------------------------------------------ named variants


@pytest.mark.parametrize("debug", [False, True], ids=["full", "debug"])
@pytest.mark.parametrize("name", variant_names())
def test_variant_config_round_trips_through_its_official_format(name, debug):
    raw = variant_config(name, debug=debug)
    cfg = read_config(raw)
    plan = plan_export(cfg, cfg.source_format)  # raises on any field that would not read back
    assert plan.warnings == []
    assert plan.target.language == cfg.language and plan.target.parts == cfg.parts
    assert list(_shared(raw, plan.written.config)) == []
    if not debug:  # released towers and tokenizers are named as the official look-up tables name them
        assert "custom_architectures" not in plan.written.config


# ------------------------------------------------------------------------------------------ transformers


_MOE = dict(vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
            first_k_dense_replace=1, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            max_position_embeddings=256)
_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}
HF_CASES = {
    "hf_deepseek_v2": lambda: transformers.DeepseekV2ForCausalLM._from_config(transformers.DeepseekV2Config(
        **_MOE, n_shared_experts=2, q_lora_rank=24, topk_method="group_limited_greedy", n_group=2, topk_group=1),
        attn_implementation="eager"),
    "hf_deepseek_v3": lambda: transformers.DeepseekV3ForCausalLM._from_config(transformers.DeepseekV3Config(
        **_MOE, n_shared_experts=1, q_lora_rank=24, n_group=2, topk_group=1, rope_interleave=False,
        rope_parameters=_YARN), attn_implementation="eager"),
    "hf_llama": lambda: transformers.LlamaForCausalLM._from_config(transformers.LlamaConfig(
        vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256), attn_implementation="eager"),
}


@pytest.mark.parametrize("fmt", sorted(HF_CASES))
def test_transformers_causal_lm_exports_with_identical_logits(fmt, tmp_path):
    hf = HF_CASES[fmt]().eval()
    randomise_weights(hf)
    hf.save_pretrained(tmp_path / "src")
    native = load_model(tmp_path / "src", device="cpu", dtype=torch.float32)
    out = export_pretrained(native, tmp_path / "out", fmt)
    again = type(hf).from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        assert (again(PROMPT).logits - hf(PROMPT).logits).abs().max().item() <= SAME_CODE_ATOL
    want, got = load_file(tmp_path / "src" / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


# <image_placeholder> is id 3: transformers' Janus finds the image slots by `image_token_id`
JANUS_SPECIAL = ["<｜▁pad▁｜>", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<image_placeholder>",
                 "<begin_of_image>", "<end_of_image>", "<unk>"]
IMG = 3


def _janus_tokenizer(d, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(JANUS_SPECIAL)}
    vocab.update({f"w{i}": i for i in range(len(JANUS_SPECIAL), vocab_size)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens(JANUS_SPECIAL[:6])
    d.mkdir(parents=True, exist_ok=True)
    tk.save(str(d / "tokenizer.json"))


def _understanding_inputs(n_image_tokens: int, size: int):
    ids = torch.tensor([[1, 17, 42, 99, 4] + [IMG] * n_image_tokens + [5, 64, 7, 120]])
    return ids, (torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)


def test_transformers_janus_exports_with_identical_logits(tmp_path):
    text = dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=256)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
                  projection_dim=64, num_image_tokens=16)
    vq = dict(embed_dim=8, num_embeddings=64, base_channels=32, channel_multiplier=[1, 1, 2], latent_channels=32,
              projection_dim=64, image_token_embed_dim=64)
    cfg = transformers.JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=IMG,
                                   tie_word_embeddings=False)
    hf = transformers.JanusForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()
    randomise_weights(hf, seed=1)
    src = tmp_path / "src"
    hf.save_pretrained(src)
    _janus_tokenizer(src, 160)
    transformers.JanusImageProcessor(size={"height": 32, "width": 32}).save_pretrained(src)
    out = export_pretrained(load_model(src, device="cpu", dtype=torch.float32), tmp_path / "out", "hf_janus",
                            tokenizer_dir=src)
    assert json.loads((out / "config.json").read_text())["image_token_id"] == IMG  # from the tokenizer
    assert json.loads((out / "preprocessor_config.json").read_text()) == json.loads(
        (src / "preprocessor_config.json").read_text())
    again = transformers.JanusForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    ids, pixels = _understanding_inputs(16, 32)
    with torch.no_grad():
        diff = again(input_ids=ids, pixel_values=pixels).logits - hf(input_ids=ids, pixel_values=pixels).logits
    assert diff.abs().max().item() <= SAME_CODE_ATOL
    want, got = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_official_janus_exports_to_transformers_janus(tmp_path, caplog):
    """Janus-Pro (official layout, debug size) -> transformers: the unused attention-pool head and VQ usage
    buffer are left out with a warning; understanding logits match our model."""
    from mmstack.vision.embed import embed_janus

    cfg = read_config(variant_config("janus-pro-1b", debug=True))
    model = build_model(cfg, device="cpu", dtype=torch.float32).eval()
    _janus_tokenizer(tmp_path / "tok", cfg.language.vocab_size)
    out = export_pretrained(model, tmp_path / "out", "hf_janus", tokenizer_dir=tmp_path / "tok")
    assert "attn_pool" in caplog.text and "codebook_used" in caplog.text
    hf = transformers.JanusForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    ids, pixels = _understanding_inputs(cfg.parts["chat"].num_image_tokens, cfg.parts["vision"].image_size)
    with torch.no_grad():
        want = model.language.logits(model.language(inputs_embeds=embed_janus(model, ids, pixels[:, None], ids == IMG)))
        assert (hf(input_ids=ids, pixel_values=pixels).logits - want).abs().max().item() <= OTHER_CODE_ATOL


def test_vl2_language_model_exports_alone_to_transformers(tmp_path):
    """deepseek-vl2 (MLA, sigmoid + noaux_tc) -> DeepseekV3ForCausalLM with language_only; without it the
    error says how to leave the vision parts out."""
    model = load_model(golden_dir() / "vl2_tiny_mla_moe", device="cpu", dtype=torch.float32)
    with pytest.raises(ExportError, match="language_only"):
        export_pretrained(model, tmp_path / "refused", "hf_deepseek_v3")
    assert not (tmp_path / "refused").exists()
    out = export_pretrained(model, tmp_path / "out", "hf_deepseek_v3", language_only=True)
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        want = model.language.logits(model.language(input_ids=PROMPT))
        assert (hf(PROMPT).logits - want).abs().max().item() <= OTHER_CODE_ATOL


# ------------------------------------------------------------------------------------------ errors, dtype, shards


@pytest.mark.parametrize("fmt, source, message", [
    ("deepseek_vl_v2", "text", r"text-only model \(missing: image_processing, layout, projector, vision\)"),
    ("janusflow", "text", r"missing: flow_decoder, flow_encoder, flow_head, layout, projector, vision"),
    ("janus", "vl2", r"layout.kind 'janus'.*'vl2_tiles'"),
    ("hf_deepseek_v2", "vl2", r"scoring_func 'sigmoid' is not supported"),
    ("hf_llama", "janus", r"holds a language model only.*language_only=True"),
    ("hf_llama", "vl2", r"language model: a LLaMA decoder .* 'mla' attention and routed experts"),
    ("hf_janus", "janus", r"head is 64 -> 48"),
    ("onnx", "text", r"unknown export format 'onnx'"),
])
def test_unsupported_combinations_name_what_is_missing(fmt, source, message):
    text = read_config(variant_config("janus-pro-1b", debug=True)).only(())
    cfg = {"text": text, "vl2": read_config(golden_dir() / "vl2_tiny_mla_moe"),
           "janus": read_config(golden_dir() / "janus_pro_tiny")}[source]
    with pytest.raises(ExportError, match=message):
        plan_export(cfg, fmt)


def test_dtype_is_kept(tmp_path):
    model = load_model(golden_dir() / "vl2_tiny_mla_moe", device="cpu", dtype=torch.bfloat16)
    out = export_pretrained(model, tmp_path, "deepseek_vl_v2")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["language_config"]["torch_dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert {d for k, d in dtypes.items() if not k.endswith("e_score_correction_bias")} == {"BF16"}


def test_large_checkpoints_are_sharded_and_a_later_single_file_replaces_the_shards(tmp_path):
    model = load_model(golden_dir() / "janusflow_tiny", device="cpu", dtype=torch.float32)
    want = model.state_dict()
    export_with_shards(model, tmp_path, "janusflow", max_shard_bytes=200_000)
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert not (tmp_path / "model.safetensors").exists()
    got = load_model(tmp_path, device="cpu", dtype=torch.float32).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    export_with_shards(model, tmp_path, "janusflow")
    assert not list(tmp_path.glob("model-*")) and not (tmp_path / "model.safetensors.index.json").exists()
    assert (tmp_path / "model.safetensors").exists()


# ------------------------------------------------------------------------------------------ command line


def _run(*args):
    return subprocess.run([sys.executable, "-m", "mmstack.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_cli_converts_a_native_model_to_deepseek_vl2(tmp_path):
    src = golden_dir() / "vl2_tiny_mla_moe"
    official = load_model(src, device="cpu", dtype=torch.float32)
    save_pretrained(official, tmp_path / "run", tokenizer_dir=tokenizer_for(src))
    r = _run("convert", tmp_path / "run", tmp_path / "out", "--to", "deepseek_vl_v2")
    assert r.returncode == 0, r.stderr
    got, want = load_file(tmp_path / "out" / "model.safetensors"), load_file(src / "model.safetensors")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert {"config.json", "processor_config.json", "tokenizer.json"} <= {p.name for p in (tmp_path / "out").iterdir()}
    assert read_config(tmp_path / "out").to_json_dict() == read_config(src).to_json_dict()


def test_cli_unsupported_combination_exits_2_with_one_line(tmp_path, capsys):
    """The same `main` the console script runs, in-process (the subprocess test above covers the wiring)."""
    HF_CASES["hf_llama"]().save_pretrained(tmp_path / "text")  # a text-only model
    capsys.readouterr()  # transformers' progress bar
    assert cli.main(["convert", str(tmp_path / "text"), str(tmp_path / "out"), "--to", "deepseek_vl_v2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "deepseek_vl_v2 needs the parts" in err and "text-only" in err, err
    assert not (tmp_path / "out").exists()


def test_cli_unknown_format_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["convert", "a", "b", "--to", "onnx"])
    assert e.value.code == 2 and "invalid choice: 'onnx'" in capsys.readouterr().err

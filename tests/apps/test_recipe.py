"""`mmstack build-demo`: the shipped recipe's profiles, and a whole build of the `gpu` profile at a tiny size on the
CPU (synth, tokenizer, VQ tokenizer with code restarts, a mixed stage with the CTC head), with `build.json`
recording profile, device, seconds and held-out scores."""
from __future__ import annotations

import copy
import json

import pytest

import mmstack
import mmstack.assets
from mmstack.apps import recipe as recipe_mod
from mmstack.apps.recipe_profiles import profile, stage_args, synth_args
from mmstack.tokenizer import Tokenizer

SHIPPED = json.loads((mmstack.assets.ROOT / "demo-recipe.json").read_text())


def test_the_shipped_recipe_has_a_cpu_and_a_gpu_profile_and_counts_samples():
    cpu, gpu = profile(SHIPPED, "cpu"), profile(SHIPPED, "gpu")
    assert cpu["device"] == "cpu" and gpu["device"] == "cuda"
    for stage in SHIPPED["stages"]:
        assert "samples" in stage and "steps" not in stage
        a, b = stage_args(stage, cpu), stage_args(stage, gpu)
        assert b["batch_size"] == a["batch_size"] * gpu["batch_scale"]
        assert b["lr"] == pytest.approx(a["lr"] * gpu["lr_scale"])
        assert b["steps"] * b["batch_size"] >= 0.99 * gpu["sample_scale"] * a["steps"] * a["batch_size"]
    assert synth_args(SHIPPED["synth"]["train"], gpu)["n"] == SHIPPED["synth"]["train"]["n"] * gpu["synth_scale"]
    with pytest.raises(ValueError, match="no profile 'tpu'"):
        profile(SHIPPED, "tpu")
    with pytest.raises(ValueError, match="unknown keys"):
        profile({"profiles": {"x": {"batchscale": 2}}}, "x")
    with pytest.raises(ValueError, match="positive number"):
        profile({"profiles": {"x": {"lr_scale": 0}}}, "x")


def test_the_recipe_tokenizer_reads_capitals_and_digits_one_by_one(tmp_path):
    texts = ["ABCD1234 HELLO", "a red circle and a blue square.", "| A | 57 |"] * 40
    tok = Tokenizer.from_dir(recipe_mod.train_tokenizer(texts, 300, tmp_path, "A-Z0-9"))
    for word in ("ABCD1234", "HELLO", "ZQ09"):
        ids = tok.encode(word)
        assert len(ids) == len(word) + 1 and tok.decode(ids).strip() == word  # bos + one token per character
    pairs = Tokenizer.from_dir(recipe_mod.train_tokenizer(texts, 300, tmp_path / "bpe"))
    assert len(pairs.encode("ABCD1234")) < 9  # plain BPE on the same corpus merges them


def _tiny(recipe: dict) -> dict:
    r = copy.deepcopy(recipe)
    r["synth"]["train"].update(n=48, progress=False)
    r["synth"]["heldout"].update(n=20, progress=False)
    lm = r["model"]["language"]
    lm.update(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=512)
    lm["mla"].update(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    lm["moe"].update(n_routed_experts=4, moe_intermediate_size=32)
    r["model"]["vision"]["tower"].update(width=32, layers=1, heads=2)
    r["model"]["vq"]["tokenizer"].update(codebook_size=32, z_channels=32, ch=32)
    r["tokenizer"]["vocab_size"] = 320
    r["eval_per_task"] = 2
    r["profiles"]["gpu"].update(batch_scale=2, sample_scale=2, synth_scale=1)
    for s in r["stages"]:
        s.update(samples=8, save_every=1, eval_every=0, eval_fraction=0.0)
        s.pop("warmup", None)
    return r


@pytest.mark.slow
def test_a_tiny_gpu_profile_build_runs_on_the_cpu_and_records_what_it_did(tmp_path):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(_tiny(SHIPPED)))
    out = recipe_mod.build(path, tmp_path / "work", tmp_path / "model", "gpu", device="cpu")
    meta = json.loads((out / "build.json").read_text())
    assert meta["profile"] == "gpu" and meta["device"] == "cpu" and meta["seconds"] > 0
    assert set(meta["scores"]) >= {"ocr", "chart", "caption", "grounding", "t2i"}
    assert all(0.0 <= v <= 1.0 for v in meta["scores"].values())
    scores = json.loads((out / "scores.json").read_text())
    assert scores["full"]["scores"] == meta["scores"] and "quick" in scores
    for i, stage in enumerate(SHIPPED["stages"]):  # batch and steps scaled: 8 samples x 2, batches x 2
        args = json.loads(next((tmp_path / "work").glob(f"stage{i}-*/args.json")).read_text())
        assert args["batch_size"] == stage["batch_size"] * 2 and args["steps"] == 1 and args["device"] == "cpu"
    stage2 = json.loads(next((tmp_path / "work").glob("stage2-*/args.json")).read_text())
    assert stage2["ctc_init"].endswith("stage1-mixed/ctc_head.safetensors")  # the CTC head carried between stages
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["image_processing"]["single_tile_global_only"] is True
    assert not any("ctc" in k for k in json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) \
        if (out / "model.safetensors.index.json").exists() else True
    pipe = mmstack.load(out, device="cpu")
    assert isinstance(pipe.describe(str(next((tmp_path / "work" / "heldout" / "images").iterdir())), "Describe this image.",
                                    max_new_tokens=4), str)
    with pytest.raises(ValueError, match="holds a build of profile 'gpu'"):
        recipe_mod.build(path, tmp_path / "work", tmp_path / "model2", "cpu")

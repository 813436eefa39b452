"""The language parts of the official goldens: logits from the stored inputs_embeds, greedy tokens and
per-step logits of the official cached generate (DeepSeek-VL2 MLA/MHA MoE, Janus-Pro, JanusFlow LMs)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from golden import golden_dir, lm_fixtures
from mmstack.decoding import SamplingParams, generate_ids
from mmstack.loading import load_model

FIXTURES = lm_fixtures()
ATOL = 1e-4  # golden/README: fp32 vs fp64 of the official code is <= 6.3e-6 on these logits


def test_golden_language_fixture_kinds_present():
    kinds = {(f.model_type, f.has_greedy) for f in FIXTURES}
    assert golden_dir().is_dir(), f"golden fixtures not found at {golden_dir()} (set MMSTACK_GOLDEN_DIR)"
    assert ("deepseek_vl_v2", True) in kinds, "no DeepSeek-VL2 language fixture with greedy tokens found"
    assert ("multi_modality", True) in kinds, "no Janus language fixture with greedy tokens found"
    assert sum(f.model_type == "deepseek_vl_v2" for f in FIXTURES) >= 3


def _load(fx):
    lm = load_model(fx.model_dir, device="cpu", dtype=torch.float32, language_only=True).language
    return lm, load_file(fx.file)


@pytest.mark.parametrize("fx", FIXTURES, ids=[f.id for f in FIXTURES])
def test_golden_language_logits(fx):
    lm, io = _load(fx)
    p = fx.prefix
    with torch.no_grad():
        logits = lm.logits(lm(inputs_embeds=io[f"{p}inputs_embeds"], attention_mask=io[f"{p}attention_mask"]))
    diff = (logits - io[f"{p}logits"]).abs().max().item()
    print(f"{fx.id}: logits max abs diff {diff:.3g}")
    assert diff <= ATOL


@pytest.mark.parametrize("fx", [f for f in FIXTURES if f.has_greedy], ids=[f.id for f in FIXTURES if f.has_greedy])
def test_golden_language_greedy_tokens(fx):
    lm, io = _load(fx)
    p = fx.prefix
    want = io[f"{p}greedy_new_tokens"].flatten()
    params = SamplingParams(max_new_tokens=len(want), temperature=0.0)
    got = torch.stack(list(generate_ids(lm, params, inputs_embeds=io[f"{p}inputs_embeds"],
                                        attention_mask=io[f"{p}attention_mask"])))[:, 0]
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("fx", [f for f in FIXTURES if f.has_step_logits],
                         ids=[f.id for f in FIXTURES if f.has_step_logits])
def test_golden_language_cached_step_logits(fx):
    """Each cached decode step (absorbed MLA on the latent cache) reproduces the official step logits."""
    lm, io = _load(fx)
    p = fx.prefix
    tokens, want = io[f"{p}greedy_new_tokens"].flatten(), io[f"{p}greedy_step_logits"]
    emb, mask = io[f"{p}inputs_embeds"], io[f"{p}attention_mask"]
    cache = lm.new_cache(1, emb.shape[1] + len(tokens))
    worst = 0.0
    with torch.no_grad():
        h = lm(inputs_embeds=emb, attention_mask=mask, cache=cache)[:, -1]
        for i, tok in enumerate(tokens.tolist()):
            lg = lm.logits(h)[0]
            worst = max(worst, (lg - want[i]).abs().max().item())
            h = lm(input_ids=torch.tensor([[tok]]), cache=cache)[:, -1]
    print(f"{fx.id}: step logits max abs diff {worst:.3g}")
    assert worst <= ATOL

"""Equivalence tests of the backbone's fast paths: absorbed vs naive MLA, cached prefill + decode vs one
full forward (with left padding), chunked prefill, grouped MoE vs the loop, and the MoE router semantics."""
from __future__ import annotations

import pytest
import torch

from mmstack import kernels
from mmstack.config import LMConfig, MLAConfig, MoEConfig, RopeConfig
from mmstack.llm import Gate, LanguageModel, MLAttention


def _cfg(kind: str) -> LMConfig:
    moe = MoEConfig(n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=16, n_shared_experts=2,
                    first_k_dense_replace=1)
    base = dict(vocab_size=96, hidden_size=48, num_layers=3, num_heads=4, intermediate_size=64, moe=moe)
    if kind == "mha":
        return LMConfig(**base, num_kv_heads=2)
    if kind == "mla":
        return LMConfig(**base, attention="mla", mla=MLAConfig(None, 16, 8, 8, 12), rope=RopeConfig(style="interleaved"))
    if kind == "mla_qlora_sigmoid":
        moe2 = MoEConfig(8, 2, 16, 1, 1, 1, "sigmoid", "noaux_tc", 4, 2, True, 2.5)
        return LMConfig(**{**base, "moe": moe2}, attention="mla", mla=MLAConfig(24, 16, 8, 8, 12),
                        rope=RopeConfig(style="interleaved", scaling={"type": "yarn", "factor": 4.0,
                                                                     "original_max_position_embeddings": 32,
                                                                     "mscale": 1.0, "mscale_all_dim": 1.0}))
    raise KeyError(kind)


KINDS = ["mha", "mla", "mla_qlora_sigmoid"]


def _model(kind: str) -> LanguageModel:
    torch.manual_seed(0)
    m = LanguageModel(_cfg(kind)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.15) if p.dim() > 1 else p.uniform_(0.8, 1.2)
        for name, b in m.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)
    return m


def _full_logits(m, ids, mask=None):
    with torch.no_grad():
        return m.logits(m(input_ids=ids, attention_mask=mask))


@pytest.mark.parametrize("kind", ["mla", "mla_qlora_sigmoid"])
def test_mla_absorbed_equals_naive(kind):
    m = _model(kind)
    ids = torch.randint(0, 96, (2, 11))
    outs = {}
    for mode in ("naive", "absorb"):
        for mod in m.modules():
            if isinstance(mod, MLAttention):
                mod.mode = mode
        outs[mode] = _full_logits(m, ids)
    torch.testing.assert_close(outs["absorb"], outs["naive"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_prefill_and_decode_equal_full_forward(kind):
    """Left-padded batch: prefill 6 tokens, decode 5 one at a time; logits equal the full forward."""
    m = _model(kind)
    ids = torch.randint(3, 96, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :3] = 0
    full = _full_logits(m, ids, mask)
    cache = m.new_cache(2, 16)
    with torch.no_grad():
        steps = [m.logits(m(input_ids=ids[:, :6], attention_mask=mask[:, :6], cache=cache))]
        for t in range(6, 11):
            steps.append(m.logits(m(input_ids=ids[:, t : t + 1], cache=cache)))
    cached = torch.cat(steps, 1)
    valid = mask.bool()
    torch.testing.assert_close(cached[valid], full[valid], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_prefill_equals_single_prefill(kind):
    from mmstack.decoding import prefill

    m = _model(kind)
    ids = torch.randint(3, 96, (1, 23))
    a, b = m.new_cache(1, 23), m.new_cache(1, 23)
    ha = prefill(m, a, ids)
    hb = prefill(m, b, ids, chunk=5)
    torch.testing.assert_close(hb, ha, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.layers[-1][0], a.layers[-1][0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["mla", "mla_qlora_sigmoid"])
def test_long_chunks_expand_the_latent_and_short_ones_absorb_with_the_same_result(kind, monkeypatch):
    """Chunked prefill over a cache picks the cheaper MLA path per chunk (`absorb_pays`); both agree with
    one full prefill. Test sizes: C=16, P=8, R=8, V=12: over 60 cached tokens, chunks of 19+ queries expand."""
    from mmstack.decoding import prefill

    m = _model(kind)
    attn = m.layers[0].self_attn
    assert attn.absorb_pays(1, 4096) and attn.absorb_pays(18, 60) and not attn.absorb_pays(19, 60)
    used = []
    for name in ("_naive", "_absorbed"):
        real = getattr(MLAttention, name)
        monkeypatch.setattr(MLAttention, name, lambda self, *a, _r=real, _n=name: used.append(_n) or _r(self, *a))
    ids = torch.randint(3, 96, (1, 90))
    a, b = m.new_cache(1, 90), m.new_cache(1, 90)
    ha = prefill(m, a, ids)
    used.clear()
    hb = prefill(m, b, ids, chunk=30)  # 30 + 30 + 30: the first has no cache, the next two expand
    assert set(used) == {"_naive"}
    torch.testing.assert_close(hb, ha, atol=1e-5, rtol=1e-5)
    used.clear()
    c = m.new_cache(1, 90)
    hc = prefill(m, c, ids, chunk=8)  # chunks of 8 over a cache absorb
    assert "_absorbed" in used
    torch.testing.assert_close(hc, ha, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_grouped_moe_model_equals_expert_loop(kind):
    m = _model(kind)
    ids = torch.randint(0, 96, (2, 9))
    with kernels.use_backend("moe", "reference"):
        ref = _full_logits(m, ids)
    for backend in ("grouped", "gather", "indexed"):
        with kernels.use_backend("moe", backend):
            torch.testing.assert_close(_full_logits(m, ids), ref, atol=1e-5, rtol=1e-5)


def test_inputs_embeds_path_equals_input_ids():
    m = _model("mla")
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        a = m(input_ids=ids)
        b = m(inputs_embeds=m.embed_tokens(ids))
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_mla_cache_holds_only_latent_and_rope_key():
    cfg = _cfg("mla")
    m = LanguageModel(cfg)
    cache = m.new_cache(1, 8)
    assert cache.nbytes_per_token() == (16 + 8) * cfg.num_layers * 4
    assert cfg.kv_values_per_token() == (16 + 8) * cfg.num_layers
    mha = LanguageModel(_cfg("mha")).new_cache(1, 8)
    assert mha.nbytes_per_token() == 2 * 2 * 12 * 3 * 4


def _decode_step_flops(m, prompt_len: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    cache = m.new_cache(1, prompt_len + 1)
    with torch.no_grad():
        m(input_ids=torch.randint(0, 96, (1, prompt_len)), cache=cache)
        with FlopCounterMode(display=False) as counter:
            m(input_ids=torch.randint(0, 96, (1, 1)), cache=cache)
    return counter.get_total_flops()


def test_mla_decode_cost_grows_only_by_latent_attention():
    """Absorbed decode attends over the cached latent directly: each extra cached token costs exactly the
    latent attention, 2*H*(C + R) for the scores and 2*H*C for the values, per layer. transformers' MLA
    re-expands every cached latent through kv_b_proj at each step (2*C*H*(nope + v) more per token)."""
    cfg = _cfg("mla")
    m = _model("mla")
    h, c, r = cfg.num_heads, cfg.mla.kv_lora_rank, cfg.mla.qk_rope_head_dim
    per_token = 2 * h * (c + r) + 2 * h * c
    short, long = _decode_step_flops(m, 16), _decode_step_flops(m, 80)
    assert long - short == per_token * cfg.num_layers * (80 - 16)
    reexpansion = 2 * c * h * (cfg.mla.qk_nope_head_dim + cfg.mla.v_head_dim)
    assert long - short < reexpansion * cfg.num_layers * (80 - 16) / 4


def test_gradient_checkpointing_gives_the_same_gradients():
    m = _model("mla").train()
    ids = torch.randint(0, 96, (2, 8))
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        m.gradient_checkpointing = ckpt
        m.logits(m(input_ids=ids)).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in m.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_noaux_tc_masks_dropped_groups_with_minus_inf():
    """With a negative correction bias, a 0.0 fill (the VL2 code) would let a dropped group's expert win;
    the -inf fill of DeepSeek-V3's reference never selects outside the kept groups."""
    cfg = MoEConfig(4, 2, 8, 0, 0, 1, "sigmoid", "noaux_tc", n_group=2, topk_group=1, norm_topk_prob=True)
    g = Gate(4, cfg)
    with torch.no_grad():
        g.weight.copy_(torch.eye(4) * 4)
        g.e_score_correction_bias.copy_(torch.tensor([-2.0, -2.0, -0.1, -0.1]))
    x = torch.tensor([[5.0, 4.0, -5.0, -5.0]])  # group 0 scores high but bias pushes its choice score < 0
    idx, w = g(x)
    # group scores: g0 = sum(top2 of s+b) ≈ -2.0, g1 ≈ -0.2 -> group 1 kept, so experts {2, 3}
    assert sorted(idx[0].tolist()) == [2, 3]
    assert torch.allclose(w.sum(-1), torch.tensor([1.0]))  # norm_topk_prob, scaling 1.0


def test_router_runs_in_fp32_in_a_bf16_model():
    cfg = MoEConfig(8, 2, 8, 0, 0, 1)
    g = Gate(16, cfg, dtype=torch.bfloat16)
    idx, w = g(torch.randn(5, 16, dtype=torch.bfloat16))
    assert w.dtype == torch.float32 and idx.shape == (5, 2)


def test_router_stays_fp32_under_bf16_autocast():
    """Training under bf16 autocast: the router's logits are the fp32 ones (autocast would otherwise run the
    matmul in bf16 and flip near-tied expert choices)."""
    torch.manual_seed(0)
    cfg = MoEConfig(64, 6, 8, 0, 0, 1)
    g = Gate(256, cfg)
    x = torch.randn(512, 256)
    want_idx, want_w = g(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx, w = g(x)
        plain = torch.nn.functional.linear(x.float(), g.weight.float())
    assert plain.dtype == torch.bfloat16  # what autocast does to an unguarded fp32 matmul
    assert torch.equal(idx, want_idx) and torch.equal(w, want_w)

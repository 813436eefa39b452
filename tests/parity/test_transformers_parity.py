"""Parity with transformers 5 on tiny random models, loaded through mmstack's production path
(`mmstack.load` on the folder `save_pretrained` wrote: config translation + key table).

Full-sequence logits within 1e-4 and 32 greedy tokens identical, for DeepseekV2 (MLA + softmax MoE,
with and without q_lora, greedy and group-limited routing), DeepseekV3 (sigmoid + noaux_tc +
group-limited, interleaved and half-split rope, YaRN) and Llama (GQA).
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mmstack  # noqa: E402
from mmstack.testing import randomise_weights  # noqa: E402

ATOL = 1e-4
PROMPT = torch.tensor([[3, 17, 42, 99, 5, 64, 7, 8, 120, 33, 2, 11]])


def _v2(q_lora, routing):
    c = transformers.DeepseekV2Config(
        vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2,
        first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=q_lora, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, topk_method=routing, n_group=2 if routing != "greedy" else None,
        topk_group=1 if routing != "greedy" else None, max_position_embeddings=256,
    )
    return transformers.DeepseekV2ForCausalLM, c


def _v3(interleave, yarn=False):
    rope = None
    if yarn:
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
                "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}
    c = transformers.DeepseekV3Config(
        vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_group=2, topk_group=1, rope_interleave=interleave, max_position_embeddings=256,
        rope_parameters=rope,
    )
    return transformers.DeepseekV3ForCausalLM, c


def _llama():
    c = transformers.LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return transformers.LlamaForCausalLM, c


CASES = {
    "deepseek_v2-mla-greedy": lambda: _v2(None, "greedy"),
    "deepseek_v2-mla-qlora-group_limited": lambda: _v2(24, "group_limited_greedy"),
    "deepseek_v3-noaux_tc-interleaved": lambda: _v3(True),
    "deepseek_v3-noaux_tc-halves-yarn": lambda: _v3(False, yarn=True),
    "llama-gqa": _llama,
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    cls, cfg = CASES[request.param]()
    torch.manual_seed(0)
    hf = cls._from_config(cfg, attn_implementation="eager").eval()
    randomise_weights(hf)
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    pipe = mmstack.load(d, device="cpu", dtype=torch.float32)
    return request.param, hf, pipe


def test_transformers_logits_match(pair):
    name, hf, pipe = pair
    with torch.no_grad():
        want = hf(PROMPT).logits.float()
    got = pipe.logits(PROMPT)
    diff = (got - want).abs().max().item()
    print(f"{name}: logits max abs diff {diff:.3g}")
    assert diff <= ATOL


def test_transformers_greedy_32_tokens_match(pair):
    name, hf, pipe = pair
    with torch.no_grad():
        want = hf.generate(PROMPT, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)[0, PROMPT.shape[1]:]
    got = pipe.complete_ids(PROMPT[0].tolist(), max_new_tokens=32)[0]
    assert got == want.tolist()


def test_transformers_left_padded_batch_matches(pair):
    """Two prompts of different lengths, left padded: each row equals transformers with its mask."""
    name, hf, pipe = pair
    short = PROMPT[0, 4:].tolist()
    ids = torch.tensor([PROMPT[0].tolist(), [0] * 4 + short])
    mask = torch.tensor([[1] * 12, [0] * 4 + [1] * 8])
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[:, 12:]
    got = pipe.complete_ids([PROMPT[0].tolist(), short], max_new_tokens=12)
    assert got == want.tolist()


def test_transformers_fused_expert_layout_loads(tmp_path):
    """transformers' in-memory state_dict (fused `experts.gate_up_proj` [E,2I,H]) loads unchanged."""
    from safetensors.torch import save_file

    cls, cfg = _v3(True)
    torch.manual_seed(0)
    hf = cls._from_config(cfg, attn_implementation="eager").eval()
    randomise_weights(hf, seed=3)
    hf.config.save_pretrained(tmp_path)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in sd)
    save_file(sd, tmp_path / "model.safetensors")
    pipe = mmstack.load(tmp_path, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        want = hf(PROMPT).logits
    assert (pipe.logits(PROMPT) - want).abs().max().item() <= ATOL


def test_transformers_janus_language_model_and_tied_head(tmp_path):
    """A transformers `janus` folder: its LLaMA reads through the hf_janus table. JanusConfig ties lm_head
    to the embeddings by default (and save_pretrained then omits lm_head.weight): the tie is honoured."""
    from mmstack.loading import load_model

    text = dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=256)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8,
                  projection_dim=64)
    vq = dict(embed_dim=8, num_embeddings=32, base_channels=32, channel_multiplier=[1, 2], latent_channels=32,
              projection_dim=64, image_token_embed_dim=64)
    for tie in (True, False):
        cfg = transformers.JanusConfig(text_config=text, vision_config=vision, vq_config=vq, tie_word_embeddings=tie)
        torch.manual_seed(0)
        hf = transformers.JanusForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()
        randomise_weights(hf, seed=5)
        d = tmp_path / f"tie{tie}"
        hf.save_pretrained(d)
        lm = load_model(d, device="cpu", dtype=torch.float32, language_only=True).language
        with torch.no_grad():
            want = hf(input_ids=PROMPT).logits
            got = lm.logits(lm(input_ids=PROMPT))
        assert (got - want).abs().max().item() <= ATOL, f"tie_word_embeddings={tie}"
        assert (lm.lm_head.weight is lm.embed_tokens.weight) == tie

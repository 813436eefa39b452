"""Named variants as data: each entry is the released checkpoint's `config.json` (official format), with
the page it reproduces. `variant_config(name, debug=True)` shrinks every dimension while keeping every
code path (MLA or MHA, q_lora, routing method, dense first layers, tiling, generation heads).

Real configs could not be downloaded here; values come from the official code defaults, the papers and
the model cards (see ../shared/reference/*.md); only config.json drives loading, never this table.
"""
from __future__ import annotations

import copy
from typing import Any

_VL2_RESOLUTIONS = [[384, 384], [384, 768], [768, 384], [384, 1152], [1152, 384], [384, 1536], [1536, 384],
                    [768, 768], [384, 1920], [1920, 384], [384, 2304], [2304, 384], [768, 1152], [1152, 768],
                    [384, 2688], [2688, 384], [384, 3072], [3072, 384], [768, 1536], [1536, 768], [384, 3456],
                    [3456, 384], [1152, 1152]]


def _vl2(hidden: int, layers: int, heads: int, dense: int, experts: int, moe_inter: int, mla: bool,
         sigmoid: bool) -> dict:
    lang = dict(
        model_type="deepseek_v2", vocab_size=129280, hidden_size=hidden, intermediate_size=dense,
        moe_intermediate_size=moe_inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, n_routed_experts=experts, n_shared_experts=2, num_experts_per_tok=6,
        first_k_dense_replace=1, moe_layer_freq=1, n_group=1, topk_group=1, max_position_embeddings=4096,
        bos_token_id=0, eos_token_id=1, use_mla=mla, q_lora_rank=None,
        kv_lora_rank=512 if mla else None, qk_nope_head_dim=128 if mla else 0,
        qk_rope_head_dim=64 if mla else 0, v_head_dim=128 if mla else 0,
        topk_method="noaux_tc" if sigmoid else "greedy", scoring_func="sigmoid" if sigmoid else "softmax",
        norm_topk_prob=sigmoid, routed_scaling_factor=2.0 if sigmoid else 1.0, rope_theta=10000.0,
        rms_norm_eps=1e-6,
    )
    return dict(
        model_type="deepseek_vl_v2", architectures=["DeepseekVLV2ForCausalLM"], tile_tag="2D",
        global_view_pos="head", candidate_resolutions=copy.deepcopy(_VL2_RESOLUTIONS),
        vision_config=dict(model_type="vision", model_name="siglip_so400m_patch14_384", image_size=384, patch_size=14,
                           width=1152, layers=27, heads=16, mlp_ratio=3.7362, global_pool="map", ignore_head=True,
                           class_token=False, num_classes=0, use_checkpoint=False, weight_init="skip"),
        projector_config=dict(model_type="mlp_projector", projector_type="downsample_mlp_gelu", input_dim=1152,
                              n_embed=hidden, depth=2, mlp_ratio=1, downsample_ratio=2),
        language_config=lang,
    )


def _janus(hidden: int, layers: int, heads: int, inter: int) -> dict:
    return dict(
        model_type="multi_modality", architectures=["MultiModalityCausalLM"],
        vision_config=dict(cls="CLIPVisionTower", model_type="vision",
                           params=dict(image_size=384, model_name="siglip_large_patch16_384", select_feature="same",
                                       select_layer=-1)),
        aligner_config=dict(cls="MlpProjector", model_type="aligner",
                            params=dict(depth=2, input_dim=1024, n_embed=hidden, projector_type="mlp_gelu")),
        gen_vision_config=dict(cls="VQ-16", model_type="gen_vision", params=dict(image_token_size=16384, n_embed=8)),
        gen_aligner_config=dict(cls="MlpProjector", model_type="gen_aligner",
                                params=dict(depth=2, input_dim=8, n_embed=hidden, projector_type="mlp_gelu")),
        gen_head_config=dict(cls="vision_head", model_type="gen_head",
                             params=dict(image_token_embed=hidden, image_token_size=16384, n_embed=hidden)),
        language_config=dict(model_type="llama", vocab_size=102400, hidden_size=hidden, intermediate_size=inter,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                             max_position_embeddings=16384),
    )


def _janusflow() -> dict:
    unet = dict(block_out_channels=[768], layers_in_middle=2, hidden_size=2048, elementwise_affine=True,
                use_bias=True, norm_eps=1e-6, dropout=0.0, use_mid_block=True)
    return dict(
        model_type="multi_modality", architectures=["MultiModalityCausalLM"],
        vision_und_enc_config=dict(cls="CLIPVisionTower", model_type="vision_und_enc",
                                   params=dict(image_size=384, model_name="siglip_large_patch16_384",
                                               select_feature="same", select_layer=-1)),
        vision_gen_enc_config=dict(cls="ShallowUViTEncoder", model_type="vision_gen_enc",
                                   params=dict(input_channels=4, stride=2, kernel_size=2, padding=0, **unet)),
        vision_gen_dec_config=dict(cls="ShallowUViTDecoder", model_type="vision_gen_dec",
                                   params=dict(in_channels=768, out_channels=4, upsamples=1, **unet)),
        language_config=dict(model_type="llama", vocab_size=102400, hidden_size=2048, intermediate_size=5632,
                             num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                             max_position_embeddings=16384),
    )


VARIANTS: dict[str, dict[str, Any]] = {
    # https://huggingface.co/deepseek-ai/deepseek-vl2-tiny/blob/main/config.json
    "deepseek-vl2-tiny": dict(family="vl2", config=_vl2(1280, 12, 10, 6848, 64, 896, mla=False, sigmoid=False)),
    # https://huggingface.co/deepseek-ai/deepseek-vl2-small/blob/main/config.json
    "deepseek-vl2-small": dict(family="vl2", config=_vl2(2048, 27, 16, 10944, 64, 1408, mla=True, sigmoid=False)),
    # https://huggingface.co/deepseek-ai/deepseek-vl2/blob/main/config.json
    "deepseek-vl2": dict(family="vl2", config=_vl2(2560, 30, 32, 12288, 72, 1536, mla=True, sigmoid=True)),
    # https://huggingface.co/deepseek-ai/Janus-1.3B/blob/main/config.json (roles "User"/"Assistant")
    "janus-1.3b": dict(family="janus", chat_roles=("User", "Assistant"), config=_janus(2048, 24, 16, 5632)),
    # https://huggingface.co/deepseek-ai/Janus-Pro-1B/blob/main/config.json
    "janus-pro-1b": dict(family="janus", chat_roles=("<|User|>", "<|Assistant|>"), config=_janus(2048, 24, 16, 5632)),
    # https://huggingface.co/deepseek-ai/Janus-Pro-7B/blob/main/config.json
    "janus-pro-7b": dict(family="janus", chat_roles=("<|User|>", "<|Assistant|>"), config=_janus(4096, 30, 32, 11008)),
    # https://huggingface.co/deepseek-ai/JanusFlow-1.3B/blob/main/config.json
    "janusflow-1.3b": dict(family="janusflow", chat_roles=("User", "Assistant"), config=_janusflow()),
}

# Aliases users type.
ALIASES = {"deepseek-vl2-base": "deepseek-vl2", "vl2-tiny": "deepseek-vl2-tiny", "vl2-small": "deepseek-vl2-small"}

# Debug shrinks: every dimension tiny, every structural switch kept. Applied as nested updates.
_DEBUG_LM_VL2 = dict(vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
                     num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                     num_experts_per_tok=3, max_position_embeddings=2048)
_DEBUG_MLA = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12)
_DEBUG_LM_LLAMA = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048)


def _merge(base: dict, upd: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


_DEBUG_SIGLIP = {"siglip_debug": dict(image_size=32, patch_size=16, width=32, layers=2, heads=2, mlp_ratio=4,
                                      global_pool="map")}
_DEBUG_VISION_PARAMS = dict(model_name="siglip_debug", image_size=32)
# Debug shrinks of the non-language parts, per family (nested updates of the official config.json).
DEBUG_PART_SHRINKS: dict[str, list[dict]] = {
    "vl2": [dict(
        candidate_resolutions=[[28, 28], [28, 56], [56, 28], [56, 56]],
        vision_config=dict(image_size=28, width=32, layers=2, heads=2),
        projector_config=dict(input_dim=32, n_embed=64),
    )],
    "janus": [dict(
        _golden_overrides=dict(siglip_model_config=_DEBUG_SIGLIP, vq_model={"VQ-debug": dict(
            codebook_size=64, codebook_embed_dim=8, encoder_ch_mult=[1, 1, 2], decoder_ch_mult=[1, 1, 2], z_channels=32,
            ch=32, num_res_blocks=1)}),
        vision_config=dict(params=_DEBUG_VISION_PARAMS),
        aligner_config=dict(params=dict(input_dim=32, n_embed=64)),
        gen_vision_config=dict(cls="VQ-debug", params=dict(image_token_size=64, n_embed=8)),
        gen_aligner_config=dict(params=dict(n_embed=64)),
        gen_head_config=dict(params=dict(image_token_embed=64, image_token_size=64, n_embed=64)),
    )],
    "janusflow": [dict(
        _golden_overrides=dict(siglip_model_config=_DEBUG_SIGLIP),
        vision_und_enc_config=dict(params=_DEBUG_VISION_PARAMS),
        vision_gen_enc_config=dict(params=dict(block_out_channels=[32], hidden_size=64)),
        vision_gen_dec_config=dict(params=dict(in_channels=32, block_out_channels=[32], hidden_size=64)),
    )],
}


def canonical_name(name: str) -> str:
    key = name.lower()
    key = ALIASES.get(key, key)
    if key not in VARIANTS:
        raise KeyError(f"unknown variant {name!r} (known: {', '.join(sorted(VARIANTS))})")
    return key


def variant_config(name: str, debug: bool = False) -> dict:
    """The variant's config.json dict (official format); `debug=True` gives the tiny CPU-test shrink."""
    v = VARIANTS[canonical_name(name)]
    cfg = copy.deepcopy(v["config"])
    if not debug:
        return cfg
    fam = v["family"]
    if fam == "vl2":
        lang = dict(_DEBUG_LM_VL2)
        if cfg["language_config"]["use_mla"]:
            lang.update(_DEBUG_MLA)
        cfg = _merge(cfg, {"language_config": lang})
    else:
        cfg = _merge(cfg, {"language_config": _DEBUG_LM_LLAMA})
    for upd in DEBUG_PART_SHRINKS.get(fam, []):
        cfg = _merge(cfg, upd)
    return cfg


def variant_names() -> list[str]:
    return sorted(VARIANTS)

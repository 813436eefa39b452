"""The suites of `mmstack bench`: each builds its models at a size and returns `Case`s for `bench_measure.measure`.

    janus-t2i       576-token greedy CFG image generation (parallel 1 and 4) vs transformers'
                    JanusForConditionalGeneration.generate(generation_mode="image") (its default static cache)
    mla-moe-decode  DeepSeek-V2-style MLA + MoE greedy decode after a 512-token prompt vs
                    DeepseekV2ForCausalLM with its dynamic and its static cache (the faster is the baseline)
    vl2-prefill     1..9-tile images through tiling, the vision tower and prefill: grouped MoE vs the expert loop
    janusflow-t2i   30 Euler steps: prompt-KV reuse vs the official full recomputation per step

Sizes: "smoke" (seconds), "cpu" (the same structure, small widths), "full" (the released dimensions:
Janus-Pro-1B, DeepSeek-V2-Lite / VL2-small, JanusFlow-1.3B). Random weights are redrawn with a spread of
min(0.08, hidden**-0.5) so greedy choices are well separated (no float-noise ties between two correct
implementations); random routers spread tokens almost uniformly, unlike trained ones.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from mmstack.testing import randomise_weights

from .bench_measure import Case, Contender, check_fits, sync

PAD, BOS, EOS, IMG, BOI = 0, 1, 2, 3, 4


# ---------------------------------------------------------------------------------------------- helpers


def _from_transformers(hf, device, dtype, std: float):
    """Random transformers model -> save_pretrained -> mmstack's production loader. Returns (hf, ours)."""
    from mmstack.loading import load_model

    randomise_weights(hf, std)
    d = Path(tempfile.mkdtemp(prefix="mmstack-bench-"))
    try:
        hf.save_pretrained(d)
        ours = load_model(d, device=device, dtype=dtype)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return hf.to(device=device, dtype=dtype).eval(), ours


def hf_kv_bytes_per_token(cache) -> Optional[int]:
    """Bytes per token (one row, all layers) of a transformers Cache, from its key/value tensors."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    total = 0
    for layer in layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is None or t.dim() != 4:
                return None
            total += t.shape[1] * t.shape[3] * t.element_size()  # [B, heads, S, D]
    return total


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> tuple[bool, str]:
    """fp32: max |a-b| <= 1e-4 * max(1, max|b|); lower precision: cosine > 0.999."""
    a, b = a.float().flatten(), b.float().flatten()
    diff = (a - b).abs().max().item()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    ok = diff <= 1e-4 * max(1.0, b.abs().max().item()) if dtype == torch.float32 else cos > 0.999
    return ok, f"max abs diff {diff:.3g}, cosine {cos:.6f}"


def _tokens_gate(dtype, logits_pair: Callable[[], tuple[torch.Tensor, torch.Tensor]]):
    """fp32: identical greedy tokens; lower precision: first-step logits close (tokens may drift apart)."""

    def gate(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[bool, str]:
        ours, theirs = ours.cpu(), theirs.cpu()
        same = int((ours == theirs).sum()) if ours.shape == theirs.shape else 0
        msg = f"{same}/{theirs.numel()} greedy tokens equal"
        if dtype == torch.float32:
            return same == theirs.numel(), msg
        ok, detail = _close(*logits_pair(), dtype)
        return ok, f"{msg}; first-step logits {detail}"

    return gate


class _Clock:
    """A transformers streamer that only records when each token arrives (the first `put` is the prompt)."""

    def __init__(self, device):
        self.device, self.times = device, []

    def put(self, value):
        sync(self.device)
        self.times.append(time.perf_counter())

    def end(self):
        pass


def _tile_candidates(s: int) -> list[list[int]]:
    from mmstack.variants import _VL2_RESOLUTIONS

    return [[w // 384 * s, h // 384 * s] for w, h in _VL2_RESOLUTIONS]


def _merge(base: dict, upd: dict) -> dict:
    from mmstack.variants import _merge as merge

    return merge(base, upd)


# ---------------------------------------------------------------------------------------------- janus-t2i

JANUS_SIZES = {
    "smoke": dict(text=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                            vocab_size=256),
                  vision=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=64, patch_size=16),
                  vq=dict(num_embeddings=64, base_channels=32, channel_multiplier=[1, 2], latent_channels=32),
                  prompt=8, parallel=(1, 2)),
    "cpu": dict(text=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                          vocab_size=1024),
                vision=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=384, patch_size=16),
                vq=dict(num_embeddings=1024, base_channels=32, channel_multiplier=[1, 1, 1, 1, 1], latent_channels=32),
                prompt=32, parallel=(1, 4)),
    # Janus-Pro-1B (https://huggingface.co/deepseek-ai/Janus-Pro-1B); vision and VQ at transformers' defaults
    "full": dict(text=dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, intermediate_size=5632,
                           vocab_size=102400), vision={}, vq={}, prompt=32, parallel=(1, 4)),
}


def janus_t2i(size: str, device, dtype, against: str = "transformers") -> list[Case]:
    import transformers

    from mmstack.generation.sampler import cfg_rows, generate_codes

    s = JANUS_SIZES[size]
    hidden = s["text"]["hidden_size"]
    vision = {"projection_dim": hidden, **s["vision"]}
    grid = vision.get("image_size", 384) // vision.get("patch_size", 16)
    n_tokens = grid * grid
    vision["num_image_tokens"] = n_tokens
    cfg = transformers.JanusConfig(
        text_config=dict(num_key_value_heads=s["text"]["num_attention_heads"], max_position_embeddings=4096,
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, **s["text"]),
        vision_config=vision, vq_config=dict(embed_dim=8, projection_dim=hidden, image_token_embed_dim=hidden, **s["vq"]),
        image_token_id=IMG, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.JanusForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")
    hf, ours = _from_transformers(hf, device, dtype, min(0.08, hidden**-0.5))
    lm, head = ours.language, ours.vq_head
    cfg_weight = 5.0
    vocab = s["text"]["vocab_size"]
    prompt = [BOS] + [10 + (7 * i) % (vocab - 10) for i in range(s["prompt"] - 2)] + [BOI]
    kv_ours = lm.new_cache(1, 1).nbytes_per_token()
    cases = []
    for n in s["parallel"]:
        ids = torch.tensor([prompt] * n, device=device)
        rows = cfg_rows(prompt, n, PAD, "blocked", "keep_bos_boi").to(device)  # transformers' CFG rows

        def run_ours(n=n):
            return generate_codes(ours, prompt, n, n_tokens, PAD, cfg_weight=cfg_weight, temperature=0,
                                  layout="blocked", uncond="keep_bos_boi"), {}

        theirs = Contender("transformers", None, prefill=lambda rows=rows: hf.model.language_model(input_ids=rows))

        def run_theirs(ids=ids, c=theirs):
            gc = transformers.GenerationConfig(bos_token_id=BOS, pad_token_id=PAD, do_sample=False,
                                               guidance_scale=cfg_weight, generation_kwargs={"boi_token_id": BOI},
                                               return_dict_in_generate=True)
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_mode="image",
                              generation_config=gc)
            c.kv_bytes_per_token = c.kv_bytes_per_token or hf_kv_bytes_per_token(out.past_key_values)
            return out.sequences, {}

        theirs.run = run_theirs

        def first_logits(rows=rows, n=n):
            a = head.logits(lm(input_ids=rows)[:, -1])
            b = hf.model.generation_head(hf.model.language_model(input_ids=rows).last_hidden_state[:, -1])
            return (a[:n] + cfg_weight * (a[:n] - a[n:]), b[:n] + cfg_weight * (b[:n] - b[n:]))

        cases.append(Case(
            name=f"parallel={n}",
            ours=Contender("mmstack", run_ours, prefill=lambda rows=rows: lm(input_ids=rows), kv_bytes_per_token=kv_ours),
            theirs=[theirs] if against == "transformers" else [],
            gate=_tokens_gate(dtype, first_logits),
            prefill_tokens=rows.numel(), decode_tokens=n_tokens,
            notes=[f"{n_tokens} image tokens, CFG rows {2 * n} x {len(prompt)}-token prompt; prefill timed separately"
                   " (prompt forward of the CFG rows), decode = (e2e - prefill) / tokens"] if n == s["parallel"][0] else []))
    return cases


# ---------------------------------------------------------------------------------------------- mla-moe-decode

MLA_SIZES = {
    "smoke": dict(cfg=dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=16,
                           num_hidden_layers=2, num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                           n_shared_experts=1, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8),
                  cases=((32, 8),)),
    "cpu": dict(cfg=dict(vocab_size=2048, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=8, n_routed_experts=64, num_experts_per_tok=6,
                         n_shared_experts=2, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32),
                cases=((512, 96), (2048, 16))),
    # DeepSeek-V2-Lite (https://huggingface.co/deepseek-ai/DeepSeek-V2-Lite/blob/main/config.json), the
    # language model of DeepSeek-VL2-small; plain RoPE (the YaRN extension changes no cost)
    "full": dict(cfg=dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                          num_hidden_layers=27, num_attention_heads=16, n_routed_experts=64, num_experts_per_tok=6,
                          n_shared_experts=2, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                          v_head_dim=128), cases=((512, 256), (4096, 128))),
}


# keys of a hub config.json that describe the checkpoint, not the architecture
NOT_ARCHITECTURE = ("architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version",
                    "quantization_config", "_name_or_path")


def mla_config(size: str, config: Optional[dict] = None) -> dict:
    """The architecture of the mla-moe-decode suite: MLA_SIZES[size], with the fields of `config` (a
    DeepSeek-V2/V3 config.json, e.g. a released model's) replacing those it names."""
    c = dict(MLA_SIZES[size]["cfg"])
    extra = {k: v for k, v in (config or {}).items() if k not in NOT_ARCHITECTURE}
    c.update(extra)
    return {"num_key_value_heads": c["num_attention_heads"], "first_k_dense_replace": 1, "q_lora_rank": None,
            "topk_method": "greedy", "max_position_embeddings": 8192, **c}


def _parameters(c: dict) -> int:
    """Parameters of a DeepSeek-V2 config, counted on the meta device (nothing allocated)."""
    from mmstack.formats import read_config
    from mmstack.model import build_model

    model = build_model(read_config({"model_type": "deepseek_v2", **c}), "meta")
    return sum(p.numel() for p in model.parameters())


def mla_moe_decode(size: str, device, dtype, against: str = "transformers", config: Optional[dict] = None,
                   prompts: Optional[list] = None, new_tokens: Optional[int] = None) -> list[Case]:
    """Args beyond the common ones: `config` (architecture fields, see `mla_config`), `prompts` (prompt
    lengths, each a case) and `new_tokens` (tokens per case), replacing the size's cases."""
    import transformers

    from mmstack.decoding import SamplingParams, generate_ids

    s = MLA_SIZES[size]
    c = mla_config(size, config)
    cases_spec = s["cases"]
    if prompts:
        cases_spec = tuple((p, new_tokens or cases_spec[0][1]) for p in prompts)
    elif new_tokens:
        cases_spec = tuple((p, new_tokens) for p, _ in cases_spec)
    too_long = [p + n for p, n in cases_spec if p + n > c["max_position_embeddings"]]
    if too_long:
        raise ValueError(f"prompt + new tokens ({max(too_long)}) exceed the config's max_position_embeddings "
                         f"({c['max_position_embeddings']})")
    n = _parameters(c)  # both models are built: transformers' in fp32 on the host, ours in `dtype` on `device`
    check_fits(f"the two models of this config ({n / 1e9:.2f} B parameters each)", 4 * n,
               2 * n * torch.finfo(dtype).bits // 8, device)
    cfg = transformers.DeepseekV2Config(**c)
    torch.manual_seed(0)
    hf = transformers.DeepseekV2ForCausalLM._from_config(cfg, attn_implementation="sdpa")
    hf, ours = _from_transformers(hf, device, dtype, min(0.08, c["hidden_size"] ** -0.5))
    lm = ours.language
    kv = lm.new_cache(1, 1).nbytes_per_token()
    m = lm.cfg.mla
    notes = [f"config: hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, {c['n_routed_experts']} experts"
             f" of {c['moe_intermediate_size']} (top-{c['num_experts_per_tok']}, {c['n_shared_experts']} shared),"
             f" {c['num_attention_heads']} heads, vocab {c['vocab_size']}",
             f"MLA latent cache: (kv_lora_rank {m.kv_lora_rank} + rope {m.qk_rope_head_dim}) x {lm.cfg.num_layers}"
             f" layers x {torch.finfo(dtype).bits // 8} B = {kv} B/token; transformers {transformers.__version__} caches"
             " the same latent but re-expands the whole cache through kv_b_proj at every step",
             f"transformers experts_implementation={getattr(hf.config, '_experts_implementation', None)}, attn sdpa;"
             " prefill = time to first token, decode = mean gap between later tokens"]
    cases = []
    for n_prompt, n_new in cases_spec:
        ids = torch.randint(3, c["vocab_size"], (1, n_prompt), generator=torch.Generator().manual_seed(0)).to(device)

        def run_ours(ids=ids, n_new=n_new):
            t0, times, toks = time.perf_counter(), [], []
            for tok in generate_ids(lm, SamplingParams(max_new_tokens=n_new), input_ids=ids):
                sync(device)
                times.append(time.perf_counter())
                toks.append(tok)
            return torch.stack(toks, 1), {"prefill_s": times[0] - t0, "decode_s": times[-1] - times[0]}

        def hf_side(impl: Optional[str], ids=ids, n_new=n_new, n_prompt=n_prompt) -> Contender:
            side = Contender(f"transformers ({impl or 'dynamic'} cache)", None)

            def run():
                clock = _Clock(device)
                t0 = time.perf_counter()
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                                  do_sample=False, eos_token_id=None, pad_token_id=0, cache_implementation=impl,
                                  streamer=clock, return_dict_in_generate=True)
                side.kv_bytes_per_token = side.kv_bytes_per_token or hf_kv_bytes_per_token(out.past_key_values)
                t = clock.times[1:]  # the first put is the prompt
                return out.sequences[:, n_prompt:], {"prefill_s": t[0] - t0, "decode_s": t[-1] - t[0]}

            side.run = run
            return side

        def first_logits(ids=ids):
            return lm.logits(lm(input_ids=ids)[:, -1]), hf(ids).logits[:, -1]

        cases.append(Case(
            name=f"prompt={n_prompt},new={n_new}", ours=Contender("mmstack", run_ours, kv_bytes_per_token=kv),
            theirs=[hf_side(None), hf_side("static")] if against == "transformers" else [],
            gate=_tokens_gate(dtype, first_logits), prefill_tokens=n_prompt, decode_tokens=n_new - 1,
            notes=notes if not cases else []))
    return cases


# ---------------------------------------------------------------------------------------------- vl2-prefill

VL2_SIZES = {
    "smoke": dict(tile=28, overrides={}, tiles=((1, 1), (2, 2))),
    "cpu": dict(tile=224, overrides=dict(
        vision_config=dict(image_size=224, width=128, layers=4, heads=4),
        projector_config=dict(input_dim=128, n_embed=256),
        language_config=dict(vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                             num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, n_routed_experts=64,
                             num_experts_per_tok=6, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                             v_head_dim=32)), tiles=((1, 1), (2, 1), (2, 2), (3, 2), (3, 3))),
    "full": dict(tile=384, overrides={}, tiles=((1, 1), (2, 1), (2, 2), (3, 2), (3, 3))),
}


def vl2_prefill(size: str, device, dtype, against: str = "transformers") -> list[Case]:
    import numpy as np
    from PIL import Image

    from mmstack import kernels
    from mmstack.formats import read_config
    from mmstack.loading import build_model
    from mmstack.variants import variant_config
    from mmstack.vision.embed import embed_vl2
    from mmstack.vision.tiling import TilingConfig, num_image_tokens, tile_image

    s = VL2_SIZES[size]
    raw = _merge(variant_config("deepseek-vl2-small", debug=size == "smoke"), s["overrides"])
    S = s["tile"]
    raw["candidate_resolutions"] = _tile_candidates(S)
    torch.manual_seed(0)
    model = build_model(read_config(raw), device, dtype).eval()
    lm = model.language
    tc = TilingConfig(candidate_resolutions=raw["candidate_resolutions"], patch_size=14, downsample_ratio=2, image_size=S)
    kv = lm.new_cache(1, 1).nbytes_per_token()
    rng = np.random.default_rng(0)
    cases = []
    for tw, th in s["tiles"]:
        img = Image.fromarray(rng.integers(0, 255, (th * S, tw * S, 3), dtype=np.uint8))
        n_img = num_image_tokens(tw, th, S, 14, 2)
        ids = torch.tensor([[BOS] + [10 + i for i in range(8)] + [IMG] * n_img + [20 + i for i in range(8)]], device=device)
        seq_mask = ids == IMG
        crop = torch.tensor([[[tw, th]]])

        def run(ids=ids, seq_mask=seq_mask, crop=crop, img=img):
            t0 = time.perf_counter()
            tiles = tile_image(img, tc, tc.tiles_for(img.size)).to(device, dtype)  # [1 + tw*th, 3, S, S]
            sync(device)
            t1 = time.perf_counter()
            emb = embed_vl2(model, ids, tiles[None], seq_mask, crop)
            sync(device)
            t2 = time.perf_counter()
            cache = lm.new_cache(1, ids.shape[1])
            logits = lm.logits(lm(inputs_embeds=emb, cache=cache)[:, -1])
            sync(device)
            t3 = time.perf_counter()
            return logits, {"prefill_s": t3 - t1, "tiling_s": t1 - t0, "vision_s": t2 - t1, "llm_prefill_s": t3 - t2}

        def run_loop(run=run):
            with kernels.use_backend("moe", "reference"):
                return run()

        cases.append(Case(
            name=f"{tw}x{th} tiles ({ids.shape[1]} tokens)",
            ours=Contender("mmstack (grouped MoE)", run, kv_bytes_per_token=kv),
            theirs=[Contender("mmstack (expert loop)", run_loop, kv_bytes_per_token=kv)],
            gate=lambda a, b: _close(a, b, dtype), prefill_tokens=ids.shape[1],
            notes=["prefill = vision tower + projector + LLM prefill (tiling excluded, in e2e); 1 global + tw*th local"
                   " tiles; attention through SDPA in the ViT (timm) and the LLM"] if (tw, th) == s["tiles"][0] else []))
    return cases


# ---------------------------------------------------------------------------------------------- janusflow-t2i

FLOW_SIZES = {
    "smoke": dict(overrides={}, steps=3, prompt=8, debug=True),
    "cpu": dict(overrides=dict(
        vision_und_enc_config=dict(params=dict(image_size=128)),
        vision_gen_enc_config=dict(params=dict(block_out_channels=[64], hidden_size=256)),
        vision_gen_dec_config=dict(params=dict(in_channels=64, block_out_channels=[64], hidden_size=256)),
        language_config=dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=4)), steps=30, prompt=32, debug=True),
    "full": dict(overrides={}, steps=30, prompt=32, debug=False),  # JanusFlow-1.3B
}


def janusflow_t2i(size: str, device, dtype, against: str = "transformers") -> list[Case]:
    from mmstack.formats import read_config
    from mmstack.generation.flow import generate_latents
    from mmstack.loading import build_model
    from mmstack.variants import variant_config

    s = FLOW_SIZES[size]
    raw = _merge(variant_config("janusflow-1.3b", debug=s["debug"]), s["overrides"])
    torch.manual_seed(0)
    model = build_model(read_config(raw), device, dtype).eval()
    fc = model.flow_head.cfg
    side = fc.image_size // fc.vae_downsample
    z0 = torch.randn(1, fc.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
    vocab = model.language.cfg.vocab_size
    prompt = [BOS] + [10 + (7 * i) % (vocab - 10) for i in range(s["prompt"] - 1)]
    steps = s["steps"]

    def run(reuse: bool):
        return generate_latents(model, prompt, 1, PAD, steps=steps, cfg_weight=2.0, z0=z0, reuse_prompt_kv=reuse), {}

    kv = model.language.new_cache(1, 1).nbytes_per_token()
    g = side // 2
    return [Case(
        name=f"{steps} steps, {g * g} latent tokens", ours=Contender("mmstack (prompt-KV reuse)", lambda: run(True), kv_bytes_per_token=kv),
        theirs=[Contender("mmstack (full recompute, official)", lambda: run(False), kv_bytes_per_token=kv)],
        gate=lambda a, b: _close(a, b, dtype), decode_tokens=steps,
        notes=[f"decode ms/tok is ms per Euler step (LLM over 1 + {g * g} tokens, CFG batch 2; prompt {len(prompt) - 1}"
               " tokens computed once with reuse, every step without)"])]


SUITES: dict[str, Callable[..., list[Case]]] = {
    "janus-t2i": janus_t2i,
    "mla-moe-decode": mla_moe_decode,
    "vl2-prefill": vl2_prefill,
    "janusflow-t2i": janusflow_t2i,
}

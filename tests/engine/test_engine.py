"""The continuous-batching engine against the reference one-request loops (`decoding.generate_ids`,
`generation.sampler.generate_codes`, `generation.flow.generate_latents`), on the official golden models:
a request's output does not depend on what it is batched with, when it arrives, or how its prompt is chunked.
"""
from __future__ import annotations

import pytest
import torch

import mmstack
from mmstack.decoding import generate_ids
from mmstack.engine import Engine, EngineBusy, EngineConfig, FlowImageRequest, TextRequest, VQImageRequest
from mmstack.errors import GenerationError
from mmstack.generation.flow import flow_prompt, generate_latents
from mmstack.generation.sampler import cfg_rows, generate_codes
from golden import fixture_image, golden_dir, tokenizer_for

TEXTS = ["Hello world", "The quick brown fox jumps over", "a", "One two three four five six seven eight nine ten",
         "zebra", "What is in the picture?"]


def _load(name: str):
    d = golden_dir() / name
    return mmstack.load(d, device="cpu", dtype=torch.float32, tokenizer=tokenizer_for(d))


@pytest.fixture(scope="module", params=["vl2_tiny_mla_moe", "vl2_tiny_mha_moe", "janus_pro_tiny"])
def text_pipe(request):
    return _load(request.param)


def _reference_text(pipe, ids, params):
    stops = set(params.stop_token_ids)
    out = []
    for t in generate_ids(pipe.model.language, params, input_ids=torch.tensor([ids])):
        if int(t[0]) in stops:
            break
        out.append(int(t[0]))
    return out


def _staggered(engine, requests, every: int = 2):
    """Submit one request every `every` engine steps, so requests join a running batch."""
    handles = []
    pending = list(requests)
    while pending or engine.active or engine.waiting:
        if pending:
            handles.append(engine.submit(pending.pop(0)))
        for _ in range(every):
            if engine.active or engine.waiting:
                engine.step()
    return handles


@pytest.mark.parametrize("chunk", [3, 512])
def test_greedy_text_requests_batched_and_joining_late_equal_the_reference(text_pipe, chunk):
    pipe = text_pipe
    params = pipe._params(dict(max_new_tokens=12))
    prompts = [pipe.tokenizer.encode(t) for t in TEXTS]
    want = [_reference_text(pipe, p, params) for p in prompts]
    eng = Engine(pipe.model, EngineConfig(max_rows=4, prefill_chunk=chunk), background=False)
    handles = _staggered(eng, [TextRequest(params, prompt_ids=p) for p in prompts])
    assert [h.result().token_ids for h in handles] == want
    assert eng.load["rows_used"] == 0  # every row was freed


def test_seeded_sampling_is_the_same_alone_and_batched(text_pipe):
    pipe = text_pipe
    prompts = [pipe.tokenizer.encode(t) for t in TEXTS[:4]]
    params = [pipe._params(dict(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=s)) for s in range(4)]
    alone = []
    for p, sp in zip(prompts, params):
        eng = Engine(pipe.model, EngineConfig(max_rows=1), background=False)
        h = eng.submit(TextRequest(sp, prompt_ids=p))
        eng.run_until_idle()
        alone.append(h.result().token_ids)
    eng = Engine(pipe.model, EngineConfig(max_rows=4, prefill_chunk=2), background=False)
    handles = _staggered(eng, [TextRequest(sp, prompt_ids=p) for p, sp in zip(prompts, params)], every=1)
    assert [h.result().token_ids for h in handles] == alone
    assert len({tuple(a) for a in alone}) > 1  # the seeds differ, so do the samples


def test_static_decode_steps_equal_dynamic_ones(text_pipe):
    pipe = text_pipe
    params = pipe._params(dict(max_new_tokens=8))
    prompts = [pipe.tokenizer.encode(t) for t in TEXTS[:3]]
    out = {}
    for mode in ("eager", "static"):
        eng = Engine(pipe.model, EngineConfig(max_rows=4, decode_mode=mode), background=False)
        handles = _staggered(eng, [TextRequest(params, prompt_ids=p) for p in prompts], every=1)
        out[mode] = [h.result().token_ids for h in handles]
    assert out["eager"] == out["static"]


def test_image_chat_batched_equals_alone_and_the_golden_pipeline():
    pipe = _load("vl2_tiny_mla_moe")
    img = fixture_image(golden_dir() / "vl2_tiny_mla_moe")
    convs = [[{"role": "user", "content": [{"type": "image", "path": str(img)}, {"type": "text", "text": q}]}]
             for q in ("Describe this image.", "What colour is it?", "Count the objects")]
    params = pipe._params(dict(max_new_tokens=10))
    want = []
    for c in convs:  # the reference: embeddings through the pipeline, then the one-request loop
        emb, _, _ = pipe.encode([c])
        toks = [int(t[0]) for t in generate_ids(pipe.model.language, params, inputs_embeds=emb)]
        want.append(toks[: next((k for k, t in enumerate(toks) if t in params.stop_token_ids), len(toks))])
    batches = [pipe.understanding.prepare([c])[0] for c in convs]
    eng = Engine(pipe.model, EngineConfig(max_rows=3, prefill_chunk=64), background=False)
    handles = [eng.submit(TextRequest(params, batch=b)) for b in batches]  # admitted and embedded together
    eng.run_until_idle()
    assert [h.result().token_ids for h in handles] == want


def test_vq_image_requests_match_the_reference_sampler_batched_with_text():
    pipe = _load("janus_pro_tiny")
    head, pad = pipe.cfg.vq_head, pipe.generation.pad_id()
    n_tok = pipe.generation.grid("vq") ** 2
    ids = [pipe.generation_prompt_ids(t, "vq") for t in ("a red square", "two green circles on blue")]
    want = [generate_codes(pipe.model, ids[0], 2, n_tok, pad, 5.0, 0.0, None),
            generate_codes(pipe.model, ids[1], 1, n_tok, pad, 5.0, 1.0, 7)]
    eng = Engine(pipe.model, EngineConfig(max_rows=8, prefill_chunk=5), background=False)
    reqs = [VQImageRequest(cfg_rows(ids[0], 2, pad), 2, n_tok, 5.0, 0.0, None),
            TextRequest(pipe._params(dict(max_new_tokens=20)), prompt_ids=ids[1]),
            VQImageRequest(cfg_rows(ids[1], 1, pad), 1, n_tok, 5.0, 1.0, 7)]
    handles = _staggered(eng, reqs, every=3)
    assert torch.equal(handles[0].result().codes, want[0])
    assert torch.equal(handles[2].result().codes, want[1])
    assert head.row_layout == "interleaved"


def test_flow_image_requests_match_the_reference_euler_loop():
    pipe = _load("janusflow_tiny")
    fh, pad = pipe.cfg.flow_head, pipe.generation.pad_id()
    g = pipe.generation.grid("flow")
    side = fh.image_size // fh.vae_downsample
    cases = [("a cat", 1, 3, 1), ("a dog on a sunny day in the park", 2, 5, 2)]
    eng = Engine(pipe.model, EngineConfig(max_rows=8, prefill_chunk=4), background=False)
    reqs, want = [], []
    for text, n, steps, seed in cases:
        ids = pipe.generation_prompt_ids(text, "flow")
        z0 = torch.randn(n, fh.latent_channels, side, side, generator=torch.Generator().manual_seed(seed))
        want.append(generate_latents(pipe.model, ids, n, pad, steps, 2.0, z0=z0))
        rows, mask = flow_prompt(ids, n, pad)
        reqs.append(FlowImageRequest(rows, mask, n, steps, 2.0, z0, g * g + 1))
    handles = _staggered(eng, reqs + [TextRequest(pipe._params(dict(max_new_tokens=6)), prompt_ids=[1, 5, 9])], 1)
    for h, w in zip(handles, want):  # fp32; the batched forward reorders sums only (README tolerance 1e-4)
        assert (h.result().latents - w).abs().max().item() < 1e-5


def test_cancel_frees_the_rows_and_leaves_the_others_alone():
    pipe = _load("vl2_tiny_mla_moe")
    params = pipe._params(dict(max_new_tokens=30))
    prompts = [pipe.tokenizer.encode(t) for t in TEXTS[:3]]
    want = _reference_text(pipe, prompts[2], params)
    eng = Engine(pipe.model, EngineConfig(max_rows=3), background=False)
    handles = [eng.submit(TextRequest(params, prompt_ids=p)) for p in prompts]
    for _ in range(4):
        eng.step()
    handles[0].cancel()
    handles[1].cancel()
    eng.step()
    assert eng.load["rows_used"] == 1
    eng.run_until_idle()
    assert handles[0].result().finish_reason == "cancelled" and len(handles[0].result().token_ids) < 30
    assert handles[2].result().token_ids == want


def test_a_full_queue_answers_busy_and_a_request_too_large_is_refused():
    pipe = _load("vl2_tiny_mla_moe")
    params = pipe._params(dict(max_new_tokens=4))
    eng = Engine(pipe.model, EngineConfig(max_rows=1, max_waiting=2, max_seq_len=64), background=False)
    for _ in range(2):
        eng.submit(TextRequest(params, prompt_ids=[1, 2, 3]))
    with pytest.raises(EngineBusy, match="busy"):
        eng.submit(TextRequest(params, prompt_ids=[1, 2, 3]))
    with pytest.raises(GenerationError, match="needs 4 cache rows"):
        eng.submit(VQImageRequest(torch.ones(4, 3, dtype=torch.long), 2, 8, 5.0, 0.0))
    with pytest.raises(GenerationError, match="positions"):
        eng.submit(TextRequest(pipe._params(dict(max_new_tokens=100)), prompt_ids=[1, 2, 3]))
    eng.run_until_idle()


def test_a_long_prefill_runs_in_chunks_while_decodes_keep_flowing():
    pipe = _load("vl2_tiny_mla_moe")
    eng = Engine(pipe.model, EngineConfig(max_rows=2, prefill_chunk=8), background=False)
    short = eng.submit(TextRequest(pipe._params(dict(max_new_tokens=40)), prompt_ids=[1, 2, 3]))
    eng.step()
    eng.step()
    long_ids = list(range(5, 5 + 200))
    eng.submit(TextRequest(pipe._params(dict(max_new_tokens=2)), prompt_ids=long_ids))
    counts = []
    for _ in range(10):  # 200 prompt tokens in chunks of 8: the prefill is still running
        eng.step()
        counts.append(len([a for a in eng.active if a.handle is short][0].tokens))
    assert eng.prefill is not None
    assert counts == list(range(counts[0], counts[0] + 10))  # one token per step, every step
    eng.run_until_idle()


def test_the_pipeline_runs_concurrent_callers_on_one_engine():
    import concurrent.futures as cf

    pipe = _load("vl2_tiny_mla_moe")
    alone = [pipe.complete(t, max_new_tokens=10) for t in TEXTS]
    with cf.ThreadPoolExecutor(6) as ex:
        together = list(ex.map(lambda t: pipe.complete(t, max_new_tokens=10), TEXTS))
    assert together == alone
    assert pipe.engine.steps > 0

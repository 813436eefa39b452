"""The engine on a GPU: decode steps replayed from CUDA graphs (one per batch-size bucket) give the tokens of the
eager steps, for MLA + MoE text requests joining a running batch and for Janus VQ image requests (random
weights at the debug sizes of the released variants; the golden fixtures do not travel to the device)."""
from __future__ import annotations

import pytest
import torch

from mmstack.decoding import SamplingParams
from mmstack.engine import Engine, EngineConfig, TextRequest, VQImageRequest
from mmstack.formats import read_config
from mmstack.generation.sampler import cfg_rows
from mmstack.model import build_model
from mmstack.testing import randomise_weights
from mmstack.variants import variant_config


def _model(name: str, dtype):
    torch.manual_seed(0)
    m = build_model(read_config(variant_config(name, debug=True)), device="cuda", dtype=dtype)
    randomise_weights(m, 0.08)
    m.language.fuse_projections()
    return m.eval()


def _run(model, requests, mode: str):
    eng = Engine(model, EngineConfig(max_rows=16, prefill_chunk=7, decode_mode=mode), background=False)
    handles, pending = [], list(requests)
    while pending or eng.active or eng.waiting:
        if pending:
            handles.append(eng.submit(pending.pop(0)))
        eng.step()
    if mode == "cuda_graph":  # the steps really replayed captured graphs (no silent fallback to eager)
        assert eng._static is not None and not eng._static.failed and eng._static.graphs
    return [h.result() for h in handles]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_graph_decode_equals_eager_for_text_requests_joining_late(dtype):
    m = _model("deepseek-vl2-small", dtype)  # MLA + MoE
    reqs = lambda: [TextRequest(SamplingParams(max_new_tokens=12 + k), prompt_ids=torch.randint(  # noqa: E731
        3, 500, (5 + 3 * k,), generator=torch.Generator().manual_seed(k)).tolist()) for k in range(6)]
    eager = [r.token_ids for r in _run(m, reqs(), "eager")]
    graph = [r.token_ids for r in _run(m, reqs(), "cuda_graph")]
    assert graph == eager


@pytest.mark.gpu
def test_cuda_graph_decode_equals_eager_for_vq_images():
    m = _model("janus-pro-1b", torch.float32)
    n_tok = (m.cfg.vq_head.image_size // m.vq.cfg.downsample) ** 2
    prompt = [1, 7, 9, 11, 4]
    reqs = lambda: [VQImageRequest(cfg_rows(prompt, 2, 0), 2, n_tok, 5.0, 1.0, seed=3),  # noqa: E731
                    VQImageRequest(cfg_rows(prompt[:3] + [4], 1, 0), 1, n_tok, 5.0, 0.0)]
    eager = _run(m, reqs(), "eager")
    graph = _run(m, reqs(), "cuda_graph")
    for a, b in zip(eager, graph):
        assert torch.equal(a.codes, b.codes)

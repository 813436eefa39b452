"""Fast decode paths against the plain ones: the static-cache step (what a CUDA graph or torch.compile
captures) equals the dynamic step, the compiled step traces without a graph break, failures fall back to
eager, and packed projections (one matmul for q/k/v and gate/up) equal separate layers and never go stale."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from mmstack import kernels
from mmstack.decoding import SamplingParams, generate_ids
from mmstack.llm import DecodeStep
from mmstack.llm.fused import fused
from test_llm import KINDS, _model


def _decode(m, mode, steps=6, **step_kw):
    """Left-padded batch: dynamic prefill of 6 tokens, then `steps` one-token steps in `mode`."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (2, 6 + steps), generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :3] = 0
    cache = m.new_cache(2, 6 + steps)
    with torch.no_grad():
        hs = [m(input_ids=ids[:, :6], attention_mask=mask, cache=cache)[:, -1]]
        step = DecodeStep(m, cache, mode=mode, **step_kw)
        for t in range(6, 6 + steps):
            hs.append(step(input_ids=ids[:, t : t + 1]))
    return torch.stack(hs), step, cache


@pytest.mark.parametrize("kind", KINDS)
def test_static_cache_step_equals_dynamic_step(kind):
    m = _model(kind)
    eager, _, c1 = _decode(m, "eager")
    static, step, c2 = _decode(m, "static")
    assert step.mode == "static" and c2.static and c2.length == c1.length == 12
    torch.testing.assert_close(static, eager, atol=2e-5, rtol=1e-5)


def test_compiled_step_traces_whole_and_matches():
    """fullgraph=True: the static step has no host sync or data-dependent Python (with the sync-free MoE
    backend a GPU uses), so one graph covers it; backend "eager" checks the trace without a compiler."""
    torch._dynamo.reset()
    m = _model("mla_qlora_sigmoid")
    with kernels.use_backend("moe", "gather"):
        eager, _, _ = _decode(m, "eager")
        compiled, step, _ = _decode(m, "compile", compile_backend="eager")
    assert step.mode == "compile"
    torch.testing.assert_close(compiled, eager, atol=2e-5, rtol=1e-5)


def test_failed_compile_falls_back_to_eager_with_a_warning(caplog, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no compiler here")

    m = _model("mla")
    eager, _, _ = _decode(m, "eager")
    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level(logging.WARNING):
        out, step, cache = _decode(m, "compile")
    assert step.mode == "eager" and not cache.static
    assert "running eagerly" in caplog.text
    torch.testing.assert_close(out, eager, atol=2e-5, rtol=1e-5)


def test_cuda_graph_mode_without_cuda_runs_eagerly(caplog):
    m = _model("mha")
    with caplog.at_level(logging.WARNING):
        step = DecodeStep(m, m.new_cache(1, 4), mode="cuda_graph")
    assert step.mode == "eager" and "needs a CUDA device" in caplog.text
    with pytest.raises(ValueError, match="decode mode"):
        DecodeStep(m, m.new_cache(1, 4), mode="fast")


def test_generate_ids_is_the_same_in_every_decode_mode():
    m = _model("mla")
    ids = torch.randint(3, 96, (1, 9))
    runs = {mode: torch.stack(list(generate_ids(m, SamplingParams(max_new_tokens=8), input_ids=ids,
                                                decode_mode=mode))) for mode in ("eager", "static")}
    assert torch.equal(runs["eager"], runs["static"])


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["cuda_graph", "compile"])
def test_graph_modes_on_cuda_match_eager(mode):
    m = _model("mla_qlora_sigmoid").cuda()
    ids = torch.randint(3, 96, (2, 8), device="cuda")
    out = {}
    for md in ("eager", mode):
        torch.manual_seed(0)
        out[md] = torch.stack(list(generate_ids(m, SamplingParams(max_new_tokens=12), input_ids=ids, decode_mode=md)))
    assert torch.equal(out[mode], out["eager"])


# ---------------------------------------------------------------------------------------------- packed projections


def _packed_model(kind):
    m = _model(kind)
    assert m.fuse_projections() > 0
    return m


@pytest.mark.parametrize("kind", KINDS)
def test_packed_projections_equal_separate_layers(kind):
    m = _packed_model(kind)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        fast = m.logits(m(input_ids=ids))
    ref = _model(kind)  # same seed, never packed
    with torch.no_grad():
        plain = ref.logits(ref(input_ids=ids))
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    assert set(m.state_dict()) == set(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k


def test_packed_projections_follow_updates_and_step_aside_for_wrappers():
    m = _packed_model("mha")
    attn = m.layers[0].self_attn
    x = torch.randn(2, 3, 48)
    with torch.no_grad():
        q, k, v = fused(attn, attn.input_projections, x)
        torch.testing.assert_close(k, attn.k_proj(x))
        attn.k_proj.weight.data.mul_(2.0)  # an update that bypasses autograd (e.g. a LoRA merge)
        torch.testing.assert_close(fused(attn, attn.input_projections, x)[1], attn.k_proj(x))
    assert fused(attn, attn.input_projections, x) is None  # gradients enabled: the plain layers run
    with torch.no_grad():
        attn.v_proj = nn.Sequential(attn.v_proj)  # a wrapper (as peft does): not a plain Linear any more
        assert fused(attn, attn.input_projections, x) is None
        m.layers[0].mlp.gate_proj.weight = nn.Parameter(torch.zeros_like(m.layers[0].mlp.gate_proj.weight))
        assert fused(m.layers[0].mlp, m.layers[0].mlp.input_projections, x) is None  # re-assigned: not a view


def test_packed_projections_are_repacked_after_a_move():
    m = _packed_model("mla")
    m.to(torch.float64)
    mla = m.layers[0].self_attn
    x = torch.randn(1, 2, 48, dtype=torch.float64)
    with torch.no_grad():
        out = fused(mla, mla.input_projections, x)
        assert out is not None and out[0].dtype == torch.float64
        torch.testing.assert_close(out[1], mla.kv_a_proj_with_mqa(x))


@pytest.mark.parametrize("compiled_wins", [True, False])
def test_cpu_auto_measures_a_repeated_shape_once_and_keeps_the_faster_step(compiled_wins, monkeypatch):
    """CPU "auto": the first TUNE_AFTER_USES - 1 generations of a shape stay eager (no compile), the next one
    times eager against compiled steps mid-generation and keeps the winner for that shape on that model (a
    loser compiled step hands back to the dynamic cache); every generation gives the eager tokens."""
    from mmstack.llm import step as step_mod

    torch._dynamo.reset()
    monkeypatch.setattr(step_mod, "prefer_compiled", lambda e, c: compiled_wins)
    built = []
    real_compile = DecodeStep._compile
    monkeypatch.setattr(DecodeStep, "_compile", lambda self, *a: built.append(1) or real_compile(self, *a))
    m = _model("mla")
    n = step_mod.TUNE_STEPS * 2 + 4
    with kernels.use_backend("moe", "gather"):
        want, _, _ = _decode(m, "eager", steps=n)
        for use in range(1, step_mod.TUNE_AFTER_USES + 2):
            got, step, cache = _decode(m, "auto", steps=n, compile_backend="eager")
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
            (entry,) = m._decode_choices.values()
            assert entry["uses"] == use
            if use < step_mod.TUNE_AFTER_USES:
                assert entry["choice"] is None and not built and step.mode == "eager"
            else:
                assert entry["choice"] == ("compile" if compiled_wins else "eager")
                assert step.mode == entry["choice"] and cache.static == compiled_wins
    assert len(built) == 1 + (1 if compiled_wins else 0)  # measured once; the winner is rebuilt per generation


def test_cpu_auto_records_eager_when_compiling_fails(monkeypatch):
    from mmstack.llm import step as step_mod

    monkeypatch.setattr(torch, "compile", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no compiler")))
    m = _model("mha")
    n = step_mod.TUNE_STEPS + 4
    want, _, _ = _decode(m, "eager", steps=n)
    for _ in range(step_mod.TUNE_AFTER_USES):
        got, step, cache = _decode(m, "auto", steps=n)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    (entry,) = m._decode_choices.values()
    assert entry["choice"] == "eager" and step.mode == "eager" and not cache.static

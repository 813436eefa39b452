"""The Triton `mla_decode` backend against the reference, on CPU through Triton's interpreter
(TRITON_INTERPRET=1, set in a subprocess so that no other test sees interpreted kernels), and on CUDA
when a GPU is present. fp32 within 1e-5 (accumulation order only); fp16 within 2e-3 of the fp32 reference."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

from mmstack import kernels  # noqa: E402
from mmstack.kernels import triton_backends  # noqa: E402

CHECK = textwrap.dedent("""
    import os
    assert os.environ["TRITON_INTERPRET"] == "1"
    import torch
    from mmstack import kernels

    NEG = torch.finfo(torch.float32).min
    torch.manual_seed(0)
    cases = [  # B, H, T, S, C, R, mask kind, dtype
        (2, 4, 1, 13, 16, 8, None, torch.float32),
        (2, 4, 3, 40, 24, 8, "causal+pad", torch.float32),   # C not a power of two, chunked-prefill shape
        (1, 16, 1, 150, 64, 16, "pad", torch.float32),       # S spans several blocks
        (2, 3, 1, 9, 16, 8, "all", torch.float32),            # a row that sees no key: finite, as the reference
        (2, 3, 2, 70, 32, 8, None, torch.float16),
    ]
    for b, h, t, s, c, r, kind, dt in cases:
        q, qp = torch.randn(b, h, t, c, dtype=dt), torch.randn(b, h, t, r, dtype=dt)
        lat, kp = torch.randn(b, s, c, dtype=dt), torch.randn(b, s, r, dtype=dt)
        mask = None
        if kind is not None:
            keep = torch.ones(b, 1, t, s, dtype=torch.bool)
            if "causal" in kind:
                keep = keep.tril(s - t)
            if "pad" in kind:
                keep[-1, ..., :5] = False
            if kind == "all":
                keep[0] = False
            mask = torch.zeros(b, 1, t, s).masked_fill(~keep, NEG)
        assert kernels.mla_decode.select(q, qp, lat, kp, mask, 0.2) == "triton"
        out = kernels.mla_decode.get("triton")(q, qp, lat, kp, mask, 0.2)
        ref = kernels.mla_decode.get("reference")(q.float(), qp.float(), lat.float(), kp.float(), mask, 0.2)
        assert out.dtype == dt and out.shape == ref.shape
        assert torch.isfinite(out).all()
        tol = 1e-5 if dt == torch.float32 else 2e-3
        torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)

    # in a model: cached greedy decode through the kernel equals the PyTorch backend
    from mmstack.config import LMConfig, MLAConfig, MoEConfig, RopeConfig
    from mmstack.llm import LanguageModel
    cfg = LMConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
                   moe=MoEConfig(4, 2, 16, 1, 1), attention="mla", mla=MLAConfig(None, 16, 8, 8, 8),
                   rope=RopeConfig(style="interleaved"))
    m = LanguageModel(cfg).eval()
    ids = torch.randint(0, 64, (2, 7))
    outs = {}
    for backend in ("triton", "bmm"):
        with torch.no_grad(), kernels.use_backend("mla_decode", backend):
            cache = m.new_cache(2, 12)
            hs = [m(input_ids=ids, cache=cache)[:, -1]]
            for i in range(4):
                hs.append(m(input_ids=ids[:, i:i + 1], cache=cache)[:, -1])
        outs[backend] = torch.stack(hs)
    torch.testing.assert_close(outs["triton"], outs["bmm"], atol=1e-5, rtol=1e-5)
    print("OK")
""")


def test_triton_mla_decode_matches_reference_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


def test_triton_backend_is_registered_and_left_alone_for_cpu_tensors():
    """Registered when triton imports; CPU tensors use it only in the interpreter (the subprocess above)."""
    args = (torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 4), torch.zeros(1, 5, 8), torch.zeros(1, 5, 4), None, 1.0)
    assert triton_backends.available() and "triton" in kernels.mla_decode.backends
    if not triton_backends._INTERPRETED:
        assert kernels.mla_decode.select(*args) == "bmm"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_mla_decode_matches_reference_on_cuda(dtype):
    b, h, t, s, c, r = 2, 16, 1, 300, 512, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q, qp = torch.randn(b, h, t, c, device="cuda", generator=g), torch.randn(b, h, t, r, device="cuda", generator=g)
    lat, kp = torch.randn(b, s, c, device="cuda", generator=g), torch.randn(b, s, r, device="cuda", generator=g)
    keep = torch.ones(b, 1, t, s, dtype=torch.bool, device="cuda")
    keep[1, ..., :7] = False
    mask = torch.zeros(b, 1, t, s, device="cuda").masked_fill(~keep, torch.finfo(torch.float32).min)
    args = [x.to(dtype) for x in (q, qp, lat, kp)]
    assert kernels.mla_decode.select(*args, mask, 0.05) == "triton"
    out = kernels.mla_decode.get("triton")(*args, mask, 0.05)
    ref = kernels.mla_decode.get("reference")(*[x.float() for x in args], mask, 0.05)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)

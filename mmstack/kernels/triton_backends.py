"""Triton backends, registered behind the reference signatures when triton is importable.

`mla_decode` ("triton"): absorbed MLA attention on the latent cache in one kernel. The latent is a single
key/value head shared by every query head, so a program takes a block of (head, query) rows of one batch
element and streams the cache once for all of them: scores = q_latent . latent + q_pe . k_pe, an online
softmax (FlashAttention-style running max and sum) and the weighted latent sum, all without writing the
[B, H, T, S] scores to memory. Used for CUDA tensors, and for CPU tensors under TRITON_INTERPRET=1 (how
tests/test_triton_kernels.py checks it against the reference on machines without a GPU).

Notation: B batch, H heads, T query tokens, S cached tokens, C kv_lora_rank, R rope dims, M = H*T rows.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from . import reference as ref

try:  # the kernels are defined at import (so torch.compile can trace their launch); triton is optional
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - triton missing or broken
    triton = None

# TRITON_INTERPRET is read when a kernel is defined: CPU tensors can use it only if it was set by then
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available() -> bool:
    """True when triton imported."""
    return triton is not None


def _mla_ok(q_latent, q_pe, latent, k_pe, mask=None, scale=None) -> bool:
    if triton is None or latent.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    return latent.device.type == "cuda" or (latent.device.type == "cpu" and _INTERPRETED)


if triton is not None:

    @triton.jit
    def mla_decode_kernel(
        q_ptr, qpe_ptr, lat_ptr, kpe_ptr, mask_ptr, out_ptr,
        T, S, M, C, R, scale,
        sq_b, sq_h, sq_t, sqp_b, sqp_h, sqp_t,
        sl_b, sl_s, sk_b, sk_s,
        sm_b, sm_t, sm_s,
        so_b, so_h, so_t,
        HAS_MASK: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        b = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] row = h * T + t
        h, t = rows // T, rows % T
        row_ok = rows < M
        cc, rr = tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_R)
        q = tl.load(q_ptr + b * sq_b + h[:, None] * sq_h + t[:, None] * sq_t + cc[None, :],
                    mask=row_ok[:, None] & (cc[None, :] < C), other=0.0)  # [BM, BC]
        qp = tl.load(qpe_ptr + b * sqp_b + h[:, None] * sqp_h + t[:, None] * sqp_t + rr[None, :],
                     mask=row_ok[:, None] & (rr[None, :] < R), other=0.0)  # [BM, BR]
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
        fmin = -3.4028234663852886e38  # the reference clamps masked scores here: finite, never NaN
        for s0 in range(0, S, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            s_ok = ss < S
            lat = tl.load(lat_ptr + b * sl_b + ss[:, None] * sl_s + cc[None, :],
                          mask=s_ok[:, None] & (cc[None, :] < C), other=0.0)  # [BS, BC]
            kp = tl.load(kpe_ptr + b * sk_b + ss[:, None] * sk_s + rr[None, :],
                         mask=s_ok[:, None] & (rr[None, :] < R), other=0.0)  # [BS, BR]
            if IEEE:
                sc = tl.dot(q, tl.trans(lat), input_precision="ieee") + tl.dot(qp, tl.trans(kp), input_precision="ieee")
            else:
                sc = tl.dot(q, tl.trans(lat)) + tl.dot(qp, tl.trans(kp))
            sc = sc * scale  # [BM, BS] fp32
            if HAS_MASK:
                mk = tl.load(mask_ptr + b * sm_b + t[:, None] * sm_t + ss[None, :] * sm_s,
                             mask=row_ok[:, None] & s_ok[None, :], other=0.0)
                sc = tl.maximum(sc + mk, fmin)
            sc = tl.where(s_ok[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            p = tl.exp(sc - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(lat.dtype), lat, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(lat.dtype), lat)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(out_ptr + b * so_b + h[:, None] * so_h + t[:, None] * so_t + cc[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (cc[None, :] < C))


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(n, 1) - 1).bit_length())


def mla_decode_triton(q_latent: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
                      mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """Same contract as `reference.mla_decode`: [B,H,T,C] attention-weighted latent."""
    b, h, t, c = q_latent.shape
    s, r = latent.shape[1], k_pe.shape[-1]
    q_pe = q_pe.to(latent.dtype)
    q_latent = q_latent.to(latent.dtype)
    if q_latent.stride(-1) != 1:
        q_latent = q_latent.contiguous()
    if q_pe.stride(-1) != 1:
        q_pe = q_pe.contiguous()
    if latent.stride(-1) != 1:
        latent = latent.contiguous()
    if k_pe.stride(-1) != 1:
        k_pe = k_pe.contiguous()
    out = torch.empty(b, h, t, c, device=latent.device, dtype=latent.dtype)
    has_mask = mask is not None
    if has_mask:
        mask = mask.float().expand(b, 1, t, s)
        ms = (mask.stride(0), mask.stride(2), mask.stride(3))
    else:
        mask, ms = out, (0, 0, 0)  # a placeholder pointer, never read
    m_rows = h * t
    block_m = 16
    grid = (b, triton.cdiv(m_rows, block_m))
    mla_decode_kernel[grid](
        q_latent, q_pe, latent, k_pe, mask, out,
        t, s, m_rows, c, r, float(scale),
        q_latent.stride(0), q_latent.stride(1), q_latent.stride(2), q_pe.stride(0), q_pe.stride(1), q_pe.stride(2),
        latent.stride(0), latent.stride(1), k_pe.stride(0), k_pe.stride(1),
        *ms,
        out.stride(0), out.stride(1), out.stride(2),
        HAS_MASK=has_mask, IEEE=latent.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_S=32 if c > 256 else 64, BLOCK_C=_pow2(c), BLOCK_R=_pow2(r),
    )
    return out


if triton is not None:
    ref.mla_decode.register("triton", predicate=_mla_ok, priority=20)(mla_decode_triton)

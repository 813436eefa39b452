"""`mmstack.kernels`: the small set of operations every path calls, each with a reference and backends.

    from mmstack import kernels
    y = kernels.attention(q, k, v, causal=True)
    with kernels.use_backend("moe", "loop"): ...
"""
from .registry import KERNELS, Kernel, kernel, use_backend
from .reference import attention, mla_decode, moe, rms_norm, rope, swiglu_expert
from . import torch_backends  # noqa: F401  (registers the PyTorch backends)
from . import triton_backends  # noqa: F401  (registers the Triton backends; triton is imported on first use)
from .sampling import sample

__all__ = [
    "KERNELS", "Kernel", "kernel", "use_backend",
    "attention", "mla_decode", "moe", "rms_norm", "rope", "sample", "swiglu_expert",
]

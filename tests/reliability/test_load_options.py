"""`mmstack.load` options (round 3 of the adversarial cases, docs/limits.md): a device this machine lacks is a
`ValueError` naming the device before anything is built (torch used to fail deep inside the first `.to()`, with
"Found no NVIDIA driver" or "Torch not compiled with CUDA enabled"), with or without `quantize`; quantizing a model
that already is quantized is refused instead of relabelling its int4 weights as int8."""
from __future__ import annotations


import pytest
import torch

import mmstack
from mmstack.api import default_model_dir
from mmstack.quantize import quantize_model

DEMO = default_model_dir()


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_a_missing_cuda_device_is_refused_by_name(quantize):
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=rf"device 'cuda:{count}': torch sees .* CUDA device"):
        mmstack.load(DEMO, device=f"cuda:{count}", quantize=quantize)


def test_quantizing_a_quantized_model_again_is_refused():
    pipe = mmstack.load(DEMO, device="cpu", quantize="int4")
    with pytest.raises(ValueError, match=r"already quantized \('int4'\)"):
        quantize_model(pipe.model, "int8")
    assert pipe.model.quantization == "int4"

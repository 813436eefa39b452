"""Shared test setup: seeded RNG and default dtype restored per test, GPU tests skipped without CUDA."""
from __future__ import annotations

import random

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    dtype = torch.get_default_dtype()
    torch.manual_seed(0)
    random.seed(0)
    yield
    torch.set_default_dtype(dtype)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

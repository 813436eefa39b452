"""Helpers shared by the parity tests and `mmstack bench`: random weights that make comparisons meaningful."""
from __future__ import annotations

import torch


def randomise_weights(model: torch.nn.Module, std: float = 0.08, bias_std: float = 0.05, seed: int = 0) -> None:
    """Re-draw every weight in place with a larger spread than the default init, so greedy choices and expert
    routing are well separated (no near-ties at float32 noise level between two correct implementations).

    Norm weights become 1 +- 0.1; other parameters N(0, std); DeepSeek-V3 routing correction biases
    (`e_score_correction_bias` buffers) N(0, bias_std), so that the bias path is exercised.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.2 * (torch.rand(p.shape, generator=g) - 0.5))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * bias_std)

"""DeepSeekMoE: a router (`Gate`), stacked routed experts (`Experts`) and always-on shared experts.

Notation: N tokens, H hidden, E routed experts, K experts per token, I expert width, G groups.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import MoEConfig
from .mlp import SwiGLU


class Gate(nn.Module):
    """Router in fp32. Returns (topk_idx [N,K], topk_weight [N,K] fp32)."""

    def __init__(self, hidden: int, cfg: MoEConfig, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, hidden, device=device, dtype=dtype))
        if cfg.topk_method == "noaux_tc":
            # Load-balancing bias: added for expert *choice* only; updated by a rule, not by gradients.
            self.register_buffer("e_score_correction_bias",
                                 torch.zeros(cfg.n_routed_experts, device=device, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's default

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        if torch.is_autocast_enabled(x.device.type):  # autocast would cast this matmul back to bf16
            with torch.autocast(x.device.type, enabled=False):
                logits = F.linear(x.float(), self.weight.float())  # [N,E]
        else:
            logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(-1) if c.scoring_func == "softmax" else logits.sigmoid()
        k = c.num_experts_per_tok
        if c.topk_method == "greedy":
            weight, idx = torch.topk(scores, k, dim=-1)
        else:
            choice = scores + self.e_score_correction_bias.float() if c.topk_method == "noaux_tc" else scores
            n = choice.shape[0]
            grouped = choice.view(n, c.n_group, -1)  # [N,G,E/G]
            if c.topk_method == "noaux_tc":
                group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
            else:
                group_scores = grouped.amax(-1)
            keep_groups = torch.topk(group_scores, c.topk_group, dim=-1).indices  # [N,topk_group]
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep_groups, True)
            # Dropped groups get -inf as in DeepSeek-V3's reference (the VL2 code uses 0.0, which with a
            # negative bias can pick an expert from a dropped group; VL2 checkpoints use one group).
            masked = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(n, -1)
            idx = torch.topk(masked, k, dim=-1).indices
            weight = scores.gather(1, idx)  # without the bias
        if k > 1 and c.norm_topk_prob:
            weight = weight / (weight.sum(-1, keepdim=True) + 1e-20)
        return idx, weight * c.routed_scaling_factor


class Experts(nn.Module):
    """E SwiGLU experts stacked: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I]."""

    def __init__(self, num: int, hidden: int, width: int, device=None, dtype=None):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num, 2 * width, hidden, device=device, dtype=dtype))
        self.down_proj = nn.Parameter(torch.empty(num, hidden, width, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # per expert, as nn.Linear would initialise each matrix
        nn.init.uniform_(self.gate_up_proj, -self.gate_up_proj.shape[-1] ** -0.5, self.gate_up_proj.shape[-1] ** -0.5)
        nn.init.uniform_(self.down_proj, -self.down_proj.shape[-1] ** -0.5, self.down_proj.shape[-1] ** -0.5)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return kernels.moe(x, idx, weight, self.gate_up_proj, self.down_proj)


class MoE(nn.Module):
    def __init__(self, hidden: int, cfg: MoEConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.gate = Gate(hidden, cfg, **kw)
        self.experts = Experts(cfg.n_routed_experts, hidden, cfg.moe_intermediate_size, **kw)
        self.shared_experts = (
            SwiGLU(hidden, cfg.moe_intermediate_size * cfg.n_shared_experts, **kw) if cfg.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [N,H]
        idx, weight = self.gate(flat)
        y = self.experts(flat, idx, weight).view(shape)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y

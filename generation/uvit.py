"""JanusFlow ShallowUViT encoder / decoder (`vision_gen_enc_model` / `vision_gen_dec_model`).

Reproduces `janus/janusflow/models/uvit.py` (deepseek-ai/Janus @1daa72f) without diffusers: the sinusoidal
timestep projection and the timestep MLP are written here with diffusers' parameter names
(`time_embed.linear_1/linear_2`). State-dict keys are the official ones without the module prefix.

Official facts kept: every norm is LlamaRMSNorm (fp32 statistics, a weight, no bias; `elementwise_affine`
is accepted and ignored by the official code too); `in_conv` always has a bias (`use_bias` covers the
ConvNeXt and Unpatchify layers); the Unpatchify patch size is 2 whatever the encoder stride is.

Notation: B batch, Cin latent channels (4), C width (block_out_channels[-1]), D hidden_size (LLM width),
H W latent size, h w = H/stride W/stride token grid.
"""
from __future__ import annotations

import logging
import math
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mmstack.llm.norm import RMSNorm
from mmstack.part_configs import UViTDecoderConfig, UViTEncoderConfig

log = logging.getLogger(__name__)


# JanusFlow-1.3B (reconstructed, ../shared/golden/manifests/JanusFlow-1.3B.json `sources`): SDXL-VAE latent
# 4x48x48 -> 24x24 tokens of width 768, LLM width 2048.
JANUSFLOW_ENCODER = UViTEncoderConfig(input_channels=4, stride=2, kernel_size=2, padding=0)
JANUSFLOW_DECODER = UViTDecoderConfig(in_channels=768, out_channels=4, upsamples=1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """t [B] -> [B, dim] = [cos(t f_i), sin(t f_i)], f_i = max_period^(-i/(dim//2)), in fp32.

    diffusers `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`; odd dims get a zero column.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # [B, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class TimestepMLP(nn.Module):
    """diffusers `TimestepEmbedding`: linear_1 -> SiLU -> linear_2."""

    def __init__(self, dim: int, hidden: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.linear_1 = nn.Linear(dim, hidden, bias=bias, device=device, dtype=dtype)
        self.linear_2 = nn.Linear(hidden, hidden, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN on NHWC: x * (1 + weight * nx) + bias, nx = ||x||_hw / (mean_c ||x||_hw + 1e-6)."""

    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, 1, dim, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(1, 1, 1, dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)  # [B,1,1,C]
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return torch.addcmul(self.bias, self.weight * nx + 1, x)


class ConvNextBlock(nn.Module):
    """Depthwise 7x7 -> RMSNorm -> Linear(C,4C) -> GELU -> GRN -> Linear(4C,C), residual, then FiLM from t_emb."""

    def __init__(self, c: int, hidden_size: int, eps: float, bias: bool = True, dropout: float = 0.0,
                 ffn_factor: int = 4, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.depthwise = nn.Conv2d(c, c, 7, padding=3, groups=c, bias=bias, **kw)
        self.norm = RMSNorm(c, eps, **kw)
        self.channelwise_linear_1 = nn.Linear(c, c * ffn_factor, bias=bias, **kw)
        self.channelwise_norm = GlobalResponseNorm(c * ffn_factor, **kw)
        self.channelwise_linear_2 = nn.Linear(c * ffn_factor, c, bias=bias, **kw)
        self.channelwise_dropout = nn.Dropout(dropout)
        self.cond_embeds_mapper = nn.Linear(hidden_size, 2 * c, bias=bias, **kw)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x [B,C,h,w], cond (t_emb) [B,D] -> [B,C,h,w]."""
        y = self.depthwise(x).permute(0, 2, 3, 1)  # [B,h,w,C]
        y = self.channelwise_norm(F.gelu(self.channelwise_linear_1(self.norm(y))))  # [B,h,w,4C]
        y = self.channelwise_dropout(self.channelwise_linear_2(y)).permute(0, 3, 1, 2)  # [B,C,h,w]
        x = x + y
        scale, shift = self.cond_embeds_mapper(F.silu(cond)).chunk(2, dim=1)  # [B,C] each
        return torch.addcmul(shift[:, :, None, None], x, (1 + scale)[:, :, None, None])


class MidBlock(nn.Module):
    """`mid_block`: ConvNeXt blocks sharing the t_emb condition (official `UVitBlock` without resampling)."""

    def __init__(self, c: int, n: int, hidden_size: int, eps: float, bias: bool, dropout: float,
                 device=None, dtype=None):
        super().__init__()
        self.res_blocks = nn.ModuleList(
            ConvNextBlock(c, hidden_size, eps, bias, dropout, device=device, dtype=dtype) for _ in range(n))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        for block in self.res_blocks:
            x = block(x, cond)
        return x


def _rms_nchw(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Unpatchify(nn.Module):
    """RMSNorm over channels -> 1x1 conv to out*p*p -> PixelShuffle(p): [B,Cin,h,w] -> [B,out,h*p,w*p]."""

    def __init__(self, cin: int, cout: int, patch: int, eps: float, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.norm = RMSNorm(cin, eps, device=device, dtype=dtype)
        self.unpatch_conv = nn.Conv2d(cin, cout * patch * patch, 1, bias=bias, device=device, dtype=dtype)
        self.pixel_shuffle = nn.PixelShuffle(patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pixel_shuffle(self.unpatch_conv(_rms_nchw(self.norm, x)))


class ShallowUViTEncoder(nn.Module):
    """Noisy latent + timestep -> LLM-side image tokens (before `vision_gen_enc_aligner`) and t_emb."""

    def __init__(self, cfg: UViTEncoderConfig, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        kw = dict(device=device, dtype=dtype)
        c = cfg.block_out_channels[0]
        pad = math.ceil(cfg.kernel_size - cfg.stride) if cfg.padding is None else cfg.padding
        self.time_embed = TimestepMLP(c, cfg.hidden_size, cfg.use_bias, **kw)
        self.in_conv = nn.Conv2d(cfg.input_channels, c, cfg.kernel_size, stride=cfg.stride, padding=pad, **kw)
        n = cfg.layers_in_middle if cfg.use_mid_block else 0  # no mid block = no blocks, no keys
        self.mid_block = MidBlock(cfg.block_out_channels[-1], n, cfg.hidden_size, cfg.norm_eps, cfg.use_bias,
                                  cfg.dropout, **kw)

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
        """Args:
            z: [B,Cin,H,W] latents; t: [B] timesteps in [0, 1000) (any float dtype; projected in fp32).
        Returns:
            x_emb [B,C,h,w], t_emb [B,D] (in z's dtype), hs = [x_emb] (the decoder's skip input).
        """
        t_emb = self.time_embed(timestep_embedding(t.flatten(), self.time_embed.linear_1.in_features).to(z.dtype))
        x = self.mid_block(self.in_conv(z), t_emb)  # [B,C,h,w]
        return x, t_emb, [x]


class ShallowUViTDecoder(nn.Module):
    """LLM-side image tokens (after `vision_gen_dec_aligner`) + encoder skip + t_emb -> velocity."""

    def __init__(self, cfg: UViTDecoderConfig, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        kw = dict(device=device, dtype=dtype)
        c, cin = cfg.block_out_channels[-1], cfg.in_channels
        n = cfg.layers_in_middle if cfg.use_mid_block else 0
        self.mid_block = MidBlock(cin + c, n, cfg.hidden_size, cfg.norm_eps, cfg.use_bias, cfg.dropout, **kw)
        ins = [cin + c] + [c] * (cfg.upsamples - 1)
        outs = [c] * (cfg.upsamples - 1) + [cfg.out_channels]
        self.out_convs = nn.ModuleList(Unpatchify(i, o, 2, cfg.norm_eps, cfg.use_bias, **kw) for i, o in zip(ins, outs))
        self.input_norm = RMSNorm(cin, cfg.norm_eps, **kw)

    def forward(self, x: torch.Tensor, hs: Sequence[torch.Tensor], t_emb: torch.Tensor) -> torch.Tensor:
        """Args:
            x: [B,Cin_dec,h,w]; hs: the encoder's [x_emb] (read, not popped as the official code does);
            t_emb: [B,D] from the encoder.
        Returns:
            [B,out_channels,h*2^u,w*2^u] (velocity for JanusFlow, u = upsamples).
        """
        if len(hs) != 1:
            raise ValueError(f"expected exactly one skip tensor in hs, got {len(hs)}")
        x = torch.cat([_rms_nchw(self.input_norm, x), hs[-1]], dim=1)  # [B,Cin_dec+C,h,w]
        x = self.mid_block(x, t_emb)
        for out_conv in self.out_convs:
            x = out_conv(x)
        return x

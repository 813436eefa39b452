"""LlamaGen VQ-16 image tokenizer, the `gen_vision_model` of Janus / Janus-Pro.

Reproduces `janus/models/vq_model.py` (deepseek-ai/Janus @1daa72f): a conv encoder downsampling by
2**(len(ch_mult)-1), an L2-normalised codebook, and the mirrored decoder. `VQModel.state_dict()` keys are
the official `gen_vision_model.*` keys without that prefix.

Deviation: the official `Upsample` interpolates non-fp32 inputs in fp32 and then casts to a hard-coded
bfloat16 (wrong for fp16, PR #81). Here the interpolation runs in fp32 and casts back to the input dtype:
identical for fp32 and bf16 inputs.

Notation: B batch, C channels, H W image size, h w code grid, D codebook_embed_dim, N codebook_size.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mmstack.part_configs import VQ16, VQConfig


def _norm(c: int, groups: int, device=None, dtype=None) -> nn.GroupNorm:
    return nn.GroupNorm(groups, c, eps=1e-6, affine=True, device=device, dtype=dtype)


class ResnetBlock(nn.Module):
    """GroupNorm-swish-conv3x3 twice, plus a 1x1 `nin_shortcut` when the channel count changes."""

    def __init__(self, cin: int, cout: int, groups: int, dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.norm1 = _norm(cin, groups, **kw)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, **kw)
        self.norm2 = _norm(cout, groups, **kw)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, **kw)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1, **kw) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, 1x1-conv projections, scale C^-0.5."""

    def __init__(self, c: int, groups: int, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.norm = _norm(c, groups, **kw)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1, **kw) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (p(y).flatten(2).transpose(1, 2)[:, None] for p in (self.q, self.k, self.v))  # [B,1,hw,C]
        o = F.scaled_dot_product_attention(q, k, v)[:, 0]  # [B,hw,C]
        return x + self.proj_out(o.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """3x3 stride-2 conv after zero padding right/bottom by one (asymmetric, as the official code)."""

    def __init__(self, c: int, device=None, dtype=None):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2 (in fp32, cast back to the input dtype; see the module docstring) then a 3x3 conv."""

    def __init__(self, c: int, device=None, dtype=None):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(x.dtype))


class Level(nn.Module):
    """One resolution: `res` blocks, each followed by `attn[i]` when attention is on, then the resampler.

    The resampler is registered as `downsample` / `upsample` (official names) or is an `nn.Identity` on
    the level that has none.
    """

    def __init__(self, cin: int, cout: int, n_blocks: int, attn: bool, resample: str, has_resample: bool,
                 groups: int, dropout: float, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.res = nn.ModuleList(
            ResnetBlock(cin if i == 0 else cout, cout, groups, dropout, **kw) for i in range(n_blocks))
        self.attn = nn.ModuleList(AttnBlock(cout, groups, **kw) for _ in range(n_blocks if attn else 0))
        self.resample = resample
        cls = Downsample if resample == "downsample" else Upsample
        self.add_module(resample, cls(cout, **kw) if has_resample else nn.Identity())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return getattr(self, self.resample)(h)


def _mid(c: int, groups: int, dropout: float, kw: dict) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(c, c, groups, dropout, **kw), AttnBlock(c, groups, **kw),
                          ResnetBlock(c, c, groups, dropout, **kw)])


class Encoder(nn.Module):
    """[B,3,H,W] -> [B,z_channels,H/f,W/f], f = 2**(levels-1); attention only on the last (lowest) level."""

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, groups: int,
                 dropout: float = 0.0, in_channels: int = 3, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        n = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1, **kw)
        widths = [ch] + [ch * m for m in ch_mult]
        self.conv_blocks = nn.ModuleList(
            Level(widths[i], widths[i + 1], num_res_blocks, i == n - 1, "downsample", i != n - 1, groups, dropout, **kw)
            for i in range(n))
        self.mid = _mid(widths[-1], groups, dropout, kw)
        self.norm_out = _norm(widths[-1], groups, **kw)
        self.conv_out = nn.Conv2d(widths[-1], z_channels, 3, padding=1, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in [*self.conv_blocks, *self.mid]:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """[B,z_channels,h,w] -> [B,3,h*f,w*f]; `conv_blocks` run lowest resolution first, num_res_blocks+1 each."""

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, groups: int,
                 dropout: float = 0.0, out_channels: int = 3, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        n = len(ch_mult)
        widths = [ch * m for m in reversed(ch_mult)]  # level i of the list = official level n-1-i
        self.conv_in = nn.Conv2d(z_channels, widths[0], 3, padding=1, **kw)
        self.mid = _mid(widths[0], groups, dropout, kw)
        self.conv_blocks = nn.ModuleList(
            Level(widths[max(i - 1, 0)], widths[i], num_res_blocks + 1, i == 0, "upsample", i != n - 1, groups,
                  dropout, **kw)
            for i in range(n))
        self.norm_out = _norm(widths[-1], groups, **kw)
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1, **kw)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in [*self.mid, *self.conv_blocks]:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-codeword lookup; with `l2_norm` both z and the codebook rows are L2-normalised first."""

    def __init__(self, n: int, dim: int, l2_norm: bool = True, usage_size: Optional[int] = 65536,
                 device=None, dtype=None):
        super().__init__()
        self.l2_norm = l2_norm
        self.embedding = nn.Embedding(n, dim, device=device, dtype=dtype)
        if usage_size:  # official: a persistent buffer in every checkpoint, never used at inference
            self.register_buffer("codebook_used", torch.zeros(usage_size, device=device, dtype=dtype))

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w  # [N,D]

    def forward(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """z [B,D,h,w] -> (z_q [B,D,h,w], indices [B*h*w]); z_q keeps z's straight-through gradient."""
        z = z.permute(0, 2, 3, 1)  # [B,h,w,D]
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        e = self.codebook()
        zf = z.reshape(-1, z.shape[-1])  # [B*h*w,D]
        # ||z||^2 + ||e||^2 - 2 z.e, the official expression (keeps argmin ties identical)
        d = zf.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * zf @ e.t()  # [B*h*w,N]
        idx = d.argmin(1)
        z_q = z + (e[idx].view_as(z) - z).detach()
        return z_q.permute(0, 3, 1, 2), idx

    def lookup(self, indices: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """indices (any shape, B*h*w entries) -> codewords [B,D,h,w] for shape = (B, D, h, w)."""
        b, d, h, w = shape
        return self.codebook()[indices.reshape(-1)].view(b, h, w, d).permute(0, 3, 1, 2).contiguous()


class VQModel(nn.Module):
    """LlamaGen VQ tokenizer (Janus `gen_vision_model`).

    Examples:
        >>> vq = VQModel(VQ16)
        >>> quant, idx = vq.encode(torch.zeros(1, 3, 384, 384))  # [1,8,24,24], [576]
        >>> vq.decode_code(idx[None], shape=(1, 8, 24, 24)).shape
        torch.Size([1, 3, 384, 384])
    """

    def __init__(self, cfg: VQConfig = VQ16, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        kw = dict(device=device, dtype=dtype)
        g = cfg.norm_groups
        self.encoder = Encoder(cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.z_channels, g, cfg.dropout, **kw)
        self.decoder = Decoder(cfg.ch, cfg.decoder_ch_mult, cfg.num_res_blocks, cfg.z_channels, g, cfg.dropout, **kw)
        usage = cfg.usage_buffer_size if cfg.codebook_show_usage else None
        self.quantize = VectorQuantizer(cfg.codebook_size, cfg.codebook_embed_dim, cfg.codebook_l2_norm, usage, **kw)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_embed_dim, 1, **kw)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1, **kw)

    def pre_quant(self, x: torch.Tensor) -> torch.Tensor:
        """x [B,3,H,W] in [-1,1] -> latent before quantisation [B,D,H/f,W/f]."""
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x [B,3,H,W] in [-1,1] -> (quant [B,D,h,w], indices [B*h*w] flat, row-major per image, as official)."""
        return self.quantize(self.pre_quant(x))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """quant [B,D,h,w] -> images [B,3,h*f,w*f], roughly in [-1,1]."""
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, codes: torch.Tensor, shape: Optional[Sequence[int]] = None) -> torch.Tensor:
        """codes [B,h*w] (or flat [B*h*w] with `shape`) -> images [B,3,H,W].

        Args:
            shape: (B, D, h, w); default a square grid from codes [B, h*w].
        """
        if shape is None:
            b, n = codes.shape
            g = math.isqrt(n)
            if g * g != n:
                raise ValueError(f"{n} codes per image is not a square grid; pass shape=(B, D, h, w)")
            shape = (b, self.cfg.codebook_embed_dim, g, g)
        return self.decode(self.quantize.lookup(codes.long(), shape))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """images [B,3,H,W] (about [-1,1]) -> uint8 [B,H,W,3] on the CPU.

    As the official generation scripts: clip((x+1)/2*255, 0, 255) in fp32, then a truncating uint8 cast
    (not rounding). Use `.numpy()` for PIL.
    """
    x = images.detach().float().cpu().permute(0, 2, 3, 1)
    return ((x + 1) / 2 * 255).clamp(0, 255).to(torch.uint8)

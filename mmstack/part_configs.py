"""Config sections of the optional parts of `ModelConfig`: vision tower, projector, layout, image processing
(understanding) and VQ tokenizer, VQ generation head, flow encoder / decoder / head (generation).

Plain dataclasses with `validate()`; the modules that build each part (`mmstack.vision`, `mmstack.generation`)
take these as their explicit sizes. Family differences are fields (`act`, `kind`, `row_layout`, ...), never
names. Each `validate()` raises `ConfigError` naming the section and field.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

from .errors import ConfigError

MAX_FIT_PIXELS = 4096 * 4096  # image_processing.fit_size: the canvas every image is padded to (48 MiB of RGB)

log = logging.getLogger(__name__)


def check_int(value, where: str, lo: int = 1, hi: Optional[int] = None) -> None:
    """`value` is an int (not a bool) in lo..hi; else ConfigError naming `where`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ConfigError(f"{where} must be an integer {bound}, got {value!r}")


def check_float(value, where: str, lo: float = 0.0, hi: Optional[float] = None, open_lo: bool = True) -> None:
    """`value` is a finite real number (not a bool) above `lo` (or at least `lo` when not open_lo)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if open_lo else value >= lo) and (hi is None or value <= hi)
    if not ok:
        bound = f"{'>' if open_lo else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
        raise ConfigError(f"{where} must be a finite number {bound}, got {value!r}")


# ------------------------------------------------------------------------------------------ understanding


POOLS = ("", "map", "avg", "avgmax", "max", "token")  # timm's ViT heads (the checkpoints hold "map" or none)


@dataclass
class VisionTowerConfig:
    """A SigLIP ViT (timm names). DeepSeek-VL2: SO400M/14, tanh GELU; Janus: L/16, exact GELU."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float
    act: str = "gelu"  # "gelu" (exact) | "gelu_tanh"
    global_pool: str = "map"  # "map" keeps the attention-pool head the checkpoints contain (unused)
    ln_eps: float = 1e-6

    def validate(self) -> None:
        for name, hi in (("image_size", 16384), ("patch_size", 1024), ("width", 1 << 16), ("layers", 1024),
                         ("heads", 1024)):
            check_int(getattr(self, name), f"vision.{name}", 1, hi)
        check_float(self.mlp_ratio, "vision.mlp_ratio", 0.0, 64.0)
        check_float(self.ln_eps, "vision.ln_eps", 0.0, 1.0)
        if self.act not in ("gelu", "gelu_tanh"):
            raise ConfigError(f"vision.act must be gelu or gelu_tanh, got {self.act!r}")
        if self.global_pool not in POOLS:
            raise ConfigError(f"vision.global_pool must be one of {POOLS}, got {self.global_pool!r:.40}")
        if self.width % self.heads:
            raise ConfigError(f"vision.width {self.width} is not divisible by heads {self.heads}")
        if self.image_size < self.patch_size:
            raise ConfigError(f"vision.image_size {self.image_size} < patch_size {self.patch_size}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid


@dataclass
class ProjectorConfig:
    """Vision features -> LLM width: downsample_mlp_gelu (VL2), mlp_gelu (Janus), linear (JanusFlow)."""

    kind: str  # downsample_mlp_gelu | mlp_gelu | linear
    input_dim: int
    n_embed: int
    depth: int = 2
    mlp_ratio: int = 1
    downsample_ratio: int = 2

    def validate(self) -> None:
        if self.kind not in ("downsample_mlp_gelu", "mlp_gelu", "linear"):
            raise ConfigError(f"projector.kind {self.kind!r} is not one of downsample_mlp_gelu, mlp_gelu, linear")
        check_int(self.input_dim, "projector.input_dim", 1, 1 << 16)
        check_int(self.n_embed, "projector.n_embed", 1, 1 << 16)
        check_int(self.depth, "projector.depth", 0 if self.kind == "linear" else 1, 64)
        check_int(self.mlp_ratio, "projector.mlp_ratio", 1, 64)
        check_int(self.downsample_ratio, "projector.downsample_ratio", 1, 64)

    def tokens_per_side(self, grid: int) -> int:
        return math.ceil(grid / self.downsample_ratio) if self.kind == "downsample_mlp_gelu" else grid


@dataclass
class LayoutConfig:
    """How image embeddings are laid out in the sequence: "vl2_tiles" (global view rows + newlines, view
    separator, local tiles), "janus" (as they come), "janusflow" (after a learned begin embedding)."""

    kind: str  # "vl2_tiles" | "janus" | "janusflow"
    n_embed: int
    tile_tag: str = "2D"
    global_view_pos: str = "head"

    def validate(self) -> None:
        if self.kind not in ("vl2_tiles", "janus", "janusflow"):
            raise ConfigError(f"layout.kind {self.kind!r} is not one of vl2_tiles, janus, janusflow")
        check_int(self.n_embed, "layout.n_embed", 1, 1 << 16)
        if self.kind == "vl2_tiles" and (self.tile_tag, self.global_view_pos) != ("2D", "head"):
            raise ConfigError(f"only tile_tag '2D' with global_view_pos 'head' is supported (the released "
                              f"checkpoints), got {self.tile_tag!r} / {self.global_view_pos!r}")


@dataclass
class ImageProcessingConfig:
    """How images become pixel tensors. kind "vl2_tiling" (dynamic tiles) or "square_pad" (Janus)."""

    kind: str
    image_size: int
    image_mean: list = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list = field(default_factory=lambda: [0.5, 0.5, 0.5])
    candidate_resolutions: Optional[list] = None
    patch_size: int = 14
    downsample_ratio: int = 2
    min_size: int = 14
    policy: str = "official"  # "official": convert("RGB"), no EXIF; "native": composite alpha, honour EXIF
    # [width, height] a native model was trained at: every image is first fitted to it (aspect-preserving resize,
    # centred on the background colour, as `ImageOps.pad`), so a photo or a larger scan reaches the model in the
    # tiling its training used. None (every official format): images are tiled at their own size.
    fit_size: Optional[list] = None
    # A native model's choice: an image whose local grid is 1x1 (its best resolution is one tile, or it is one of
    # more than 2 images, which are never cropped) is encoded as its global view alone, grid (0, 0), since the
    # official local tile is then the same S x S picture a second time (41 image slots at 64 px / 8 px patches
    # become 21: the global rows and the view separator). False (every official format): the official global +
    # local layout; exporting a model with it on to the official format is refused (a stored field that differs).
    single_tile_global_only: bool = False

    def validate(self) -> None:
        if self.kind not in ("vl2_tiling", "square_pad"):
            raise ConfigError(f"image_processing.kind {self.kind!r} is not one of vl2_tiling, square_pad")
        if self.policy not in ("official", "native"):
            raise ConfigError(f"image_processing.policy must be official or native, got {self.policy!r}")
        check_int(self.image_size, "image_processing.image_size", 1, 16384)
        check_int(self.patch_size, "image_processing.patch_size", 1, 1024)
        check_int(self.downsample_ratio, "image_processing.downsample_ratio", 1, 64)
        check_int(self.min_size, "image_processing.min_size", 1, 16384)
        for name in ("image_mean", "image_std"):
            v = getattr(self, name)
            if not isinstance(v, (list, tuple)) or len(v) != 3:
                raise ConfigError(f"image_processing.{name} must be three numbers, got {v!r}")
            for i, x in enumerate(v):
                check_float(x, f"image_processing.{name}[{i}]", *((0.0, None) if name == "image_std" else (-10.0, 10.0)))
        if self.kind == "vl2_tiling":
            self._check_resolutions()
        if self.fit_size is not None:
            if self.kind != "vl2_tiling":
                raise ConfigError("image_processing.fit_size applies to vl2_tiling (square_pad already fits image_size)")
            if not isinstance(self.fit_size, (list, tuple)) or len(self.fit_size) != 2:
                raise ConfigError(f"image_processing.fit_size must be [width, height], got {self.fit_size!r}")
            for v in self.fit_size:
                check_int(v, "image_processing.fit_size", 1, 16384)
            w, h = self.fit_size
            if w * h > MAX_FIT_PIXELS:  # every image, even 1x1, is padded to this canvas before tiling
                raise ConfigError(f"image_processing.fit_size {w}x{h} is {w * h} pixels; the limit is {MAX_FIT_PIXELS} "
                                  f"(every image is padded to it before it is tiled)")
        if not isinstance(self.single_tile_global_only, bool):
            raise ConfigError(f"image_processing.single_tile_global_only must be true or false, "
                              f"got {self.single_tile_global_only!r}")
        if self.single_tile_global_only and self.kind != "vl2_tiling":
            raise ConfigError("image_processing.single_tile_global_only applies to vl2_tiling (square_pad has one view)")

    def _check_resolutions(self) -> None:
        cands = self.candidate_resolutions
        if not cands or not isinstance(cands, (list, tuple)):
            raise ConfigError("image_processing: vl2_tiling needs candidate_resolutions")
        if len(cands) > 1024:
            raise ConfigError(f"image_processing.candidate_resolutions has {len(cands)} entries; the limit is 1024")
        side = cands[0][0] if isinstance(cands[0], (list, tuple)) and cands[0] else None
        for i, c in enumerate(cands):
            if not isinstance(c, (list, tuple)) or len(c) != 2:
                raise ConfigError(f"image_processing.candidate_resolutions[{i}] must be [height, width], got {c!r}")
            for v in c:
                check_int(v, f"image_processing.candidate_resolutions[{i}]", 1, 16384)
            if c[0] % side or c[1] % side:
                raise ConfigError(f"image_processing.candidate_resolutions[{i}] {list(c)} is not a multiple of the "
                                  f"tile side {side} (the first entry)")
            if (c[0] // side) * (c[1] // side) > 64:
                raise ConfigError(f"image_processing.candidate_resolutions[{i}] {list(c)} makes "
                                  f"{(c[0] // side) * (c[1] // side)} tiles; the limit is 64")

    @property
    def background(self) -> tuple:
        return tuple(int(m * 255) for m in self.image_mean)


# ------------------------------------------------------------------------------------------ generation


@dataclass
class VQConfig:
    """LlamaGen VQ-16 image tokenizer (`gen_vision_model`); defaults are the official `VQ_16`."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    z_channels: int = 256
    ch: int = 128
    ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4)  # encoder levels, highest resolution first
    decoder_ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    dropout: float = 0.0
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True  # adds the persistent (never updated) `quantize.codebook_used` buffer
    usage_buffer_size: int = 65536  # hard-coded in the official VectorQuantizer, whatever codebook_size is
    norm_groups: int = 32

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def validate(self) -> None:
        for name, hi in (("codebook_size", 1 << 20), ("codebook_embed_dim", 4096), ("z_channels", 1 << 14),
                         ("ch", 1 << 14), ("num_res_blocks", 64), ("norm_groups", 1024)):
            check_int(getattr(self, name), f"vq.{name}", 1, hi)
        for name in ("ch_mult", "decoder_ch_mult"):
            mult = getattr(self, name)
            if not isinstance(mult, (list, tuple)) or not 1 <= len(mult) <= 8:
                raise ConfigError(f"vq.{name} must be 1..8 integers, got {mult!r}")
            for m in mult:
                check_int(m, f"vq.{name}", 1, 64)

    @classmethod
    def from_official(cls, params: dict) -> "VQConfig":
        """Read the official `ModelArgs` field names (as in a `custom_architectures.vq_model` entry)."""
        if params.get("norm_type", "group") != "group":
            raise ConfigError(f"VQ norm_type {params['norm_type']!r} is not supported (only 'group')")
        return cls(
            codebook_size=params.get("codebook_size", 16384),
            codebook_embed_dim=params.get("codebook_embed_dim", 8),
            z_channels=params.get("z_channels", 256),
            ch=params.get("ch", 128),
            ch_mult=tuple(params.get("encoder_ch_mult", (1, 1, 2, 2, 4))),
            decoder_ch_mult=tuple(params.get("decoder_ch_mult", (1, 1, 2, 2, 4))),
            num_res_blocks=params.get("num_res_blocks", 2),
            dropout=params.get("dropout_p", 0.0),
            codebook_l2_norm=params.get("codebook_l2_norm", True),
            codebook_show_usage=params.get("codebook_show_usage", True),
        )

    def to_official(self) -> dict:
        """The inverse of `from_official`: the official `ModelArgs` field names."""
        return dict(
            codebook_size=self.codebook_size, codebook_embed_dim=self.codebook_embed_dim,
            codebook_l2_norm=self.codebook_l2_norm, codebook_show_usage=self.codebook_show_usage,
            encoder_ch_mult=list(self.ch_mult), decoder_ch_mult=list(self.decoder_ch_mult), z_channels=self.z_channels,
            ch=self.ch, num_res_blocks=self.num_res_blocks, norm_type="group", dropout_p=self.dropout,
        )


# https://github.com/deepseek-ai/Janus/blob/1daa72f/janus/models/vq_model.py `VQ_16`
VQ16 = VQConfig()


@dataclass
class VQGenerationConfig:
    """Janus autoregressive image tokens: gen_embed -> gen_aligner -> LLM -> gen_head, with CFG.

    row_layout: "interleaved" (official: cond, uncond, cond, ...) or "blocked" (transformers).
    uncond: "official_slice" (prompt[1:-1] = pad, no mask, as generation_inference.py) or
        "keep_bos_boi" (transformers: every token but BOS and <begin_of_image> is pad).
    image_top_k: None samples over all codes (official); 50 reproduces transformers' default top_k.
    """

    codebook_size: int
    embed_dim: int
    n_embed: int
    head_embed: int
    aligner_depth: int = 2
    image_size: int = 384
    cfg_weight: float = 5.0
    temperature: float = 1.0
    row_layout: str = "interleaved"
    uncond: str = "official_slice"
    image_top_k: Optional[int] = None

    def validate(self) -> None:
        if self.row_layout not in ("interleaved", "blocked"):
            raise ConfigError(f"vq_head.row_layout must be interleaved or blocked, got {self.row_layout!r}")
        if self.uncond not in ("official_slice", "keep_bos_boi"):
            raise ConfigError(f"vq_head.uncond must be official_slice or keep_bos_boi, got {self.uncond!r}")
        for name, hi in (("codebook_size", 1 << 20), ("embed_dim", 1 << 14), ("n_embed", 1 << 16),
                         ("head_embed", 1 << 16), ("aligner_depth", 64), ("image_size", 16384)):
            check_int(getattr(self, name), f"vq_head.{name}", 1, hi)
        check_float(self.cfg_weight, "vq_head.cfg_weight", 0.0, 1000.0, open_lo=False)
        check_float(self.temperature, "vq_head.temperature", 0.0, 100.0, open_lo=False)
        if self.image_top_k is not None:
            check_int(self.image_top_k, "vq_head.image_top_k", 1, self.codebook_size)


@dataclass
class FlowGenerationConfig:
    """JanusFlow rectified flow over VAE latents (SDXL-VAE: 4 channels, scaling factor 0.13025)."""

    latent_channels: int
    width: int  # ShallowUViT channels
    n_embed: int  # LLM width
    norm_eps: float = 1e-6
    image_size: int = 384
    vae_downsample: int = 8
    vae_scaling_factor: float = 0.13025
    cfg_weight: float = 2.0
    steps: int = 30

    def validate(self) -> None:
        for name, hi in (("latent_channels", 1024), ("width", 1 << 16), ("n_embed", 1 << 16),
                         ("image_size", 16384), ("vae_downsample", 256)):
            check_int(getattr(self, name), f"flow_head.{name}", 1, hi)
        if self.steps is None or isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps <= 0:
            raise ConfigError(f"flow_head.steps must be positive, got {self.steps}")
        check_float(self.vae_scaling_factor, "flow_head.vae_scaling_factor", 0.0)
        check_float(self.cfg_weight, "flow_head.cfg_weight", 0.0, 1000.0, open_lo=False)
        check_float(self.norm_eps, "flow_head.norm_eps", 0.0, 1.0)


def _from_official(cls, params: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - names)
    if unknown:  # the official constructors swallow **kwargs, so these have no effect there either
        log.warning("%s: ignoring unknown params %s", cls.__name__, unknown)
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items() if k in names}
    return cls(**kw)


@dataclass
class UViTEncoderConfig:
    """`vision_gen_enc_config.params`; defaults are the official `ShallowUViTEncoder.__init__` defaults."""

    input_channels: int = 3
    stride: int = 4
    kernel_size: int = 7
    padding: Optional[int] = None  # None -> ceil(kernel_size - stride), as official
    block_out_channels: Tuple[int, ...] = (768,)
    layers_in_middle: int = 2
    hidden_size: int = 2048
    elementwise_affine: bool = True
    use_bias: bool = True
    norm_eps: float = 1e-6
    dropout: float = 0.0
    use_mid_block: bool = True

    @classmethod
    def from_official(cls, params: dict) -> "UViTEncoderConfig":
        return _from_official(cls, params)

    def validate(self) -> None:
        for name, hi in (("input_channels", 1024), ("stride", 64), ("kernel_size", 64), ("layers_in_middle", 64),
                         ("hidden_size", 1 << 16)):
            check_int(getattr(self, name), f"flow_encoder.{name}", 1, hi)


@dataclass
class UViTDecoderConfig:
    """`vision_gen_dec_config.params`; defaults are the official `ShallowUViTDecoder.__init__` defaults."""

    in_channels: int = 768
    out_channels: int = 3
    block_out_channels: Tuple[int, ...] = (768,)
    upsamples: int = 2
    layers_in_middle: int = 2
    hidden_size: int = 2048
    elementwise_affine: bool = True
    norm_eps: float = 1e-6
    use_bias: bool = True
    dropout: float = 0.0
    use_mid_block: bool = True

    @classmethod
    def from_official(cls, params: dict) -> "UViTDecoderConfig":
        return _from_official(cls, params)

    def validate(self) -> None:
        for name, hi in (("in_channels", 1 << 16), ("out_channels", 1024), ("layers_in_middle", 64),
                         ("hidden_size", 1 << 16)):
            check_int(getattr(self, name), f"flow_decoder.{name}", 1, hi)
        check_int(self.upsamples, "flow_decoder.upsamples", 0, 16)

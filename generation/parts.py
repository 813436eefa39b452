"""Registers the generation parts with the core: config sections, readers of the official Janus /
JanusFlow formats, module builders and key rules.

Internal names: `vq.*` (VQ-16 tokenizer), `vq_head.{embed, aligner.layers.*, head.*}` (Janus image-token
embedding, aligner and head), `flow_encoder.*`, `flow_decoder.*`, `flow_head.{enc_aligner, dec_norm,
dec_aligner}` (JanusFlow).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch.nn.functional as F
from torch import nn

from mmstack.config import ConfigError, ModelConfig, register_section
from mmstack.formats import register_part_reader
from mmstack.io.keymaps import Rule
from mmstack.llm.norm import RMSNorm
from mmstack.loading import register_part_rules
from mmstack.model import register_part_builder
from mmstack.writers import ExportError, Written, official_override, register_part_writer

from .uvit import ShallowUViTDecoder, ShallowUViTEncoder, UViTDecoderConfig, UViTEncoderConfig
from .vq import VQ16, VQConfig, VQModel


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
        if self.steps <= 0:
            raise ConfigError(f"flow_head.steps must be positive, got {self.steps}")


class VQHead(nn.Module):
    """`embed` (code -> vector), `aligner` (MLP to the LLM width) and `head` (LLM hidden -> code logits)."""

    def __init__(self, cfg: VQGenerationConfig, device=None, dtype=None):
        super().__init__()
        from mmstack.vision.projector import Projector, ProjectorConfig

        kw = dict(device=device, dtype=dtype)
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.codebook_size, cfg.embed_dim, **kw)
        self.aligner = Projector(ProjectorConfig("mlp_gelu", cfg.embed_dim, cfg.n_embed, cfg.aligner_depth), **kw)
        self.head = nn.Module()
        self.head.output_mlp_projector = nn.Linear(cfg.n_embed, cfg.head_embed, **kw)
        self.head.vision_head = nn.Linear(cfg.head_embed, cfg.codebook_size, **kw)

    def embed_codes(self, codes):
        """codes [...] -> LLM inputs [..., D]."""
        return self.aligner(self.embed(codes))

    def logits(self, hidden):
        """LLM hidden (after the final norm) [..., D] -> code logits [..., K] in fp32."""
        h = self.head.output_mlp_projector(hidden)
        return self.head.vision_head(F.gelu(h)).float()


class FlowHead(nn.Module):
    """The JanusFlow adapters between the ShallowUViT and the LLM."""

    def __init__(self, cfg: FlowGenerationConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.cfg = cfg
        self.enc_aligner = nn.Linear(cfg.width, cfg.n_embed, **kw)
        self.dec_norm = RMSNorm(cfg.n_embed, cfg.norm_eps, **kw)
        self.dec_aligner = nn.Linear(cfg.n_embed, cfg.width, **kw)


register_section("vq", VQConfig)
register_section("vq_head", VQGenerationConfig)
register_section("flow_encoder", UViTEncoderConfig)
register_section("flow_decoder", UViTDecoderConfig)
register_section("flow_head", FlowGenerationConfig)

register_part_builder("vq", lambda c, mc, **kw: VQModel(c, **kw))
register_part_builder("vq_head", lambda c, mc, **kw: VQHead(c, **kw))
register_part_builder("flow_encoder", lambda c, mc, **kw: ShallowUViTEncoder(c, **kw))
register_part_builder("flow_decoder", lambda c, mc, **kw: ShallowUViTDecoder(c, **kw))
register_part_builder("flow_head", lambda c, mc, **kw: FlowHead(c, **kw))


def _read_janus(raw: dict, cfg: ModelConfig, where: str, folder) -> None:
    gv = raw.get("gen_vision_config")
    if not gv:
        return
    cls = gv.get("cls", "VQ-16")
    overrides = raw.get("_golden_overrides", {}).get("vq_model", {})
    if cls in overrides:
        vq = VQConfig.from_official(overrides[cls])
    elif cls == "VQ-16":
        vq = VQConfig()
    else:
        raise ConfigError(f"{where}: unknown gen_vision_config.cls {cls!r} (known: VQ-16)")
    p = gv.get("params", {})
    vq.codebook_size = int(p.get("image_token_size", vq.codebook_size))
    vq.codebook_embed_dim = int(p.get("n_embed", vq.codebook_embed_dim))
    cfg.parts["vq"] = vq
    ga = (raw.get("gen_aligner_config") or {}).get("params", {})
    gh = (raw.get("gen_head_config") or {}).get("params", {})
    hidden = cfg.language.hidden_size
    image_size = int((raw.get("vision_config") or {}).get("params", {}).get("image_size", 384))
    cfg.parts["vq_head"] = VQGenerationConfig(
        codebook_size=int(gh.get("image_token_size", vq.codebook_size)), embed_dim=int(ga.get("input_dim", vq.codebook_embed_dim)),
        n_embed=int(gh.get("n_embed", hidden)), head_embed=int(gh.get("image_token_embed", hidden)),
        aligner_depth=int(ga.get("depth", 2)), image_size=image_size,
    )


def _read_janusflow(raw: dict, cfg: ModelConfig, where: str, folder) -> None:
    enc = UViTEncoderConfig.from_official((raw.get("vision_gen_enc_config") or {}).get("params", {}))
    dec = UViTDecoderConfig.from_official((raw.get("vision_gen_dec_config") or {}).get("params", {}))
    cfg.parts["flow_encoder"] = enc
    cfg.parts["flow_decoder"] = dec
    image_size = int((raw.get("vision_und_enc_config") or {}).get("params", {}).get("image_size", 384))
    cfg.parts["flow_head"] = FlowGenerationConfig(
        latent_channels=enc.input_channels, width=enc.block_out_channels[-1], n_embed=cfg.language.hidden_size,
        norm_eps=cfg.language.rms_norm_eps, image_size=image_size,
    )


register_part_reader("janus", _read_janus)
register_part_reader("janusflow", _read_janusflow)

# ------------------------------------------------------------------------------------------ writers
# The inverse of the readers above (`mmstack.export`).

# Sampling settings: chosen per call or at load time, no official config field holds them.
VQ_SETTINGS = tuple(f"vq_head.{f}" for f in ("cfg_weight", "temperature", "row_layout", "uncond", "image_top_k",
                                               "image_size"))
FLOW_SETTINGS = tuple(f"flow_head.{f}" for f in ("cfg_weight", "steps", "vae_scaling_factor", "vae_downsample"))


def _write_janus(cfg: ModelConfig, out: Written) -> None:
    have = [k for k in ("vq", "vq_head") if k in cfg.parts]
    if not have:
        return  # an understanding-only Janus
    if len(have) == 1:
        raise ExportError(f"janus: image generation needs both vq and vq_head; this model has only {have[0]}")
    vq, head = cfg.parts["vq"], cfg.parts["vq_head"]
    # "VQ-16" fixes everything but the two sizes its params carry
    released = dataclasses.replace(vq, codebook_size=VQ16.codebook_size, codebook_embed_dim=VQ16.codebook_embed_dim)
    cls = "VQ-16" if released == VQ16 else official_override(out, "vq_model", "VQ-custom", vq.to_official())
    out.config.update(
        gen_vision_config=dict(cls=cls, model_type="gen_vision", params=dict(
            image_token_size=vq.codebook_size, n_embed=vq.codebook_embed_dim)),
        gen_aligner_config=dict(cls="MlpProjector", model_type="gen_aligner", params=dict(
            depth=head.aligner_depth, input_dim=head.embed_dim, n_embed=head.n_embed, projector_type="mlp_gelu")),
        gen_head_config=dict(cls="vision_head", model_type="gen_head", params=dict(
            image_token_embed=head.head_embed, image_token_size=head.codebook_size, n_embed=head.n_embed)),
    )


def _official_params(c) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(c).items()}


def _write_janusflow(cfg: ModelConfig, out: Written) -> None:
    out.config.update(
        vision_gen_enc_config=dict(cls="ShallowUViTEncoder", model_type="vision_gen_enc",
                                   params=_official_params(cfg.parts["flow_encoder"])),
        vision_gen_dec_config=dict(cls="ShallowUViTDecoder", model_type="vision_gen_dec",
                                   params=_official_params(cfg.parts["flow_decoder"])),
    )


register_part_writer("janus", _write_janus, not_stored=VQ_SETTINGS)
register_part_writer("janusflow", _write_janusflow, needs=("flow_encoder", "flow_decoder", "flow_head"),
                     not_stored=FLOW_SETTINGS)

register_part_rules("janus", [
    Rule("gen_vision_model.{rest}", "vq.{rest}"),
    Rule("gen_embed.weight", "vq_head.embed.weight"),
    Rule("gen_aligner.{rest}", "vq_head.aligner.{rest}"),
    Rule("gen_head.{rest}", "vq_head.head.{rest}"),
])
register_part_rules("janusflow", [
    Rule("vision_gen_enc_model.{rest}", "flow_encoder.{rest}"),
    Rule("vision_gen_dec_model.{rest}", "flow_decoder.{rest}"),
    Rule("vision_gen_enc_aligner.{rest}", "flow_head.enc_aligner.{rest}"),
    Rule("vision_gen_dec_aligner_norm.{rest}", "flow_head.dec_norm.{rest}"),
    Rule("vision_gen_dec_aligner.{rest}", "flow_head.dec_aligner.{rest}"),
])


def _register_pipeline() -> None:
    from .pipeline import register

    register()


_register_pipeline()

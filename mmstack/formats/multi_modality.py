"""Official Janus / Janus-Pro and JanusFlow (`model_type: multi_modality`, https://github.com/deepseek-ai/Janus
@1daa72f): config reader and writer, and the complete key tables of both source formats ("janus" when the
config has `gen_vision_config` or no generation part, "janusflow" when it has `vision_gen_enc_config`).

config.json holds `language_config` (transformers 4.38 `LlamaConfig`) and one `{cls, model_type, params}`
section per part. Towers and VQ models are named (`model_name` / `cls`) and looked up in the official
tables (`SIGLIP`, VQ-16); other dimensions live in `custom_architectures` (`formats.common`).
`processor_config.json` / `preprocessor_config.json` beside it hold tags and image normalisation.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from ..chat import CHAT_FORMATS, ChatConfig
from ..config import ModelConfig
from ..errors import ConfigError
from ..io.keymaps import KeyTable, Rule
from ..part_configs import (VQ16, FlowGenerationConfig, ImageProcessingConfig, LayoutConfig, ProjectorConfig,
                            UViTDecoderConfig, UViTEncoderConfig, VisionTowerConfig, VQConfig, VQGenerationConfig)
from .common import ExportSpec, Written, custom_entries, get_int, need, read_json, section, write_custom
from .language import lm_from_llama, lm_rules, lm_to_official_llama

SOURCE_FORMATS = ("janus", "janusflow")

# SigLIP dims by model_name, as the official look-up table (real checkpoints); other towers come from a
# config's `custom_architectures.siglip_model_config`.
SIGLIP = {
    "siglip_so400m_patch14_384": dict(image_size=384, patch_size=14, width=1152, layers=27, heads=16, mlp_ratio=3.7362),
    "siglip_large_patch16_384": dict(image_size=384, patch_size=16, width=1024, layers=24, heads=16, mlp_ratio=4),
}
# Sampling settings: chosen per call or at load time, no official config field holds them.
VQ_SETTINGS = tuple(f"vq_head.{f}" for f in ("cfg_weight", "temperature", "row_layout", "uncond", "image_top_k",
                                               "image_size"))
FLOW_SETTINGS = tuple(f"flow_head.{f}" for f in ("cfg_weight", "steps", "vae_scaling_factor", "vae_downsample"))


def source_format(raw: dict) -> str:
    return "janusflow" if "vision_gen_enc_config" in raw else "janus"


# ------------------------------------------------------------------------------------------ reader


def read(raw: dict, where: str, folder: Optional[Path] = None) -> ModelConfig:
    """config.json (+ processor / preprocessor configs in `folder`) -> ModelConfig. Raises ConfigError."""
    if "language_config" not in raw:
        raise ConfigError(f"{where}: multi_modality config without language_config")
    flow = source_format(raw) == "janusflow"
    lm = lm_from_llama(section(raw, "language_config", where), f"{where}:language_config")
    vision_key = "vision_und_enc_config" if flow else "vision_config"
    tower = _siglip(section(section(raw, vision_key, where), "params", where), raw, f"{where}:{vision_key}")
    hidden = lm.hidden_size
    if flow:  # vision_und_enc_aligner = Linear(width, hidden) and a learned begin-of-image embedding
        projector = ProjectorConfig(kind="linear", input_dim=tower.width, n_embed=hidden, depth=1)
        layout = LayoutConfig(kind="janusflow", n_embed=hidden)
    else:
        a = section(section(raw, "aligner_config", where), "params", where)
        wa = f"{where}:aligner_config"
        projector = ProjectorConfig(kind=a.get("projector_type", "mlp_gelu"), input_dim=get_int(a, "input_dim", wa, tower.width),
                                    n_embed=get_int(a, "n_embed", wa, hidden), depth=get_int(a, "depth", wa, 2))
        layout = LayoutConfig(kind="janus", n_embed=hidden)
    pre = read_json(folder, "preprocessor_config.json")
    proc = read_json(folder, "processor_config.json")
    wpre = str(folder / "preprocessor_config.json") if folder is not None else where
    images = ImageProcessingConfig(
        kind="square_pad", image_size=get_int(pre, "image_size", wpre, tower.image_size),
        image_mean=list(pre.get("image_mean") or [0.5] * 3), image_std=list(pre.get("image_std") or [0.5] * 3),
        min_size=get_int(pre, "min_size", wpre, 14), patch_size=tower.patch_size, downsample_ratio=1,
    )
    # Janus-1.3B and Janus-Pro-1B have identical configs but different role strings: Pro by default,
    # `mmstack.load(..., chat_format="janus-1.3b")` for the original Janus.
    chat = ChatConfig(
        image_tag=proc.get("image_tag", "<image_placeholder>"), image_start_tag=proc.get("image_start_tag", "<begin_of_image>"),
        image_end_tag=proc.get("image_end_tag", "<end_of_image>"), pad_tag=proc.get("pad_tag", "<｜▁pad▁｜>"),
        num_image_tokens=get_int(proc, "num_image_tokens", where, tower.num_tokens, lo=0),
        gen_tag="<｜begin▁of▁generation｜>" if flow else "<begin_of_image>",
        **CHAT_FORMATS["janusflow" if flow else "janus-pro"],
    )
    cfg = ModelConfig(language=lm, vision=tower, projector=projector, layout=layout, image_processing=images,
                      chat=chat, source_format="janusflow" if flow else "janus")
    return _read_flow(raw, cfg, where) if flow else _read_vq(raw, cfg, where)


def _siglip(params: dict, raw: dict, where: str) -> VisionTowerConfig:
    name = params.get("model_name", "siglip_large_patch16_384")
    table = {**SIGLIP, **custom_entries(raw, "siglip_model_config")}
    if name not in table:
        raise ConfigError(f"{where}: unknown SigLIP model_name {name!r} (known: {sorted(table)})")
    s = table[name]
    if not isinstance(s, dict):
        raise ConfigError(f"{where}: the SigLIP entry {name!r} must be an object")
    layers = get_int(s, "layers", where, hi=1024)
    sel = get_int(params, "select_layer", where, -1, lo=-1024, hi=1024)
    layers = min(layers, layers + sel + 1) if sel <= 0 else min(layers, sel)
    return VisionTowerConfig(image_size=get_int(params, "image_size", where, s.get("image_size", 384)),
                             patch_size=get_int(s, "patch_size", where), width=get_int(s, "width", where), layers=layers,
                             heads=get_int(s, "heads", where), mlp_ratio=float(s["mlp_ratio"]), act="gelu",
                             global_pool=s.get("global_pool", "map"))


def _read_vq(raw: dict, cfg: ModelConfig, where: str) -> ModelConfig:
    gv = section(raw, "gen_vision_config", where)
    if not gv:
        return cfg  # an understanding-only Janus
    cls = gv.get("cls", "VQ-16")
    custom = custom_entries(raw, "vq_model")
    if cls in custom:
        vq = VQConfig.from_official(custom[cls])
    elif cls == "VQ-16":
        vq = VQConfig()
    else:
        raise ConfigError(f"{where}: unknown gen_vision_config.cls {cls!r} (known: VQ-16)")
    p = section(gv, "params", where)
    wg = f"{where}:gen_vision_config"
    vq.codebook_size = get_int(p, "image_token_size", wg, vq.codebook_size)
    vq.codebook_embed_dim = get_int(p, "n_embed", wg, vq.codebook_embed_dim)
    ga = section(section(raw, "gen_aligner_config", where), "params", where)
    gh = section(section(raw, "gen_head_config", where), "params", where)
    hidden = cfg.language.hidden_size
    image_size = get_int(section(section(raw, "vision_config", where), "params", where), "image_size", where, 384)
    head = VQGenerationConfig(
        codebook_size=get_int(gh, "image_token_size", where, vq.codebook_size),
        embed_dim=get_int(ga, "input_dim", where, vq.codebook_embed_dim), n_embed=get_int(gh, "n_embed", where, hidden),
        head_embed=get_int(gh, "image_token_embed", where, hidden), aligner_depth=get_int(ga, "depth", where, 2),
        image_size=image_size,
    )
    return cfg.with_parts(vq=vq, vq_head=head)


def _read_flow(raw: dict, cfg: ModelConfig, where: str) -> ModelConfig:
    enc = UViTEncoderConfig.from_official(section(section(raw, "vision_gen_enc_config", where), "params", where))
    dec = UViTDecoderConfig.from_official(section(section(raw, "vision_gen_dec_config", where), "params", where))
    if not enc.block_out_channels:
        raise ConfigError(f"{where}: vision_gen_enc_config.params.block_out_channels is empty")
    image_size = get_int(section(section(raw, "vision_und_enc_config", where), "params", where), "image_size", where, 384)
    head = FlowGenerationConfig(
        latent_channels=enc.input_channels, width=enc.block_out_channels[-1], n_embed=cfg.language.hidden_size,
        norm_eps=cfg.language.rms_norm_eps, image_size=image_size,
    )
    return cfg.with_parts(flow_encoder=enc, flow_decoder=dec, flow_head=head)


# ------------------------------------------------------------------------------------------ writer


def _siglip_params(t: VisionTowerConfig, out: Written) -> dict:
    """`CLIPVisionTower` params: a released SigLIP by `model_name` (fewer blocks through `select_layer`), else
    a `siglip_custom` entry under `custom_architectures` (the official tables cannot name other towers)."""
    params = dict(image_size=t.image_size, model_name="siglip_custom", select_feature="same", select_layer=-1)
    # act / ln_eps are fixed in the official towers: a difference shows in the read-back comparison
    mine = (t.patch_size, t.width, t.heads, float(t.mlp_ratio), t.global_pool)
    for name, s in SIGLIP.items():
        theirs = (s["patch_size"], s["width"], s["heads"], float(s["mlp_ratio"]), s.get("global_pool", "map"))
        if mine == theirs and t.layers <= s["layers"]:
            return dict(params, model_name=name, select_layer=t.layers - s["layers"] - 1)
    write_custom(out, "siglip_model_config", "siglip_custom", dict(
        image_size=t.image_size, patch_size=t.patch_size, width=t.width, layers=t.layers, heads=t.heads,
        mlp_ratio=t.mlp_ratio, global_pool=t.global_pool, use_checkpoint=False))
    return params


def _write_understanding(cfg: ModelConfig, out: Written, fmt: str) -> None:
    t, p, lay = cfg.vision, cfg.projector, cfg.layout
    vision_key = "vision_und_enc_config" if fmt == "janusflow" else "vision_config"
    need(lay.kind == fmt, f"{fmt}: needs the {fmt} layout (layout.kind {fmt!r}); this model's is {lay.kind!r}")
    out.config[vision_key] = dict(cls="CLIPVisionTower", model_type=vision_key[: -len("_config")],
                                  params=_siglip_params(t, out))
    if fmt == "janusflow":  # vision_und_enc_aligner: one Linear(width, hidden)
        need(p.kind == "linear", f"{fmt}: the understanding aligner is one Linear; this model's is {p.kind!r}")
    else:
        need(p.kind in ("linear", "mlp_gelu"), f"{fmt}: projector kind {p.kind!r} is not an official Janus "
                                               "aligner (linear, mlp_gelu)")
        out.config["aligner_config"] = dict(cls="MlpProjector", model_type="aligner", params=dict(
            depth=p.depth, input_dim=p.input_dim, n_embed=p.n_embed, projector_type=p.kind))
    ip = cfg.image_processing
    if ip is not None:
        need(ip.kind == "square_pad", f"{fmt}: needs square-pad image processing; this model's is {ip.kind!r}")
        out.files["preprocessor_config.json"] = dict(
            image_size=ip.image_size, min_size=ip.min_size, image_mean=list(ip.image_mean),
            image_std=list(ip.image_std), rescale_factor=1 / 255, do_normalize=True,
            image_processor_type="VLMImageProcessor", processor_class="VLChatProcessor")
    chat = cfg.chat
    if chat is not None:
        proc = dict(image_tag=chat.image_tag, image_start_tag=chat.image_start_tag, image_end_tag=chat.image_end_tag)
        if fmt == "janusflow":
            proc["image_gen_tag"] = chat.gen_tag
        proc.update(pad_tag=chat.pad_tag, num_image_tokens=chat.num_image_tokens, add_special_token=False,
                    sft_format="deepseek", mask_prompt=True, ignore_id=-100, processor_class="VLChatProcessor")
        out.files["processor_config.json"] = proc


def _write_vq(cfg: ModelConfig, out: Written) -> None:
    have = [k for k in ("vq", "vq_head") if getattr(cfg, k) is not None]
    if not have:
        return  # an understanding-only Janus
    need(len(have) == 2, f"janus: image generation needs both vq and vq_head; this model has only {have[0]}")
    vq, head = cfg.vq, cfg.vq_head
    # "VQ-16" fixes everything but the two sizes its params carry
    released = dataclasses.replace(vq, codebook_size=VQ16.codebook_size, codebook_embed_dim=VQ16.codebook_embed_dim)
    cls = "VQ-16" if released == VQ16 else write_custom(out, "vq_model", "VQ-custom", vq.to_official())
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


def write_parts(cfg: ModelConfig, fmt: str, out: Written) -> None:
    """Fill `out` with the non-language sections of config.json and the processor configs. Raises ExportError."""
    _write_understanding(cfg, out, fmt)
    if fmt == "janus":
        _write_vq(cfg, out)
    else:
        out.config.update(
            vision_gen_enc_config=dict(cls="ShallowUViTEncoder", model_type="vision_gen_enc",
                                       params=_official_params(cfg.flow_encoder)),
            vision_gen_dec_config=dict(cls="ShallowUViTDecoder", model_type="vision_gen_dec",
                                       params=_official_params(cfg.flow_decoder)),
        )


EXPORTS = {
    "janus": ExportSpec("multi_modality", ("MultiModalityCausalLM",), lm_to_official_llama, "language_config",
                        "torch_dtype", write_parts, needs=("vision", "projector", "layout"),
                        not_stored=("chat.gen_tag",) + VQ_SETTINGS),
    "janusflow": ExportSpec("multi_modality", ("MultiModalityCausalLM",), lm_to_official_llama, "language_config",
                            "torch_dtype", write_parts,
                            needs=("vision", "projector", "layout", "flow_encoder", "flow_decoder", "flow_head"),
                            not_stored=("chat.gen_tag",) + FLOW_SETTINGS),
}

# ------------------------------------------------------------------------------------------ key tables

JANUS_RULES = [
    Rule("vision_model.vision_tower.{rest}", "vision.tower.{rest}"),
    Rule("aligner.{rest}", "projector.{rest}"),
    Rule("gen_vision_model.{rest}", "vq.{rest}"),
    Rule("gen_embed.weight", "vq_head.embed.weight"),
    Rule("gen_aligner.{rest}", "vq_head.aligner.{rest}"),
    Rule("gen_head.{rest}", "vq_head.head.{rest}"),
]
JANUSFLOW_RULES = [
    Rule("vision_und_enc_model.vision_tower.{rest}", "vision.tower.{rest}"),
    Rule("vision_und_enc_aligner.weight", "projector.layers.0.weight"),
    Rule("vision_und_enc_aligner.bias", "projector.layers.0.bias"),
    Rule("beg_of_und_embed", "layout.begin_embed"),
    Rule("vision_gen_enc_model.{rest}", "flow_encoder.{rest}"),
    Rule("vision_gen_dec_model.{rest}", "flow_decoder.{rest}"),
    Rule("vision_gen_enc_aligner.{rest}", "flow_head.enc_aligner.{rest}"),
    Rule("vision_gen_dec_aligner_norm.{rest}", "flow_head.dec_norm.{rest}"),
    Rule("vision_gen_dec_aligner.{rest}", "flow_head.dec_aligner.{rest}"),
]
_LM = lm_rules("language_model.model.", "language_model.lm_head.weight")
TABLES = {"janus": KeyTable("janus", JANUS_RULES + _LM), "janusflow": KeyTable("janusflow", JANUSFLOW_RULES + _LM)}


def key_table(source_format: str) -> KeyTable:
    return TABLES[source_format]

"""Registers the understanding parts with the core: config sections, readers of the official formats,
module builders and key-table rules. Internal names: `vision.tower.*`, `projector.layers.*`,
`layout.{image_newline, view_separator, begin_embed}`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mmstack.chat import CHAT_FORMATS, ChatConfig
from mmstack.config import ConfigError, ModelConfig, register_section
from mmstack.formats import register_part_reader
from mmstack.io.keymaps import Rule
from mmstack.loading import register_part_rules
from mmstack.model import register_part_builder
from mmstack.writers import ExportError, Written, official_override, register_part_writer

from .layout import Layout, LayoutConfig
from .projector import Projector, ProjectorConfig
from .towers import VisionTower, VisionTowerConfig


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

    def validate(self) -> None:
        if self.kind not in ("vl2_tiling", "square_pad"):
            raise ConfigError(f"image_processing.kind {self.kind!r} is not one of vl2_tiling, square_pad")
        if self.policy not in ("official", "native"):
            raise ConfigError(f"image_processing.policy must be official or native, got {self.policy!r}")
        if self.kind == "vl2_tiling" and not self.candidate_resolutions:
            raise ConfigError("image_processing: vl2_tiling needs candidate_resolutions")

    @property
    def background(self) -> tuple:
        return tuple(int(m * 255) for m in self.image_mean)


register_section("vision", VisionTowerConfig)
register_section("projector", ProjectorConfig)
register_section("layout", LayoutConfig)
register_section("image_processing", ImageProcessingConfig)

register_part_builder("vision", lambda c, mc, **kw: VisionTower(c, **kw))
register_part_builder("projector", lambda c, mc, **kw: Projector(c, **kw))
register_part_builder("layout", lambda c, mc, **kw: Layout(c, **kw) if c.kind != "janus" else None)

# ------------------------------------------------------------------------------------------ readers

# SigLIP dims by model_name, as the official look-up tables (real checkpoints); tiny test entries come
# from a config's `_golden_overrides.siglip_model_config`.
SIGLIP = {
    "siglip_so400m_patch14_384": dict(image_size=384, patch_size=14, width=1152, layers=27, heads=16, mlp_ratio=3.7362),
    "siglip_large_patch16_384": dict(image_size=384, patch_size=16, width=1024, layers=24, heads=16, mlp_ratio=4),
}


def _json(folder: Optional[Path], name: str) -> dict:
    if folder is None or not (folder / name).exists():
        return {}
    try:
        return json.loads((folder / name).read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConfigError(f"{folder / name}: not valid JSON ({e})") from None


def _read_vl2(raw: dict, cfg: ModelConfig, where: str, folder: Optional[Path]) -> None:
    v = {"image_size": 384, "patch_size": 16, "width": 1024, "layers": 24, "heads": 16, "mlp_ratio": 4,
         "global_pool": "map", **raw.get("vision_config", {})}  # VisionEncoderConfig defaults
    cfg.parts["vision"] = VisionTowerConfig(image_size=int(v["image_size"]), patch_size=int(v["patch_size"]),
                                            width=int(v["width"]), layers=int(v["layers"]), heads=int(v["heads"]),
                                            mlp_ratio=float(v["mlp_ratio"]), act="gelu_tanh",
                                            global_pool=v.get("global_pool") or "")
    p = {"projector_type": "downsample_mlp_gelu", "input_dim": 1152, "n_embed": 2048, "depth": 2, "mlp_ratio": 1,
         "downsample_ratio": 2, **raw.get("projector_config", {})}  # MlpProjectorConfig defaults
    cfg.parts["projector"] = ProjectorConfig(kind=p["projector_type"], input_dim=int(p["input_dim"]),
                                             n_embed=int(p["n_embed"]), depth=int(p["depth"]),
                                             mlp_ratio=int(p["mlp_ratio"]), downsample_ratio=int(p["downsample_ratio"]))
    cfg.parts["layout"] = LayoutConfig(kind="vl2_tiles", n_embed=int(p["n_embed"]),
                                       tile_tag=raw.get("tile_tag", "2D"), global_view_pos=raw.get("global_view_pos", "head"))
    proc = _json(folder, "processor_config.json")
    cands = proc.get("candidate_resolutions") or raw.get("candidate_resolutions")
    if not cands:
        raise ConfigError(f"{where}: no candidate_resolutions (config.json or processor_config.json)")
    cfg.parts["image_processing"] = ImageProcessingConfig(
        kind="vl2_tiling", image_size=int(cands[0][0]), image_mean=list(proc.get("image_mean", [0.5] * 3)),
        image_std=list(proc.get("image_std", [0.5] * 3)), candidate_resolutions=[list(c) for c in cands],
        patch_size=int(proc.get("patch_size", v["patch_size"])), downsample_ratio=int(proc.get("downsample_ratio", p["downsample_ratio"])),
    )
    cfg.parts["chat"] = ChatConfig(image_tag=proc.get("image_token", "<image>"),
                                   pad_tag=proc.get("pad_token", "<｜▁pad▁｜>"), **CHAT_FORMATS["deepseek-vl2"])


def _siglip(params: dict, raw: dict, where: str) -> VisionTowerConfig:
    name = params.get("model_name", "siglip_large_patch16_384")
    table = {**SIGLIP, **raw.get("_golden_overrides", {}).get("siglip_model_config", {})}
    if name not in table:
        raise ConfigError(f"{where}: unknown SigLIP model_name {name!r} (known: {sorted(table)})")
    s = table[name]
    layers = int(s["layers"])
    sel = int(params.get("select_layer", -1))
    layers = min(layers, layers + sel + 1) if sel <= 0 else min(layers, sel)
    return VisionTowerConfig(image_size=int(params.get("image_size", s.get("image_size", 384))),
                             patch_size=int(s["patch_size"]), width=int(s["width"]), layers=layers,
                             heads=int(s["heads"]), mlp_ratio=float(s["mlp_ratio"]), act="gelu",
                             global_pool=s.get("global_pool", "map"))


def _read_janus_common(raw, cfg, where, folder, vision_key: str, flow: bool):
    vis = raw.get(vision_key) or {}
    tower = _siglip(vis.get("params", {}), raw, f"{where}:{vision_key}")
    cfg.parts["vision"] = tower
    hidden = cfg.language.hidden_size
    if flow:
        # JanusFlow: vision_und_enc_aligner = Linear(width, hidden) and a learned begin-of-image embedding
        cfg.parts["projector"] = ProjectorConfig(kind="linear", input_dim=tower.width, n_embed=hidden, depth=1)
        cfg.parts["layout"] = LayoutConfig(kind="janusflow", n_embed=hidden)
    else:
        a = (raw.get("aligner_config") or {}).get("params", {})
        cfg.parts["projector"] = ProjectorConfig(kind=a.get("projector_type", "mlp_gelu"),
                                                 input_dim=int(a.get("input_dim", tower.width)),
                                                 n_embed=int(a.get("n_embed", hidden)), depth=int(a.get("depth", 2)))
        cfg.parts["layout"] = LayoutConfig(kind="janus", n_embed=hidden)
    pre = _json(folder, "preprocessor_config.json")
    proc = _json(folder, "processor_config.json")
    cfg.parts["image_processing"] = ImageProcessingConfig(
        kind="square_pad", image_size=int(pre.get("image_size", tower.image_size)),
        image_mean=list(pre.get("image_mean") or [0.5] * 3), image_std=list(pre.get("image_std") or [0.5] * 3),
        min_size=int(pre.get("min_size", 14)), patch_size=tower.patch_size, downsample_ratio=1,
    )
    # Janus-1.3B and Janus-Pro-1B have identical configs but different role strings: Pro by default,
    # `mmstack.load(..., chat_format="janus-1.3b")` for the original Janus.
    fmt = CHAT_FORMATS["janusflow" if flow else "janus-pro"]
    cfg.parts["chat"] = ChatConfig(
        image_tag=proc.get("image_tag", "<image_placeholder>"), image_start_tag=proc.get("image_start_tag", "<begin_of_image>"),
        image_end_tag=proc.get("image_end_tag", "<end_of_image>"), pad_tag=proc.get("pad_tag", "<｜▁pad▁｜>"),
        num_image_tokens=int(proc.get("num_image_tokens", tower.num_tokens)),
        gen_tag="<｜begin▁of▁generation｜>" if flow else "<begin_of_image>", **fmt,
    )


register_part_reader("deepseek_vl_v2", _read_vl2)
register_part_reader("janus", lambda raw, cfg, where, folder: _read_janus_common(raw, cfg, where, folder, "vision_config", False))
register_part_reader("janusflow", lambda raw, cfg, where, folder: _read_janus_common(raw, cfg, where, folder, "vision_und_enc_config", True))

# ------------------------------------------------------------------------------------------ writers
# The inverse of the readers above (`mmstack.export`): the official field names and constants as the
# released config.json / processor_config.json / preprocessor_config.json files spell them.


def _expect(ok: bool, fmt: str, msg: str) -> None:
    if not ok:
        raise ExportError(f"{fmt}: {msg}")


def _write_vl2(cfg: ModelConfig, out: Written) -> None:
    t, p, lay, ip = (cfg.parts[k] for k in ("vision", "projector", "layout", "image_processing"))
    fmt = "deepseek_vl_v2"
    _expect(lay.kind == "vl2_tiles", fmt, f"needs the tile layout (layout.kind 'vl2_tiles'); this model's is {lay.kind!r}")
    _expect(ip.kind == "vl2_tiling", fmt, f"needs dynamic tiling (image_processing.kind 'vl2_tiling'); this model's is {ip.kind!r}")
    cands = [list(c) for c in ip.candidate_resolutions]
    out.config.update(
        tile_tag=lay.tile_tag, global_view_pos=lay.global_view_pos, candidate_resolutions=cands,
        # VisionEncoderConfig: the official model builds the tower from these dims (model_name is a label)
        vision_config=dict(model_type="vision", model_name="siglip_so400m_patch14_384", image_size=t.image_size,
                           patch_size=t.patch_size, width=t.width, layers=t.layers, heads=t.heads,
                           mlp_ratio=t.mlp_ratio, global_pool=t.global_pool, ignore_head=True, class_token=False,
                           num_classes=0, use_checkpoint=False, weight_init="skip"),
        projector_config=dict(model_type="mlp_projector", projector_type=p.kind, input_dim=p.input_dim,
                              n_embed=p.n_embed, depth=p.depth, mlp_ratio=p.mlp_ratio,
                              downsample_ratio=p.downsample_ratio, token_pooling=False),
    )
    chat = cfg.parts.get("chat")
    out.files["processor_config.json"] = dict(
        candidate_resolutions=cands, patch_size=ip.patch_size, downsample_ratio=ip.downsample_ratio,
        image_mean=list(ip.image_mean), image_std=list(ip.image_std), normalize=True,
        image_token=chat.image_tag if chat else "<image>", pad_token=chat.pad_tag if chat else "<｜▁pad▁｜>",
        add_special_token=False, sft_format="deepseek", mask_prompt=False, ignore_id=-100,
        processor_class="DeepseekVLV2Processor",
    )


def _siglip_params(t: VisionTowerConfig, out: Written) -> dict:
    """`CLIPVisionTower` params: a released SigLIP by `model_name` (fewer blocks through `select_layer`), else
    a `siglip_custom` entry under `_golden_overrides` (the official tables cannot name other towers)."""
    params = dict(image_size=t.image_size, model_name="siglip_custom", select_feature="same", select_layer=-1)
    # act / ln_eps are fixed in the official towers: a difference shows in the read-back comparison
    mine = (t.patch_size, t.width, t.heads, float(t.mlp_ratio), t.global_pool)
    for name, s in SIGLIP.items():
        theirs = (s["patch_size"], s["width"], s["heads"], float(s["mlp_ratio"]), s.get("global_pool", "map"))
        if mine == theirs and t.layers <= s["layers"]:
            return dict(params, model_name=name, select_layer=t.layers - s["layers"] - 1)
    official_override(out, "siglip_model_config", "siglip_custom", dict(
        image_size=t.image_size, patch_size=t.patch_size, width=t.width, layers=t.layers, heads=t.heads,
        mlp_ratio=t.mlp_ratio, global_pool=t.global_pool, use_checkpoint=False))
    return params


def _write_janus_common(cfg: ModelConfig, out: Written, fmt: str, vision_key: str) -> None:
    t, p, lay = (cfg.parts[k] for k in ("vision", "projector", "layout"))
    _expect(lay.kind == fmt, fmt, f"needs the {fmt} layout (layout.kind {fmt!r}); this model's is {lay.kind!r}")
    out.config[vision_key] = dict(cls="CLIPVisionTower", model_type=vision_key[: -len("_config")],
                                  params=_siglip_params(t, out))
    if fmt == "janusflow":  # vision_und_enc_aligner: one Linear(width, hidden)
        _expect(p.kind == "linear", fmt, f"the understanding aligner is one Linear; this model's is {p.kind!r}")
    else:
        _expect(p.kind in ("linear", "mlp_gelu"), fmt, f"projector kind {p.kind!r} is not an official Janus "
                                                      "aligner (linear, mlp_gelu)")
        out.config["aligner_config"] = dict(cls="MlpProjector", model_type="aligner", params=dict(
            depth=p.depth, input_dim=p.input_dim, n_embed=p.n_embed, projector_type=p.kind))
    ip = cfg.parts.get("image_processing")
    if ip is not None:
        _expect(ip.kind == "square_pad", fmt, f"needs square-pad image processing; this model's is {ip.kind!r}")
        out.files["preprocessor_config.json"] = dict(
            image_size=ip.image_size, min_size=ip.min_size, image_mean=list(ip.image_mean),
            image_std=list(ip.image_std), rescale_factor=1 / 255, do_normalize=True,
            image_processor_type="VLMImageProcessor", processor_class="VLChatProcessor")
    chat = cfg.parts.get("chat")
    if chat is not None:
        proc = dict(image_tag=chat.image_tag, image_start_tag=chat.image_start_tag, image_end_tag=chat.image_end_tag)
        if fmt == "janusflow":
            proc["image_gen_tag"] = chat.gen_tag
        proc.update(pad_tag=chat.pad_tag, num_image_tokens=chat.num_image_tokens, add_special_token=False,
                    sft_format="deepseek", mask_prompt=True, ignore_id=-100, processor_class="VLChatProcessor")
        out.files["processor_config.json"] = proc


register_part_writer("deepseek_vl_v2", _write_vl2, needs=("vision", "projector", "layout", "image_processing"))
register_part_writer("janus", lambda cfg, out: _write_janus_common(cfg, out, "janus", "vision_config"),
                     needs=("vision", "projector", "layout"), not_stored=("chat.gen_tag",))
register_part_writer("janusflow", lambda cfg, out: _write_janus_common(cfg, out, "janusflow", "vision_und_enc_config"),
                     needs=("vision", "projector", "layout"), not_stored=("chat.gen_tag",))

# ------------------------------------------------------------------------------------------ key rules

register_part_rules("deepseek_vl_v2", [
    Rule("vision.{rest}", "vision.tower.{rest}"),
    Rule("projector.{rest}", "projector.{rest}"),
    Rule("image_newline", "layout.image_newline"),
    Rule("view_seperator", "layout.view_separator"),  # sic: the official spelling
])
register_part_rules("janus", [
    Rule("vision_model.vision_tower.{rest}", "vision.tower.{rest}"),
    Rule("aligner.{rest}", "projector.{rest}"),
])
register_part_rules("janusflow", [
    Rule("vision_und_enc_model.vision_tower.{rest}", "vision.tower.{rest}"),
    Rule("vision_und_enc_aligner.weight", "projector.layers.0.weight"),
    Rule("vision_und_enc_aligner.bias", "projector.layers.0.bias"),
    Rule("beg_of_und_embed", "layout.begin_embed"),
])


def _register_pipeline() -> None:
    from .pipeline import register

    register()


_register_pipeline()

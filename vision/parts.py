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

"""Official DeepSeek-VL2 (`model_type: deepseek_vl_v2`, https://github.com/deepseek-ai/DeepSeek-VL2 @ef9f91e2):
config reader and writer, and the complete key table.

config.json holds `language_config` (DeepSeek's own `DeepseekV2Config`: MLA or, in tiny, LlamaAttention;
DeepSeekMoE), `vision_config` (`VisionEncoderConfig`: the SigLIP-SO400M dims, tanh GELU),
`projector_config` (`MlpProjectorConfig`: 2x2 downsample + MLP), `tile_tag` / `global_view_pos` and the
candidate tiling resolutions; `processor_config.json` beside it holds the image normalisation and tags.

Checkpoint keys: `language.model.*` / `language.lm_head.weight` (experts one module each, stacked here),
`vision.*` (timm names), `projector.*`, `image_newline`, `view_seperator` (sic).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..chat import CHAT_FORMATS, ChatConfig
from ..config import ModelConfig
from ..errors import ConfigError
from ..io.keymaps import KeyTable, Rule
from ..part_configs import ImageProcessingConfig, LayoutConfig, ProjectorConfig, VisionTowerConfig
from .common import ExportSpec, Written, get_float, get_int, need, read_json, section
from .language import OFFICIAL_DEEPSEEK_V2_DEFAULTS, lm_from_deepseek, lm_rules, lm_to_official_deepseek

SOURCE_FORMATS = ("deepseek_vl_v2",)

# VisionEncoderConfig / MlpProjectorConfig defaults (deepseek_vl2/models/modeling_deepseek_vl_v2.py)
VISION_DEFAULTS = {"image_size": 384, "patch_size": 16, "width": 1024, "layers": 24, "heads": 16, "mlp_ratio": 4,
                   "global_pool": "map"}
PROJECTOR_DEFAULTS = {"projector_type": "downsample_mlp_gelu", "input_dim": 1152, "n_embed": 2048, "depth": 2,
                      "mlp_ratio": 1, "downsample_ratio": 2}


def read(raw: dict, where: str, folder: Optional[Path] = None) -> ModelConfig:
    """config.json (+ processor_config.json in `folder`) -> ModelConfig. Raises ConfigError."""
    if "language_config" not in raw:
        raise ConfigError(f"{where}: deepseek_vl_v2 config without language_config")
    lm = lm_from_deepseek(section(raw, "language_config", where), OFFICIAL_DEEPSEEK_V2_DEFAULTS,
                          f"{where}:language_config")
    wv, wp = f"{where}:vision_config", f"{where}:projector_config"
    v = {**VISION_DEFAULTS, **section(raw, "vision_config", where)}
    tower = VisionTowerConfig(image_size=get_int(v, "image_size", wv), patch_size=get_int(v, "patch_size", wv),
                              width=get_int(v, "width", wv), layers=get_int(v, "layers", wv, hi=1024),
                              heads=get_int(v, "heads", wv), mlp_ratio=get_float(v, "mlp_ratio", wv), act="gelu_tanh",
                              global_pool=v.get("global_pool") or "")
    p = {**PROJECTOR_DEFAULTS, **section(raw, "projector_config", where)}
    projector = ProjectorConfig(kind=p["projector_type"], input_dim=get_int(p, "input_dim", wp),
                                n_embed=get_int(p, "n_embed", wp), depth=get_int(p, "depth", wp),
                                mlp_ratio=get_int(p, "mlp_ratio", wp), downsample_ratio=get_int(p, "downsample_ratio", wp))
    layout = LayoutConfig(kind="vl2_tiles", n_embed=projector.n_embed, tile_tag=raw.get("tile_tag", "2D"),
                          global_view_pos=raw.get("global_view_pos", "head"))
    proc = read_json(folder, "processor_config.json")
    wproc = f"{folder / 'processor_config.json'}" if folder is not None else where
    cands = proc.get("candidate_resolutions") or raw.get("candidate_resolutions")
    if not cands or not isinstance(cands, list) or not isinstance(cands[0], list) or not cands[0]:
        raise ConfigError(f"{where}: no candidate_resolutions (config.json or processor_config.json)")
    images = ImageProcessingConfig(
        kind="vl2_tiling", image_size=get_int({"side": cands[0][0]}, "side", f"{where}: candidate_resolutions[0]"),
        image_mean=list(proc.get("image_mean", [0.5] * 3)), image_std=list(proc.get("image_std", [0.5] * 3)),
        candidate_resolutions=[list(c) if isinstance(c, (list, tuple)) else c for c in cands],
        patch_size=get_int(proc, "patch_size", wproc, tower.patch_size),
        downsample_ratio=get_int(proc, "downsample_ratio", wproc, projector.downsample_ratio),
    )
    chat = ChatConfig(image_tag=proc.get("image_token", "<image>"), pad_tag=proc.get("pad_token", "<｜▁pad▁｜>"),
                      **CHAT_FORMATS["deepseek-vl2"])
    return ModelConfig(language=lm, vision=tower, projector=projector, layout=layout, image_processing=images,
                       chat=chat, source_format="deepseek_vl_v2")


def write_parts(cfg: ModelConfig, fmt: str, out: Written) -> None:
    """Fill `out` with the vision fields of config.json and processor_config.json. Raises ExportError."""
    t, p, lay, ip = cfg.vision, cfg.projector, cfg.layout, cfg.image_processing
    need(lay.kind == "vl2_tiles", f"{fmt}: needs the tile layout (layout.kind 'vl2_tiles'); this model's is {lay.kind!r}")
    need(ip.kind == "vl2_tiling",
         f"{fmt}: needs dynamic tiling (image_processing.kind 'vl2_tiling'); this model's is {ip.kind!r}")
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
    chat = cfg.chat
    out.files["processor_config.json"] = dict(
        candidate_resolutions=cands, patch_size=ip.patch_size, downsample_ratio=ip.downsample_ratio,
        image_mean=list(ip.image_mean), image_std=list(ip.image_std), normalize=True,
        image_token=chat.image_tag if chat else "<image>", pad_token=chat.pad_tag if chat else "<｜▁pad▁｜>",
        add_special_token=False, sft_format="deepseek", mask_prompt=False, ignore_id=-100,
        processor_class="DeepseekVLV2Processor",
    )


EXPORTS = {"deepseek_vl_v2": ExportSpec("deepseek_vl_v2", ("DeepseekVLV2ForCausalLM",), lm_to_official_deepseek,
                                        "language_config", "torch_dtype", write_parts,
                                        needs=("vision", "projector", "layout", "image_processing"))}


VISION_RULES = [
    Rule("vision.{rest}", "vision.tower.{rest}"),
    Rule("projector.{rest}", "projector.{rest}"),
    Rule("image_newline", "layout.image_newline"),
    Rule("view_seperator", "layout.view_separator"),  # sic: the official spelling
]
# Part rules first: the language catch-all `language.model.{rest}` cannot shadow them.
TABLE = KeyTable("deepseek_vl_v2", VISION_RULES + lm_rules("language.model.", "language.lm_head.weight"))


def key_table(source_format: str = "deepseek_vl_v2") -> KeyTable:
    return TABLE

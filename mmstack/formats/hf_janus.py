"""transformers' `janus` format (a `JanusForConditionalGeneration.save_pretrained` folder) -> mmstack parts.

Config reader and writer and the complete key table: `JanusConfig.vision_config` (SigLIP tower + aligner) and `vq_config` (VQ-16
tokenizer, generation embedding / aligner / head) become the same sections the official Janus format
fills, and the key rules below rename every transformers key to our internal names (checked strictly).

transformers' module tree is the official one renamed by `convert_janus_weights_to_hf.py`:
q/k/v split from `qkv`, `pos_embed` squeezed to an `nn.Embedding`, `Sequential` aligners turned into
`fc1` + `hidden_layers`, VQ `conv_blocks`/`res`/`mid.{0,1,2}` renamed to `down|up`/`block`/`mid.block_1|
attn_1|block_2` (decoder levels keep their order: `up.0` is the lowest resolution, as our
`conv_blocks.0`), `attn_pool` and `quantize.codebook_used` dropped.

Semantics kept from the official code rather than transformers (see the reference notes):
- VQ encode L2-normalises z and the codebook (transformers' quantizer does not; decode agrees).
- Image generation uses the official interleaved rows and `[1:-1] = pad` unconditional prompt; for a
  `BOS ... <begin_of_image>` prompt both give the same rows and so the same codes.
- Codes are sampled over the whole codebook (transformers adds its default top_k=50 when sampling).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional

from ..chat import CHAT_FORMATS, ChatConfig
from ..config import ModelConfig
from ..errors import ConfigError
from ..io.keymaps import KeyTable, Rule
from ..part_configs import (ImageProcessingConfig, LayoutConfig, ProjectorConfig, VisionTowerConfig, VQConfig,
                            VQGenerationConfig)
from .common import ExportSpec, Written, need, read_json
from .language import lm_from_llama, lm_rules, lm_to_hf_llama
from .multi_modality import VQ_SETTINGS

SOURCE_FORMATS = ("hf_janus",)

log = logging.getLogger(__name__)

# transformers 5 models/janus/configuration_janus.py JanusVisionConfig / JanusVQVAEConfig defaults.
HF_JANUS_VISION_DEFAULTS = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_channels=3, image_size=384, patch_size=16,
    hidden_act="gelu", layer_norm_eps=1e-6, mlp_ratio=4.0, attention_bias=True, projection_dim=2048,
    use_qk_norm=False, depth=2, num_image_tokens=576,
)
HF_JANUS_VQ_DEFAULTS = dict(
    embed_dim=8, num_embeddings=16384, double_latent=False, latent_channels=256, in_channels=3, base_channels=128,
    channel_multiplier=[1, 1, 2, 2, 4], num_res_blocks=2, dropout=0.0, out_channels=3, projection_dim=2048,
    num_hidden_layers=2, hidden_act="gelu", image_token_embed_dim=2048,
)
# Aligners are `fc1` + `hidden_layers.{k}`; ours are Sequential `layers.{0, 2, 4, ...}`. Key rules cannot
# do arithmetic on an index, so one rule per hidden layer up to this depth (the released models use 2).
MAX_ALIGNER_DEPTH = 8

_TAGS = dict(image_token="<image_placeholder>", boi_token="<begin_of_image>", eoi_token="<end_of_image>",
             pad_token="<｜▁pad▁｜>")


def _square(v, what: str, where: str) -> int:
    """transformers accepts int or [h, w] sizes; our towers are square."""
    if isinstance(v, (list, tuple)):
        if len(v) != 2 or v[0] != v[1]:
            raise ConfigError(f"{where}: {what} {v} is not square (only square images are supported)")
        v = v[0]
    return int(v)


def _need(ok: bool, where: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {msg}")


def _vision(raw: dict, hidden: int, where: str) -> tuple[VisionTowerConfig, ProjectorConfig, int]:
    v = {**HF_JANUS_VISION_DEFAULTS, **(raw.get("vision_config") or {})}
    w = f"{where}:vision_config"
    # the aligner runs vision_config.hidden_act too; ours is exact GELU in both places
    _need(v["hidden_act"] == "gelu", w, f"hidden_act {v['hidden_act']!r} is not supported (only 'gelu')")
    _need(not v["use_qk_norm"], w, "use_qk_norm=True is not supported (the released models have none)")
    _need(bool(v["attention_bias"]), w, "attention_bias=False is not supported (SigLIP has q/k/v biases)")
    _need(int(v["num_channels"]) == 3, w, f"num_channels {v['num_channels']} is not 3")
    _need(int(v["projection_dim"]) == hidden, w,
          f"projection_dim {v['projection_dim']} != text_config.hidden_size {hidden}: the aligner output is "
          "spliced into the text embeddings")
    _need(1 <= int(v["depth"]) <= MAX_ALIGNER_DEPTH, w, f"depth {v['depth']} is not in 1..{MAX_ALIGNER_DEPTH}")
    tower = VisionTowerConfig(
        image_size=_square(v["image_size"], "image_size", w), patch_size=_square(v["patch_size"], "patch_size", w),
        width=int(v["hidden_size"]), layers=int(v["num_hidden_layers"]), heads=int(v["num_attention_heads"]),
        mlp_ratio=float(v["mlp_ratio"]), act="gelu", global_pool="",  # JanusVisionModel has no pooling head
        ln_eps=float(v["layer_norm_eps"]),
    )
    projector = ProjectorConfig(kind="mlp_gelu", input_dim=tower.width, n_embed=int(v["projection_dim"]),
                                depth=int(v["depth"]))
    if int(v["num_image_tokens"]) != tower.num_tokens:
        # transformers generates num_image_tokens codes but decodes (image_size // patch_size)^2 of them
        log.warning("%s: num_image_tokens %s != (image_size // patch_size)^2 = %d; using %d (the only count "
                    "transformers can both splice and decode)", w, v["num_image_tokens"], tower.num_tokens,
                    tower.num_tokens)
    return tower, projector, tower.num_tokens


def _vq(raw: dict, hidden: int, grid: int, where: str) -> tuple[VQConfig, VQGenerationConfig]:
    q = {**HF_JANUS_VQ_DEFAULTS, **(raw.get("vq_config") or {})}
    w = f"{where}:vq_config"
    _need(q["hidden_act"] == "gelu", w, f"hidden_act {q['hidden_act']!r} is not supported (only 'gelu')")
    _need(not q["double_latent"], w, "double_latent=True is not supported")
    _need(int(q["in_channels"]) == 3 and int(q["out_channels"]) == 3, w, "in_channels/out_channels must be 3")
    _need(int(q["projection_dim"]) == hidden, w,
          f"projection_dim {q['projection_dim']} != text_config.hidden_size {hidden}: the generation aligner "
          "output is the LLM input")
    # transformers' head is Linear(image_token_embed_dim -> projection_dim) -> GELU -> Linear(-> codes) on
    # the LLM hidden state; the official head is Linear(n_embed -> image_token_embed) -> ... . Only with
    # image_token_embed_dim == hidden size do the two describe the same module (the released models).
    _need(int(q["image_token_embed_dim"]) == hidden, w,
          f"image_token_embed_dim {q['image_token_embed_dim']} != text_config.hidden_size {hidden}: transformers' "
          "generation head (proj_out: image_token_embed_dim -> projection_dim) then does not fit the LLM output "
          "nor the official head's shapes")
    _need(1 <= int(q["num_hidden_layers"]) <= MAX_ALIGNER_DEPTH, w,
          f"num_hidden_layers {q['num_hidden_layers']} is not in 1..{MAX_ALIGNER_DEPTH}")
    mult = tuple(int(m) for m in q["channel_multiplier"])
    vq = VQConfig(
        codebook_size=int(q["num_embeddings"]), codebook_embed_dim=int(q["embed_dim"]),
        z_channels=int(q["latent_channels"]), ch=int(q["base_channels"]), ch_mult=mult, decoder_ch_mult=mult,
        num_res_blocks=int(q["num_res_blocks"]), dropout=float(q["dropout"]),
        codebook_show_usage=False,  # transformers drops the (never used) `codebook_used` buffer
    )
    head = VQGenerationConfig(
        codebook_size=vq.codebook_size, embed_dim=vq.codebook_embed_dim, n_embed=hidden,
        head_embed=int(q["projection_dim"]), aligner_depth=int(q["num_hidden_layers"]),
        # generated images hold grid x grid codes, as transformers decodes them (num_patches^2)
        image_size=grid * vq.downsample,
    )
    return vq, head


def _tags(folder: Optional[Path]) -> dict:
    """Tag strings from tokenizer_config.json (`image_token` ... at the top level or in
    `extra_special_tokens`, as transformers' Janus tokenizers carry them), else the released ones."""
    tc = read_json(folder, "tokenizer_config.json")
    extra = tc.get("extra_special_tokens") if isinstance(tc.get("extra_special_tokens"), dict) else {}
    out = {}
    for k, default in _TAGS.items():
        val = extra.get(k, tc.get(k, default))
        out[k] = val.get("content", default) if isinstance(val, dict) else str(val)
    return out


def read(raw: dict, where: str, folder: Optional[Path] = None) -> ModelConfig:
    """A `JanusForConditionalGeneration` folder's config.json (+ preprocessor / tokenizer configs) -> ModelConfig."""
    # transformers ties lm_head on the top-level flag (default True), not text_config's.
    tie = raw.get("tie_word_embeddings", True)
    text = raw.get("text_config") or {}
    lm = lm_from_llama(text, f"{where}:text_config", tie_default=tie)
    hidden = lm.hidden_size
    tower, projector, n_tokens = _vision(raw, hidden, where)
    pre = read_json(folder, "preprocessor_config.json")
    size = pre.get("size") or {}
    size = size.get("height", size.get("shortest_edge")) if isinstance(size, dict) else size
    images = ImageProcessingConfig(
        kind="square_pad", image_size=int(size or tower.image_size),
        image_mean=list(pre.get("image_mean") or [0.5] * 3), image_std=list(pre.get("image_std") or [0.5] * 3),
        min_size=int(pre.get("min_size", 14)), patch_size=tower.patch_size, downsample_ratio=1,
    )
    tags = _tags(folder)
    chat = ChatConfig(
        image_tag=tags["image_token"], image_start_tag=tags["boi_token"], image_end_tag=tags["eoi_token"],
        pad_tag=tags["pad_token"], num_image_tokens=n_tokens, gen_tag=tags["boi_token"], **CHAT_FORMATS["janus-pro"],
    )
    vq, head = _vq(raw, hidden, math.isqrt(n_tokens), where)
    return ModelConfig(language=lm, vision=tower, projector=projector, layout=LayoutConfig(kind="janus", n_embed=hidden),
                       image_processing=images, chat=chat, vq=vq, vq_head=head, source_format="hf_janus")

# ------------------------------------------------------------------------------------------ writer
# The inverse of `_read_hf_janus` (`mmstack.export`); `JanusForConditionalGeneration` can hold exactly the
# models whose aligners run tower -> LLM width and whose generation head is LLM width -> LLM width.

HF_JANUS_IMAGE_TOKEN_ID = 100581  # JanusConfig's default, the released tokenizer's <image_placeholder>


def write_parts(cfg: ModelConfig, fmt: str, out: Written) -> None:
    """Fill `out` with the vision and VQ fields of config.json and preprocessor_config.json. Raises ExportError."""
    t, p, lay, vq, head = cfg.vision, cfg.projector, cfg.layout, cfg.vq, cfg.vq_head
    hidden = cfg.language.hidden_size

    def expect(ok: bool, msg: str) -> None:
        need(ok, f"{fmt}: {msg}")

    expect(lay.kind == "janus", f"needs the Janus layout (layout.kind 'janus'); this model's is {lay.kind!r}")
    expect(p.kind == "mlp_gelu" and p.input_dim == t.width and p.n_embed == hidden,
           f"the aligner must be mlp_gelu from the tower width {t.width} to the LLM width {hidden}; this model's is "
           f"{p.kind} {p.input_dim} -> {p.n_embed}")
    expect(head.head_embed == hidden and head.n_embed == hidden,
           f"transformers' generation head maps the LLM width {hidden} to itself before the code logits; this "
           f"model's head is {head.n_embed} -> {head.head_embed}")
    expect(tuple(vq.ch_mult) == tuple(vq.decoder_ch_mult), "transformers' VQ has one channel_multiplier for the "
           f"encoder and decoder; this model's are {list(vq.ch_mult)} / {list(vq.decoder_ch_mult)}")
    expect(1 <= p.depth <= MAX_ALIGNER_DEPTH and 1 <= head.aligner_depth <= MAX_ALIGNER_DEPTH,
           f"aligner depths must be in 1..{MAX_ALIGNER_DEPTH}")
    grid = t.image_size // t.patch_size
    chat = cfg.chat
    tag = chat.image_tag if chat else _TAGS["image_token"]
    image_token_id = out.token_id(tag)
    if image_token_id is None:
        log.warning("hf_janus: %r not found (no tokenizer given?): image_token_id set to the released %d", tag,
                    HF_JANUS_IMAGE_TOKEN_ID)
        image_token_id = HF_JANUS_IMAGE_TOKEN_ID
    out.config.update(
        vision_config=dict(
            model_type="janus_vision_model", hidden_size=t.width, num_hidden_layers=t.layers,
            num_attention_heads=t.heads, num_channels=3, image_size=t.image_size, patch_size=t.patch_size,
            hidden_act="gelu", layer_norm_eps=t.ln_eps, mlp_ratio=t.mlp_ratio, attention_bias=True,
            projection_dim=hidden, use_qk_norm=False, depth=p.depth, num_image_tokens=grid * grid),
        vq_config=dict(
            model_type="janus_vqgan", embed_dim=vq.codebook_embed_dim, num_embeddings=vq.codebook_size,
            double_latent=False, latent_channels=vq.z_channels, in_channels=3, out_channels=3, base_channels=vq.ch,
            channel_multiplier=list(vq.ch_mult), num_res_blocks=vq.num_res_blocks, dropout=vq.dropout,
            projection_dim=hidden, num_hidden_layers=head.aligner_depth, hidden_act="gelu",
            image_token_embed_dim=hidden, num_patches=grid),
        image_token_id=image_token_id, tie_word_embeddings=cfg.language.tie_word_embeddings,
    )
    ip = cfg.image_processing
    if ip is not None:
        out.files["preprocessor_config.json"] = dict(
            image_processor_type="JanusImageProcessor", size={"height": ip.image_size, "width": ip.image_size},
            min_size=ip.min_size, image_mean=list(ip.image_mean), image_std=list(ip.image_std), do_resize=True,
            resample=3, do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_pad=True,
            background_color=list(ip.background))


# The official tower's unused attention-pool head and the VQ's never-updated usage buffer have no place
# in transformers' model: exporting an official Janus drops them (with a warning).
EXPORTS = {"hf_janus": ExportSpec("janus", ("JanusForConditionalGeneration",), lm_to_hf_llama, "text_config", "dtype",
                                  write_parts, needs=("vision", "projector", "layout", "vq", "vq_head"),
                                  not_stored=VQ_SETTINGS + ("vision.global_pool", "vq.codebook_show_usage"))}

# ------------------------------------------------------------------------------------------ key rules
# Order matters both ways: the first rule whose source (loading) or internal pattern (export) matches
# wins, so specific patterns come before the `{rest}` catch-alls of the same subtree.

_V, _T = "model.vision_model.", "vision.tower."
_L = _V + "encoder.layers.{i}."


def _qkv() -> list[Rule]:
    # no `{rest}` in the internal name: export then yields all three parts of `qkv`
    return [Rule(f"{_L}self_attn.{p}_proj.{s}", f"{_T}blocks.{{i}}.attn.qkv.{s}", part=(k, 3))
            for s in ("weight", "bias") for k, p in enumerate("qkv")]


def _aligner(src: str, dst: str) -> list[Rule]:
    """`fc1` + `hidden_layers.{k}` -> Sequential `layers.{0, 2, 4, ...}` (GELUs at the odd indices)."""
    rules = [Rule(f"{src}fc1.{{rest}}", f"{dst}layers.0.{{rest}}")]
    rules += [Rule(f"{src}hidden_layers.{k}.{{rest}}", f"{dst}layers.{2 * k + 2}.{{rest}}")
              for k in range(MAX_ALIGNER_DEPTH - 1)]
    return rules


def _vq_coder(side: str, levels: str, resample: str) -> list[Rule]:
    s, d = f"model.vqmodel.{side}.", f"vq.{side}."
    return [
        Rule(f"{s}{levels}.{{i}}.block.{{rest}}", f"{d}conv_blocks.{{i}}.res.{{rest}}"),
        Rule(f"{s}{levels}.{{i}}.attn.{{rest}}", f"{d}conv_blocks.{{i}}.attn.{{rest}}"),
        Rule(f"{s}{levels}.{{i}}.{resample}.{{rest}}", f"{d}conv_blocks.{{i}}.{resample}.{{rest}}"),
        Rule(f"{s}mid.block_1.{{rest}}", f"{d}mid.0.{{rest}}"),
        Rule(f"{s}mid.attn_1.{{rest}}", f"{d}mid.1.{{rest}}"),
        Rule(f"{s}mid.block_2.{{rest}}", f"{d}mid.2.{{rest}}"),
        Rule(f"{s}{{rest}}", f"{d}{{rest}}"),  # conv_in, norm_out, conv_out
    ]


HF_JANUS_RULES = [
    # SigLIP tower (timm names)
    Rule(_V + "embeddings.patch_embedding.{rest}", _T + "patch_embed.proj.{rest}"),
    Rule(_V + "embeddings.position_embedding.weight", _T + "pos_embed", squeeze=0),  # [N, D] vs [1, N, D]
    *_qkv(),
    Rule(_L + "self_attn.projection_layer.{rest}", _T + "blocks.{i}.attn.proj.{rest}"),
    Rule(_L + "layer_norm1.{rest}", _T + "blocks.{i}.norm1.{rest}"),
    Rule(_L + "layer_norm2.{rest}", _T + "blocks.{i}.norm2.{rest}"),
    Rule(_L + "mlp.{rest}", _T + "blocks.{i}.mlp.{rest}"),
    Rule(_V + "post_layernorm.{rest}", _T + "norm.{rest}"),
    *_aligner("model.aligner.", "projector."),
    # VQ-16 tokenizer
    *_vq_coder("encoder", "down", "downsample"),
    *_vq_coder("decoder", "up", "upsample"),
    Rule("model.vqmodel.{rest}", "vq.{rest}"),  # quantize.embedding, quant_conv, post_quant_conv
    # generation embedding, aligner and head
    Rule("model.generation_embeddings.weight", "vq_head.embed.weight"),
    *_aligner("model.generation_aligner.", "vq_head.aligner."),
    Rule("model.generation_head.proj_out.{rest}", "vq_head.head.output_mlp_projector.{rest}"),
    Rule("model.generation_head.vision_head.{rest}", "vq_head.head.vision_head.{rest}"),
]

TABLE = KeyTable("hf_janus", HF_JANUS_RULES + lm_rules("model.language_model.", "lm_head.weight"))


def key_table(source_format: str = "hf_janus") -> KeyTable:
    return TABLE

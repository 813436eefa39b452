"""`mmstack build-demo --recipe assets/demo-recipe.json --out DIR`: re-create the embedded demo model.

Stages (each resumable; a finished stage is skipped):
  1. `synth` the training set (and a held-out set with another seed);
  2. train a byte-level BPE tokenizer on the corpus text (`tokenizers`), with the chat/grounding/image tokens;
  3. build the native model (MLA + MoE backbone, tiled SigLIP-style encoder, VQ generation head) randomly;
  4. `finetune` stages from the recipe (VQ tokenizer first, then understanding + image-token generation);
  5. store the weights in half precision as a native model folder.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from mmstack.io.atomic import atomic_write_json

log = logging.getLogger(__name__)

SPECIAL = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<image>", "<|ref|>", "<|/ref|>", "<|det|>",
           "<|/det|>", "<|grounding|>", "<|User|>", "<|Assistant|>", "<begin_of_image>", "<end_of_image>"]


def train_tokenizer(texts, vocab_size: int, out_dir: Path) -> Path:
    """Byte-level BPE over `texts`; special tokens first (ids 0.. in SPECIAL order)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tk.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": SPECIAL[0], "eos_token": SPECIAL[1],
        "pad_token": SPECIAL[2]}, indent=2))
    return out_dir


def _corpus(data_dir: Path):
    for name in ("data.jsonl", "t2i.jsonl"):
        for line in (data_dir / name).read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if "prompt" in rec:
                yield rec["prompt"]
            for m in rec.get("messages", []):
                yield m["content"].replace("<image>", " ")


def demo_config(recipe: dict, vocab_size: int):
    """The native ModelConfig the recipe describes (every dimension from the recipe file)."""
    from mmstack.chat import CHAT_FORMATS, ChatConfig
    from mmstack.config import LMConfig, MLAConfig, ModelConfig, MoEConfig, RopeConfig
    from mmstack.generation.parts import VQGenerationConfig
    from mmstack.generation.vq import VQConfig
    from mmstack.vision.layout import LayoutConfig
    from mmstack.vision.parts import ImageProcessingConfig
    from mmstack.vision.projector import ProjectorConfig
    from mmstack.vision.towers import VisionTowerConfig

    m = recipe["model"]
    lm = m["language"]
    d = lm["hidden_size"]
    language = LMConfig(
        vocab_size=vocab_size, hidden_size=d, num_layers=lm["num_layers"], num_heads=lm["num_heads"],
        intermediate_size=lm["intermediate_size"], attention="mla", mla=MLAConfig(**lm["mla"]),
        moe=MoEConfig(**lm["moe"]), rope=RopeConfig(style="interleaved"), max_position_embeddings=lm["max_position_embeddings"],
        bos_token_id=0, eos_token_id=1, pad_token_id=2)
    v = m["vision"]
    vq = m["vq"]
    parts = {
        "vision": VisionTowerConfig(**v["tower"]),
        "projector": ProjectorConfig("downsample_mlp_gelu", v["tower"]["width"], d, 2, 1, 2),
        "layout": LayoutConfig("vl2_tiles", d),
        "image_processing": ImageProcessingConfig("vl2_tiling", v["tile"], candidate_resolutions=v["candidate_resolutions"],
                                                  patch_size=v["tower"]["patch_size"], downsample_ratio=2, policy="native",
                                                  fit_size=[recipe["synth"]["train"]["image_size"]] * 2,
                                                  single_tile_global_only=v.get("single_tile_global_only", False)),
        "chat": ChatConfig(image_start_tag="<begin_of_image>", image_end_tag="<end_of_image>", gen_tag="<begin_of_image>",
                           **CHAT_FORMATS["deepseek-vl2"]),
        "vq": VQConfig(**{k: tuple(x) if isinstance(x, list) else x for k, x in vq["tokenizer"].items()}),
        "vq_head": VQGenerationConfig(codebook_size=vq["tokenizer"]["codebook_size"],
                                      embed_dim=vq["tokenizer"]["codebook_embed_dim"], n_embed=d, head_embed=d,
                                      image_size=vq["image_size"], cfg_weight=vq["cfg_weight"], temperature=vq["temperature"]),
    }
    return ModelConfig(language=language, name=recipe.get("name", "mmstack-demo"), **parts)


def _train_seconds(stage_dir: Path) -> float:
    """Sum of the step times a stage logged (metrics.jsonl), so a resumed build still reports its cost."""
    total = 0.0
    metrics = stage_dir / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                total += float(json.loads(line).get("seconds", 0.0))
            except (ValueError, AttributeError):
                continue
    return round(total, 1)


def write_demo_settings(model_dir: Path, t2i_prompts, n: int = 6) -> None:
    """`demo.json` for the web demo: the first distinct held-out text-to-image prompts as examples, and the
    greedy decoding the held-out scores were measured with (a tiny model copies prompt words into its answers,
    so a repetition penalty or sampling hurts it)."""
    from .synth import CHART_QUESTION, OCR_QUESTION

    picked = list(dict.fromkeys(t2i_prompts))[:n]
    settings = {"generate_examples": picked,
                "chat_sampling": {"temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.0, "max_new_tokens": 128},
                # the batch jobs ask what the model was trained to answer (`mmstack ocr` / `mmstack chart`)
                "tasks": {"ocr": {"prompt": OCR_QUESTION, "max_new_tokens": 64},
                          "chart": {"prompt": CHART_QUESTION, "max_new_tokens": 192}}}
    atomic_write_json(model_dir / "demo.json", settings)


def build(recipe_path: Path, work: Path, out: Path) -> Path:
    """Run every stage of the recipe (resuming finished ones) and write the half-precision model to `out`."""
    from mmstack.loading import build_model, load_model, save_pretrained

    from . import synth
    from .train import TrainArgs, run

    recipe = json.loads(Path(recipe_path).read_text())
    if recipe.get("threads"):  # 1 thread is slower on an idle machine but never thrashes beside other work
        torch.set_num_threads(int(recipe["threads"]))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = work / "data"
    if not (data / "data.jsonl").exists():
        synth.generate(data, **recipe["synth"]["train"], overwrite=True)
    heldout = work / "heldout"
    if not (heldout / "data.jsonl").exists():
        synth.generate(heldout, **recipe["synth"]["heldout"], overwrite=True)
    init = work / "init"
    if not (init / "config.json").exists():
        tok = train_tokenizer(_corpus(data), recipe["tokenizer"]["vocab_size"], work / "tokenizer")
        from mmstack.tokenizer import Tokenizer

        vocab = Tokenizer.from_dir(tok).vocab_size
        torch.manual_seed(recipe.get("seed", 0))
        save_pretrained(build_model(demo_config(recipe, vocab), "cpu"), init, tokenizer_dir=tok)
    current = init
    stage_seconds = {}
    for i, stage in enumerate(recipe["stages"]):
        sdir = work / f"stage{i}-{stage['task']}"
        if not (sdir / "model" / "config.json").exists():
            files = [str(data / f) for f in stage.get("data", ["data.jsonl", "t2i.jsonl"])]
            args = {k: v for k, v in stage.items() if k != "data"}
            log.info("stage %d: %s", i, args)
            run(TrainArgs(model=str(current), data=files, out=str(sdir), resume=True, **args))
        current = sdir / "model"
        stage_seconds[sdir.name] = _train_seconds(sdir)
    model = load_model(current, device="cpu", dtype=torch.float16)
    if out.exists():
        shutil.rmtree(out)
    save_pretrained(model, out, tokenizer_dir=current)
    meta = {"recipe": str(recipe_path), "seconds": round(time.time() - t0, 1), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "stage_train_seconds": stage_seconds,
            "note": "seconds: this invocation's wall time (finished stages are skipped on a rerun); "
                    "stage_train_seconds: the sum of each stage's logged step times, whichever run did them"}
    (out / "build.json").write_text(json.dumps(meta, indent=2))
    prompts = [json.loads(x)["prompt"] for x in (heldout / "t2i.jsonl").read_text(encoding="utf-8").splitlines()]
    write_demo_settings(out, prompts)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default=None, help="recipe JSON (default: the one shipped in mmstack.assets)")
    p.add_argument("--work", default="demo-build", help="working folder (data, stages, checkpoints); reruns resume")
    p.add_argument("--out", default=None, help="where the finished model goes (default: mmstack/assets/demo-model)")


def main(args) -> int:
    from mmstack.assets import ROOT

    recipe = Path(args.recipe) if args.recipe else ROOT / "demo-recipe.json"
    out = Path(args.out) if args.out else ROOT / "demo-model"
    print(build(recipe, Path(args.work), out))
    return 0

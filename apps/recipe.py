"""`mmstack build-demo --recipe assets/demo-recipe.json --profile cpu|gpu --out DIR`: re-create the embedded model.

Stages (each resumable; a finished stage is skipped):
  1. `synth` the training set (sized by the profile) and a held-out set with another seed;
  2. train a byte-level BPE tokenizer on the corpus text (`tokenizers`), with the chat/grounding/image tokens and
     single-character tokens for A-Z0-9 (`tokenizer.single_characters`);
  3. build the native model (MLA + MoE backbone, tiled SigLIP-style encoder, VQ generation head) randomly;
  4. `finetune` stages from the recipe, counted in samples and sized by the profile (`recipe_profiles`): the VQ
     tokenizer first (with dead-code restarts), then understanding + image-token generation (with the CTC head);
  5. store the weights in half precision as a native model folder, score it on the held-out set (scores.json), and
     record profile, device, seconds and scores in build.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from mmstack.io.atomic import atomic_write_json

log = logging.getLogger(__name__)

SPECIAL = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<image>", "<|ref|>", "<|/ref|>", "<|det|>",
           "<|/det|>", "<|grounding|>", "<|User|>", "<|Assistant|>", "<begin_of_image>", "<end_of_image>"]


def train_tokenizer(texts, vocab_size: int, out_dir: Path, single_characters: Optional[str] = None) -> Path:
    """Byte-level BPE over `texts`; special tokens first (ids 0.. in SPECIAL order).

    single_characters: a regex character class (e.g. "A-Z0-9") whose characters are always tokens of their own
        (with the space before them, if any): BPE trained on random strings otherwise learns pairs ("ABCD1234" ->
        AB/CD/12/34, "HELLO" -> HE/L/LO), so the same letter is a different token by neighbour and a small model
        cannot learn to read it."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if single_characters:
        isolate = pre_tokenizers.Split(Regex(f" ?[{single_characters}]"), behavior="isolated")
        tk.pre_tokenizer = pre_tokenizers.Sequence([isolate, byte_level])
    else:
        tk.pre_tokenizer = byte_level
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


def write_demo_settings(model_dir: Path, t2i_prompts, n: int = 6, about: Optional[dict] = None) -> None:
    """`demo.json` for the web demo: the first distinct held-out text-to-image prompts as examples, the
    greedy decoding the held-out scores were measured with (a tiny model copies prompt words into its answers,
    so a repetition penalty or sampling hurts it), and the recipe's `about` (what the banner says it was trained
    on, and which real model to load instead). The clickable image examples are drawn and picked after the build
    (`docs/demo_examples.py`)."""
    from .synth import CHART_QUESTION, OCR_QUESTION

    picked = list(dict.fromkeys(t2i_prompts))[:n]
    settings = {"generate_examples": picked,
                "chat_sampling": {"temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.0, "max_new_tokens": 128},
                # the batch jobs ask what the model was trained to answer (`mmstack ocr` / `mmstack chart`)
                "tasks": {"ocr": {"prompt": OCR_QUESTION, "max_new_tokens": 64},
                          "chart": {"prompt": CHART_QUESTION, "max_new_tokens": 192}}}
    if about:
        settings["about"] = dict(about)
    atomic_write_json(model_dir / "demo.json", settings)


def build(recipe_path: Path, work: Path, out: Path, profile_name: str = "cpu", device: Optional[str] = None,
          score: bool = True) -> Path:
    """Run every stage of the recipe under a profile (`recipe_profiles`; resuming finished stages) and write the
    half-precision model to `out`, with `build.json` (profile, device, seconds, scores) and `scores.json`."""
    from mmstack.loading import build_model, load_model, save_pretrained

    from . import synth
    from .recipe_profiles import profile, stage_args, synth_args
    from .train import TrainArgs, run

    recipe = json.loads(Path(recipe_path).read_text())
    prof = profile(recipe, profile_name)
    if device:
        prof["device"] = device
    threads = prof.get("threads") or recipe.get("threads")
    if threads:  # 1 thread is slower on an idle machine but never thrashes beside other work
        torch.set_num_threads(int(threads))
    work.mkdir(parents=True, exist_ok=True)
    marker = work / "profile.json"
    if marker.exists() and json.loads(marker.read_text()).get("profile") != profile_name:
        raise ValueError(f"{work} holds a build of profile {json.loads(marker.read_text()).get('profile')!r}; "
                         f"use another --work folder for profile {profile_name!r}")
    atomic_write_json(marker, {"profile": profile_name, **prof})
    t0 = time.time()
    data = work / "data"
    if not (data / "data.jsonl").exists():
        synth.generate(data, **synth_args(recipe["synth"]["train"], prof), overwrite=True)
    heldout = work / "heldout"
    if not (heldout / "data.jsonl").exists():
        synth.generate(heldout, **recipe["synth"]["heldout"], overwrite=True)
    init = work / "init"
    if not (init / "config.json").exists():
        tok = train_tokenizer(_corpus(data), recipe["tokenizer"]["vocab_size"], work / "tokenizer",
                              recipe["tokenizer"].get("single_characters"))
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
            args = stage_args(stage, prof)
            head = current.parent / "ctc_head.safetensors"  # the previous stage's CTC head, carried on
            if args.get("ctc_weight") and head.exists() and "ctc_init" not in args:
                args["ctc_init"] = str(head)
            log.info("stage %d: %s", i, args)
            run(TrainArgs(model=str(current), data=files, out=str(sdir), resume=True, **args))
        current = sdir / "model"
        stage_seconds[sdir.name] = _train_seconds(sdir)
    model = load_model(current, device="cpu", dtype=torch.float16)
    if out.exists():
        shutil.rmtree(out)
    save_pretrained(model, out, tokenizer_dir=current)
    prompts = [json.loads(x)["prompt"] for x in (heldout / "t2i.jsonl").read_text(encoding="utf-8").splitlines()]
    write_demo_settings(out, prompts, about=recipe.get("about"))
    meta = {"recipe": str(recipe_path), "profile": profile_name, "device": _device_name(prof["device"]),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "stage_train_seconds": stage_seconds,
            "train_seconds": round(sum(stage_seconds.values()), 1), "seconds": round(time.time() - t0, 1),
            "note": "seconds: this invocation's wall time (finished stages are skipped on a rerun); "
                    "stage_train_seconds: the sum of each stage's logged step times, whichever run did them"}
    if score:
        meta["scores"] = _score(out, heldout, recipe.get("eval_per_task", 40))
    atomic_write_json(out / "build.json", meta)
    return out


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def _score(model_dir: Path, heldout: Path, per_task: int) -> dict:
    """Held-out scores of the finished model (`mmstack eval-demo`), stored in its scores.json: the full set and
    the quick slice its regression guard compares with."""
    import mmstack

    from .eval_demo import QUICK_PER_TASK, evaluate

    pipe = mmstack.load(model_dir, device="cpu")
    result = {"full": evaluate(pipe, heldout, per_task), "quick": evaluate(pipe, heldout, QUICK_PER_TASK)}
    atomic_write_json(model_dir / "scores.json", result)
    return result["full"]["scores"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default=None, help="recipe JSON (default: the one shipped in mmstack.assets)")
    p.add_argument("--work", default="demo-build", help="working folder (data, stages, checkpoints); reruns resume")
    p.add_argument("--out", default=None, help="where the finished model goes (default: mmstack/assets/demo-model)")
    p.add_argument("--profile", default="cpu", help="the recipe's profile: cpu (2 cores, about 2 hours) or gpu (one "
                   "H100/H200, about 10 minutes: larger batches, 10x the samples)")
    p.add_argument("--device", default=None, help="run the stages here instead of the profile's device")
    p.add_argument("--no-score", action="store_true", help="skip the held-out scores at the end")


def main(args) -> int:
    from mmstack.assets import ROOT

    recipe = Path(args.recipe) if args.recipe else ROOT / "demo-recipe.json"
    out = Path(args.out) if args.out else ROOT / "demo-model"
    print(build(recipe, Path(args.work), out, args.profile, args.device, not args.no_score))
    return 0

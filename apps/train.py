"""The fine-tuning loop: choose what trains (parts, LoRA), gradient accumulation and checkpointing,
warmup + cosine LR, held-out eval loss, metrics JSONL, atomic resumable checkpoints (DCP shards, resumable on any
number of processes), DDP or FSDP2 (LoRA included) under torchrun (see `parallel`).

Tasks: "understanding" (assistant-token CE), "vq" (image-code CE with prompt dropout), "flow" (velocity
MSE with condition dropout), "vq_tokenizer" (VQ reconstruction), "mixed" (understanding + vq each step).
Resuming restores model, optimizer, scheduler, RNG and data position, so the loss curve after a kill
matches an uninterrupted run step for step (CPU, fixed seed).

Around it: the options (`train_args.TrainArgs`), the batches (`train_batches`), what a checkpoint holds
besides weights (`checkpointing`), the sharded checkpoints (`sharded_checkpoint`), the process group and wrapping
(`parallel`) and the final outputs (`train_output`).
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from mmstack import training
from mmstack.io.atomic import atomic_torch_save

from . import parallel, sharded_checkpoint
from .checkpointing import rng_state, set_rng_state, truncate_metrics
from .parallel import all_sum, dist_info, init_distributed
from .train_args import SAVE, TrainArgs
from .train_batches import Batcher, ImageCodes, make_batch
from .train_loss import LossModule, OCRAuxiliary, parse_task_weights
from .train_output import write_outputs

log = logging.getLogger(__name__)

__all__ = ["TrainArgs", "run", "evaluate", "LossModule", "autocast_bf16", "lr_lambda", "select_trainable",
           # moved in the architecture split, importable from here for one release
           "Batcher", "ImageCodes", "all_sum", "atomic_torch_save", "dist_info", "init_distributed", "rng_state",
           "set_rng_state"]


def autocast_bf16(device: torch.device, dtype: Optional[str]) -> bool:
    """Whether the forward runs under bf16 autocast (weights and optimizer state stay fp32): by default on
    CUDA; on CPU when asked ("bf16"), where matmuls with AVX512-BF16/AMX run ~1.8x faster than fp32."""
    if dtype not in (None, "bf16", "bfloat16", "fp32", "float32"):
        raise ValueError(f"--dtype must be bf16 or fp32, got {dtype!r}")
    if dtype in ("fp32", "float32"):
        return False
    return device.type == "cuda" or dtype in ("bf16", "bfloat16")


# ------------------------------------------------------------------------------------------ schedule


def lr_lambda(args: TrainArgs):
    def f(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / max(1, args.warmup)
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def select_trainable(model, parts: str) -> list:
    """Freeze everything but the named top-level parts (language, vision, projector, ...)."""
    names = None if parts == "all" else {p.strip() for p in parts.split(",") if p.strip()}
    if names is not None:
        have = {n for n, _ in model.named_children()}
        unknown = names - have
        if unknown:
            raise ValueError(f"--train names unknown parts {sorted(unknown)} (the model has {sorted(have)})")
    trainable = []
    for name, p in model.named_parameters():
        on = names is None or name.split(".")[0] in names
        p.requires_grad_(on)
        if on:
            trainable.append(p)
    if not trainable:
        raise ValueError("nothing to train: --train selected no parameters")
    return trainable


# ------------------------------------------------------------------------------------------ the loop


def _stream_indices(n: int, seed: int, pos: int, count: int) -> list[int]:
    """Items pos..pos+count of the endless stream of per-epoch permutations of range(n)."""
    out = []
    while len(out) < count:
        epoch, off = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + epoch)).tolist()
        take = min(count - len(out), n - off)
        out += perm[off : off + take]
        pos += take
    return out


def _split(examples, fraction: float, seed: int):
    if fraction <= 0 or len(examples) < 20:
        return examples, []
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    k = max(1, int(len(examples) * fraction))
    held = set(order[:k])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def run(args: TrainArgs) -> Path:
    """Train; returns the output folder, whose `model/` is a native mmstack model `mmstack.load` reads (with LoRA and
    `--save adapter|both`, `adapter/` is a peft adapter folder, `mmstack.load(base, adapter=...)`).

    Rank 0 holds the run folder's lock for the whole run: a second run on the same `--out` is refused, naming the
    holder's PID (`mmstack.io.lock`)."""
    ok = False
    try:
        out = _locked_run(args)
        ok = True
        return out
    finally:
        parallel.close_distributed(ok)


def _locked_run(args: TrainArgs) -> Path:
    rank, _ = dist_info()
    if rank != 0:
        return _run(args)
    from mmstack.io.atomic import clean_stale_temps
    from mmstack.io.lock import exclusive_lock

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out / ".lock", what=f"the run folder {out}"):
        for folder in (out, out / "checkpoint", out / "adapter"):  # temporary files of saves a kill interrupted
            clean_stale_temps(folder)
        sharded_checkpoint.clean_stale_folders(out / "checkpoint")
        return _run(args)


def _fits(pipe):
    """A check of one example's prompt against the model: its length (text and image tokens, from the image
    headers, without decoding) within the context, and its images within the per-request limit."""
    u = pipe.understanding

    def check(ex) -> Optional[str]:
        if ex.is_t2i or u is None:
            return None
        if len(ex.images) > pipe.max_images:
            return f"{len(ex.images)} images; the limit is {pipe.max_images} per example"
        n = u.count_tokens(ex.messages, ex.images)
        if n > pipe.context:
            return f"{n} tokens with its images; the model context is {pipe.context}"
        return None

    return check


def _run(args: TrainArgs) -> Path:
    import mmstack

    from .data import load_examples

    out = Path(args.out)
    if args.parallel not in parallel.MODES:
        raise ValueError(f"--parallel must be one of {parallel.MODES}, got {args.parallel!r}")
    rank, world = dist_info()
    mode = args.parallel if world > 1 else None
    if args.save not in SAVE or (args.save != "merged" and not args.lora_r):
        raise ValueError(f"--save {args.save} needs LoRA (--lora-r): without it the run saves the whole model"
                         if args.save in SAVE else f"--save must be one of {SAVE}, got {args.save!r}")
    if args.batch_size < world:
        raise ValueError(f"--batch-size {args.batch_size} is the global batch: it needs one example per process "
                         f"at least ({world} processes)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.qlora:
        from .lora import check_qlora

        check_qlora(device, args.lora_r, world)
    device = init_distributed(device)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    dtype = torch.bfloat16 if args.qlora else torch.float32  # QLoRA: what is not 4-bit stays bf16
    pipe = mmstack.load(args.model, device=device, dtype=dtype, tokenizer=args.tokenizer)
    model = pipe.model.train()
    if args.qlora:
        from .qlora import quantize_base_nf4

        quantize_base_nf4(model)  # before add_lora: LoRA wraps the 4-bit layers
    model.language.gradient_checkpointing = args.gradient_checkpointing
    examples, skipped = load_examples(args.data, skip_bad=args.skip_bad, fits=_fits(pipe))
    if skipped and rank == 0:
        log.warning("skipped %d bad example(s)", len(skipped))
    und = [e for e in examples if not e.is_t2i]
    t2i = [e for e in examples if e.is_t2i]
    needs = {"understanding": [und], "vq": [t2i], "flow": [t2i], "vq_tokenizer": [t2i], "mixed": [und, t2i]}
    if args.task not in needs:
        raise ValueError(f"unknown task {args.task!r} (choose from {sorted(needs)})")
    if any(not pool for pool in needs[args.task]):
        raise ValueError(f"task {args.task!r} found no suitable examples in {args.data}")
    und, und_eval = _split(und, args.eval_fraction, args.seed)
    t2i, t2i_eval = _split(t2i, args.eval_fraction, args.seed + 1)
    lora = None
    if args.lora_r:
        from .lora import add_lora

        lora = add_lora(model, args.lora_r, args.lora_alpha, args.lora_targets.split(","))
        if rank == 0:
            print(lora.summary(), flush=True)
    else:
        select_trainable(model, args.train)
    ties = parallel.tied_names(model)
    weights = parse_task_weights(args.task_weights)
    ocr = OCRAuxiliary(model, args.ctc_charset, args.ctc_frames, args.ctc_weight, args.lr, device, args.ctc_init) \
        if args.ctc_weight > 0 else None
    usage = None
    if args.vq_restart_every and args.task == "vq_tokenizer":
        if world > 1:
            raise ValueError("--vq-restart-every runs in one process only (the restarts are not synchronised)")
        usage = torch.zeros(model.vq.quantize.embedding.num_embeddings, dtype=torch.long)
    loss_mod = LossModule(model, args.loss_average, ocr=ocr, code_usage=usage)
    if mode is not None:
        # FSDP: a vision block is its own group only if no rank can get a share of a batch without images
        shard_vision = all(ex.images for ex in und)
        if mode == "fsdp" and not shard_vision and rank == 0:
            log.info("some examples have no image: the vision tower stays in the root FSDP group")
        loss_mod = parallel.wrap(loss_mod, mode, device, shard_vision=shard_vision)
    trainable = [p for p in loss_mod.parameters() if p.requires_grad]  # after wrap: FSDP replaces them
    used: set = set()  # under FSDP, names of adapter weights in this step's graph (see drop_unreached_grads)
    if mode == "fsdp" and lora is not None:
        from .lora import track_adapter_use

        used = track_adapter_use(model)
    by_name = dict(model.named_parameters())
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args))
    state = {"step": 0, "pos": {"und": 0, "t2i": 0}}
    gen = torch.Generator().manual_seed(args.seed + 17)  # condition dropout, flow noise and times
    ckpt = out / "checkpoint"  # state.pt + DCP shards (`sharded_checkpoint`): resumes on any number of processes
    if args.resume and (ckpt / "state.pt").exists():
        saved = sharded_checkpoint.load(ckpt, loss_mod, model, opt)
        sched.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"])
        if "task_rng" in saved:  # older checkpoints lack it: their vq/flow curves diverge after a resume
            gen.set_state(saved["task_rng"])
        state = saved["state"]
        if ocr is not None and "ctc" in saved:
            ocr.load_state_dict(saved["ctc"])
        if usage is not None and "code_usage" in saved:
            usage.copy_(saved["code_usage"])
    metrics = out / "metrics.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        truncate_metrics(metrics, state["step"])
        (out / "args.json").write_text(json.dumps(asdict(args), indent=2))
    batcher = Batcher(pipe, args)
    use_bf16 = autocast_bf16(device, args.dtype)
    tasks = ["understanding", "vq"] if args.task == "mixed" else [args.task]
    pools = {"understanding": ("und", und), "vq": ("t2i", t2i), "flow": ("t2i", t2i), "vq_tokenizer": ("t2i", t2i)}
    from tqdm import tqdm

    bar = tqdm(total=args.steps, initial=state["step"], disable=rank != 0, desc="finetune")
    while state["step"] < args.steps:
        t0 = time.time()
        opt.zero_grad(set_to_none=True)
        logged = {}
        for task in tasks:
            key, pool = pools[task]
            total = 0.0
            for _ in range(args.grad_accum):
                idx = _stream_indices(len(pool), args.seed + len(key), state["pos"][key], args.batch_size)
                state["pos"][key] += args.batch_size
                mine = [pool[i] for i in idx[rank::world]]
                batch = make_batch(batcher, task, mine, gen)
                if ocr is not None and task == "understanding":
                    batch = (batch, ocr.texts(mine))
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    loss, n = loss_mod(task, batch)
                n_all = all_sum(n)
                # sum over this rank's items / items over all ranks, times world (DDP and FSDP average gradients)
                (loss * n / max(n_all, 1) * world / args.grad_accum * weights.get(task, 1.0)).backward()
                total += all_sum(float(loss.detach()) * n) / max(n_all, 1) / args.grad_accum
            logged[f"loss_{task}"] = total
        if mode == "fsdp":
            parallel.drop_unreached_grads(trainable, {by_name[n] for n in used})
            used.clear()
        norm = torch.nn.utils.clip_grad_norm_(trainable, 1.0)  # a DTensor under FSDP (same value on each rank)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        opt.step()
        extra = {}
        if ocr is not None:
            ocr.step(opt.param_groups[0]["lr"] / args.lr)  # the main schedule's factor at this step
            if ocr.last is not None:
                extra["ctc"] = ocr.last
        sched.step()
        state["step"] += 1
        step = state["step"]
        if usage is not None and step % args.vq_restart_every == 0:
            extra["codes_used"] = int((usage > 0).sum())
            extra["codes_restarted"] = training.restart_dead_codes(
                model.vq.quantize, usage, loss_mod.latest_latents, torch.Generator().manual_seed(args.seed + step))
            usage.zero_()
        rec = {"step": step, "loss": sum(logged.values()), **logged, "grad_norm": float(norm),
               "lr": sched.get_last_lr()[0], **extra, "seconds": round(time.time() - t0, 4)}
        if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            rec["eval_loss"] = evaluate(loss_mod, batcher, tasks, {"understanding": und_eval, "vq": t2i_eval,
                                                                   "flow": t2i_eval, "vq_tokenizer": t2i_eval}, args)
        if rank == 0:
            with open(metrics, "a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
        if step % args.save_every == 0 or step == args.steps:
            trainer = {"scheduler": sched.state_dict(), "rng": rng_state(), "task_rng": gen.get_state(), "state": state,
                       **({"ctc": ocr.state_dict()} if ocr is not None else {}),
                       **({"code_usage": usage.clone()} if usage is not None else {})}
            sharded_checkpoint.save(ckpt, model, opt, trainer, step)  # every rank writes its own shards
        if args.stop_after is not None and step >= args.stop_after:
            bar.close()
            return out
    bar.close()
    tok_dir = Path(pipe.tokenizer.source).parent if pipe.tokenizer is not None else None
    write_outputs(args, out, loss_mod, model, lora, ties, tok_dir, rank)  # under FSDP: every rank gathers
    if ocr is not None and rank == 0:
        ocr.save_head(out)
    return out


@torch.no_grad()
def evaluate(loss_mod, batcher, tasks, pools, args) -> Optional[float]:
    losses = []
    for task in tasks:
        pool = pools[task]
        if not pool:
            continue
        for i in range(0, len(pool), args.batch_size):
            batch = make_batch(batcher, task, pool[i : i + args.batch_size], torch.Generator().manual_seed(0))
            loss, _ = loss_mod(task, batch)
            losses.append(float(loss))
    return sum(losses) / len(losses) if losses else None

"""The fine-tuning loop: choose what trains (parts, LoRA), gradient accumulation and checkpointing,
warmup + cosine LR, held-out eval loss, metrics JSONL, atomic resumable checkpoints, DDP or FSDP2 under
torchrun (see `parallel`).

Tasks: "understanding" (assistant-token CE), "vq" (image-code CE with prompt dropout), "flow" (velocity
MSE with condition dropout), "vq_tokenizer" (VQ reconstruction), "mixed" (understanding + vq each step).
Resuming restores model, optimizer, scheduler, RNG and data position, so the loss curve after a kill
matches an uninterrupted run step for step (CPU, fixed seed).
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from . import parallel

log = logging.getLogger(__name__)


@dataclass
class TrainArgs:
    model: str
    data: list
    out: str
    task: str = "understanding"
    tokenizer: Optional[str] = None
    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    warmup: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    train: str = "all"  # comma-separated parts (language, vision, projector, layout, vq, vq_head, ...) or "all"
    lora_r: int = 0
    lora_alpha: int = 16
    lora_targets: str = "q_proj,kv_a_proj_with_mqa,kv_b_proj,o_proj,k_proj,v_proj,gate_proj,up_proj,down_proj"
    gradient_checkpointing: bool = False
    dtype: Optional[str] = None  # autocast: default bf16 on CUDA, fp32 on CPU; "bf16" also on CPU, "fp32" off
    device: Optional[str] = None
    eval_fraction: float = 0.05
    eval_every: int = 0
    save_every: int = 50
    seed: int = 0
    resume: bool = False
    skip_bad: bool = False
    prompt_dropout: float = 0.1
    log_every: int = 1
    stop_after: Optional[int] = None  # stop (as if killed) after this step: for resume tests
    parallel: str = "ddp"  # with several processes: "ddp", or "fsdp" (sharded, for models larger than a device)
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ distributed


def dist_info() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_distributed(device: torch.device) -> torch.device:
    """Join the torchrun process group (if any); returns the device, made this process's own GPU."""
    rank, world = dist_info()
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def all_sum(x: float) -> float:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([float(x)], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item())
    return float(x)


def autocast_bf16(device: torch.device, dtype: Optional[str]) -> bool:
    """Whether the forward runs under bf16 autocast (weights and optimizer state stay fp32): by default on
    CUDA; on CPU when asked ("bf16"), where matmuls with AVX512-BF16/AMX run ~1.8x faster than fp32."""
    if dtype not in (None, "bf16", "bfloat16", "fp32", "float32"):
        raise ValueError(f"--dtype must be bf16 or fp32, got {dtype!r}")
    if dtype in ("fp32", "float32"):
        return False
    return device.type == "cuda" or dtype in ("bf16", "bfloat16")


# ------------------------------------------------------------------------------------------ checkpoints


def atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def rng_state() -> dict:
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_version": random.getstate()[0],
            "python_gauss": random.getstate()[2], "numpy": [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached]}


def set_rng_state(s: dict) -> None:
    import numpy as np

    torch.set_rng_state(s["torch"])
    random.setstate((s["python_version"], tuple(s["python"]), s["python_gauss"]))
    kind, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


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


# ------------------------------------------------------------------------------------------ batches


class Batcher:
    """Turns examples into model batches for each task, through the pipeline's own processors."""

    def __init__(self, pipe, args: TrainArgs):
        self.pipe, self.args = pipe, args
        self.model = pipe.model
        self._codes: dict = {}

    # understanding ---------------------------------------------------------------------------
    def understanding(self, examples):
        batch, _ = self.pipe.understanding.prepare_tagged([ex.messages for ex in examples], [ex.images for ex in examples])
        return batch.to(self.pipe.device)

    # generation ------------------------------------------------------------------------------
    def flow(self, examples, gen: torch.Generator):
        drop = torch.rand(len(examples), generator=gen) < self.args.prompt_dropout
        ids, mask = self._prompts([ex.prompt for ex in examples], "flow", drop)
        return ids, mask, self.latents(examples), gen

    @torch.no_grad()
    def latents(self, examples) -> torch.Tensor:
        vae = self.pipe.generation.vae()
        size = self.model.cfg.parts["flow_head"].image_size
        x = torch.stack([self._pixels(ex.images[0], size) for ex in examples]).to(self.pipe.device)
        p = next(vae.parameters())
        return vae.encode(x.to(p.dtype)).latent_dist.mean.float() * vae.config.scaling_factor

    def _prompts(self, prompts: list[str], mode: str, drop: torch.Tensor):
        from mmstack.generation.generator import generation_prompt_ids

        pipe = self.pipe
        chat = pipe.generation.chat
        pad = pipe.tokenizer.token_id(chat.pad_tag)
        seqs = []
        masks = []
        for p, d in zip(prompts, drop.tolist()):
            ids = generation_prompt_ids(pipe.tokenizer, chat, p, mode)
            m = [1] * len(ids)
            if d and mode == "vq":  # condition dropout = the unconditional rows of sampling (pads attended)
                ids = [ids[0]] + [pad] * (len(ids) - 2) + [ids[-1]]
            elif d:  # JanusFlow: everything after BOS is pad and masked out
                ids = [ids[0]] + [pad] * (len(ids) - 1)
                m = [1] + [0] * (len(ids) - 1)
            seqs.append(ids)
            masks.append(m)
        t = max(map(len, seqs))
        ids = torch.full((len(seqs), t), pad, dtype=torch.long)
        mask = torch.zeros(len(seqs), t, dtype=torch.long)
        for i, (s, m) in enumerate(zip(seqs, masks)):
            ids[i, t - len(s):] = torch.tensor(s)
            mask[i, t - len(s):] = torch.tensor(m)
        return ids.to(pipe.device), mask.to(pipe.device)

    def _pixels(self, path: str, size: int) -> torch.Tensor:
        from PIL import Image

        from mmstack.vision import image_io

        img = image_io.load_image(path, image_io.NATIVE if self.pipe.understanding is None else self.pipe.policy).resize((size, size), Image.BICUBIC)
        x = torch.from_numpy(__import__("numpy").asarray(img, dtype="float32")).permute(2, 0, 1) / 127.5 - 1
        return x

    def codes(self, examples) -> "ImageCodes":
        size = self.model.cfg.parts["vq_head"].image_size
        missing = [ex for ex in examples if ex.id not in self._codes]
        pixels = torch.stack([self._pixels(ex.images[0], size) for ex in missing]) if missing else None
        return ImageCodes([ex.id for ex in examples], pixels, self._codes, self.pipe.device)

    def vq(self, examples, gen: torch.Generator):
        drop = torch.rand(len(examples), generator=gen) < self.args.prompt_dropout
        ids, mask = self._prompts([ex.prompt for ex in examples], "vq", drop)
        return ids, mask, self.codes(examples)


@dataclass
class ImageCodes:
    """The VQ codes of a batch's images: those encoded before (`cache`, by example id) and the pixels of
    the rest [M,3,S,S], which `LossModule.forward` encodes: only there does FSDP hold the VQ weights whole."""

    keys: list
    pixels: Optional[torch.Tensor]
    cache: dict
    device: torch.device

    @torch.no_grad()
    def resolve(self, model) -> torch.Tensor:
        """Encode what is missing (adding it to the cache); returns codes [B, N]."""
        missing = [k for k in self.keys if k not in self.cache]
        if missing:
            with torch.autocast(self.device.type, enabled=False):  # the codes do not depend on --dtype
                _, idx = model.vq.encode(self.pixels.to(self.device, model.dtype))
            for k, c in zip(missing, idx.view(len(missing), -1).cpu()):
                self.cache[k] = c
        return torch.stack([self.cache[k] for k in self.keys]).to(self.device)


# ------------------------------------------------------------------------------------------ the loop


class LossModule(torch.nn.Module):
    """Wraps the model so that DDP / FSDP see every loss computation as its forward: every use of a weight
    happens inside `forward` (FSDP gathers the root group's weights only there)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, task: str, batch):
        from mmstack import training

        m = self.model
        if task == "understanding":
            return training.understanding_loss(m, batch)
        if task == "vq":
            ids, mask, codes = batch
            codes = codes.resolve(m)
            return training.vq_generation_loss(m, ids, mask, codes), codes.numel()
        if task == "flow":
            ids, mask, latents, gen = batch
            return training.flow_generation_loss(m, ids, mask, latents, gen), latents.shape[0]
        if task == "vq_tokenizer":
            loss, parts = training.vq_tokenizer_loss(m.vq, batch)
            return loss, batch.shape[0]
        raise ValueError(f"unknown task {task!r}")


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
    """Train; returns the output folder, whose `model/` is a native mmstack model `mmstack.load` reads."""
    import mmstack
    from mmstack.io.checkpoint import CheckpointError
    from mmstack.loading import resolve_dtype, save_pretrained

    from .data import load_examples

    out = Path(args.out)
    if args.parallel not in parallel.MODES:
        raise ValueError(f"--parallel must be one of {parallel.MODES}, got {args.parallel!r}")
    rank, world = dist_info()
    mode = args.parallel if world > 1 else None
    if mode == "fsdp" and args.lora_r:
        raise ValueError("--lora-r with --parallel fsdp is not supported yet (use --parallel ddp)")
    if args.batch_size < world:
        raise ValueError(f"--batch-size {args.batch_size} is the global batch: it needs one example per process "
                         f"at least ({world} processes)")
    device = init_distributed(torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    pipe = mmstack.load(args.model, device=device, dtype=torch.float32, tokenizer=args.tokenizer)
    model = pipe.model.train()
    model.language.gradient_checkpointing = args.gradient_checkpointing
    examples, skipped = load_examples(args.data, skip_bad=args.skip_bad)
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
    if args.lora_r:
        from .lora import add_lora

        add_lora(model, args.lora_r, args.lora_alpha, args.lora_targets.split(","))
    else:
        select_trainable(model, args.train)
    ties = parallel.tied_names(model)
    loss_mod = LossModule(model)
    if mode is not None:
        # FSDP: a vision block is its own group only if no rank can get a share of a batch without images
        shard_vision = all(ex.images for ex in und)
        if mode == "fsdp" and not shard_vision and rank == 0:
            log.info("some examples have no image: the vision tower stays in the root FSDP group")
        loss_mod = parallel.wrap(loss_mod, mode, device, shard_vision=shard_vision)
    trainable = [p for p in loss_mod.parameters() if p.requires_grad]  # after wrap: FSDP replaces them
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args))
    state = {"step": 0, "pos": {"und": 0, "t2i": 0}}
    gen = torch.Generator().manual_seed(args.seed + 17)  # condition dropout, flow noise and times
    ckpt = out / "checkpoint" / "state.pt"
    if args.resume and ckpt.exists():
        try:  # weights_only: a tampered state.pt cannot run code, it is refused. mmap: under FSDP every
            # rank reads the whole file, and the ranks then share one copy of its pages
            saved = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=mode == "fsdp")
        except Exception as e:
            raise CheckpointError(f"{ckpt}: cannot resume from it: not a checkpoint torch.load(weights_only=True) "
                                  f"accepts ({type(e).__name__}: {str(e)[:300]})") from None
        parallel.load_state(loss_mod, model, opt, saved["model"], saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"])
        if "task_rng" in saved:  # older checkpoints lack it: their vq/flow curves diverge after a resume
            gen.set_state(saved["task_rng"])
        state = saved["state"]
    metrics = out / "metrics.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(metrics, state["step"])
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
                batch = _make(batcher, task, mine, gen)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    loss, n = loss_mod(task, batch)
                n_all = all_sum(n)
                # sum over this rank's items / items over all ranks, times world (DDP and FSDP average gradients)
                (loss * n / max(n_all, 1) * world / args.grad_accum).backward()
                total += all_sum(float(loss.detach()) * n) / max(n_all, 1) / args.grad_accum
            logged[f"loss_{task}"] = total
        if mode == "fsdp":
            parallel.drop_unreached_grads(trainable)
        norm = torch.nn.utils.clip_grad_norm_(trainable, 1.0)  # a DTensor under FSDP (same value on each rank)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        opt.step()
        sched.step()
        state["step"] += 1
        step = state["step"]
        rec = {"step": step, "loss": sum(logged.values()), **logged, "grad_norm": float(norm),
               "lr": sched.get_last_lr()[0], "seconds": round(time.time() - t0, 4)}
        if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            rec["eval_loss"] = evaluate(loss_mod, batcher, tasks, {"understanding": und_eval, "vq": t2i_eval,
                                                                   "flow": t2i_eval, "vq_tokenizer": t2i_eval}, args)
        if rank == 0:
            with open(metrics, "a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
        if step % args.save_every == 0 or step == args.steps:
            full = {"model": parallel.model_state(loss_mod, model, ties),  # under FSDP: all ranks gather
                    "optimizer": parallel.optimizer_state(loss_mod, model, opt)}
            if rank == 0:
                atomic_torch_save({**full, "scheduler": sched.state_dict(), "rng": rng_state(),
                                   "task_rng": gen.get_state(), "state": state}, ckpt)
            del full
        if args.stop_after is not None and step >= args.stop_after:
            bar.close()
            return out
    bar.close()
    if mode == "fsdp":  # every rank gathers; rank 0 writes a plain model holding the full weights
        sd = parallel.model_state(loss_mod, model, ties)
        model = parallel.full_model(model, sd, ties) if rank == 0 else None
    if rank == 0:
        if args.lora_r:
            from .lora import merge_lora

            merge_lora(model)
        tok_dir = Path(pipe.tokenizer.source).parent if pipe.tokenizer is not None else None
        save_pretrained(model.eval(), out / "model", tokenizer_dir=tok_dir)
    return out


def _make(batcher: Batcher, task: str, examples, gen):
    if task == "understanding":
        return batcher.understanding(examples)
    if task == "vq":
        return batcher.vq(examples, gen)
    if task == "vq_tokenizer":
        size = batcher.model.cfg.parts["vq_head"].image_size
        return torch.stack([batcher._pixels(ex.images[0], size) for ex in examples]).to(batcher.pipe.device)
    if task == "flow":
        return batcher.flow(examples, gen)
    raise ValueError(task)


@torch.no_grad()
def evaluate(loss_mod, batcher, tasks, pools, args) -> Optional[float]:
    losses = []
    for task in tasks:
        pool = pools[task]
        if not pool:
            continue
        for i in range(0, len(pool), args.batch_size):
            loss, _ = loss_mod(task, _make(batcher, task, pool[i : i + args.batch_size], torch.Generator().manual_seed(0)))
            losses.append(float(loss))
    return sum(losses) / len(losses) if losses else None


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only the metric lines up to `step` (a resumed run rewrites what followed its checkpoint)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError):
            continue  # a line cut by a kill
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # atomic: a kill now must not lose earlier lines
    tmp.write_text("".join(k + "\n" for k in keep))
    os.replace(tmp, path)

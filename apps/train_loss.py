"""The loss of one fine-tuning step, per task, as one module (`LossModule`) so DDP / FSDP see every use of a weight
inside its `forward`; with the training-only extras a recipe can switch on:

- task weights (`--task-weights understanding=1,vq=0.5`): how much each task of a mixed step counts;
- a CTC auxiliary head on the vision columns (`--ctc-weight`, `mmstack.ctc`): examples whose answer is one line of
  `--ctc-charset` characters also train the tower to read it; the head is not part of the model (its own optimizer,
  its state in the run's checkpoint, never in the saved model);
- dead VQ code restarts (`--vq-restart-every`): codebook rows unused for that many steps restart on encoder outputs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from mmstack import training

from .train_args import TASKS


def parse_task_weights(spec: str) -> dict[str, float]:
    """"understanding=1,vq=0.5" -> {"understanding": 1.0, "vq": 0.5}; tasks not named weigh 1."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in TASKS:
            raise ValueError(f"--task-weights: {part!r} is not TASK=WEIGHT with TASK one of {TASKS}")
        try:
            w = float(value)
        except ValueError:
            raise ValueError(f"--task-weights: {value!r} is not a number (in {part!r})") from None
        if not w >= 0 or w == float("inf"):
            raise ValueError(f"--task-weights: the weight of {name.strip()} must be finite and >= 0, got {value}")
        weights[name.strip()] = w
    return weights


class OCRAuxiliary:
    """The CTC head of `--ctc-weight` with its own AdamW: which examples it reads (one image, an answer of charset
    characters only), its loss on their global views, and its state for the run's checkpoint."""

    FILE = "ctc_head.safetensors"  # in the run folder at the end: `--ctc-init` of a later stage starts from it

    def __init__(self, model, charset: str, frames: int, weight: float, lr: float, device: torch.device,
                 init: Optional[str] = None):
        from mmstack.ctc import ColumnCTCHead, grid_rows

        tower = getattr(model, "vision", None)
        if tower is None or not hasattr(tower, "cfg"):
            raise ValueError("--ctc-weight needs a model with a vision tower")
        grid = tower.cfg.image_size // tower.cfg.patch_size
        self.head = ColumnCTCHead(tower.cfg.width, grid_rows(grid * grid), charset, frames).to(device)
        self.weight = weight
        if init:
            self.load_head(init)
        self.opt = torch.optim.AdamW(self.head.parameters(), lr=lr)
        self.last: Optional[float] = None

    def load_head(self, path: str) -> None:
        """Start from the head an earlier run saved (`save_head`); a head of another shape is refused by name."""
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except (OSError, ValueError) as e:
            raise ValueError(f"--ctc-init {path}: not a readable safetensors file ({e})") from None
        want = {k: tuple(v.shape) for k, v in self.head.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in sd.items()}
        if want != got:
            raise ValueError(f"--ctc-init {path}: a CTC head of another shape (charset, frames or tower width): "
                             f"{sorted(set(got.items()) ^ set(want.items()))[:4]}")
        self.head.load_state_dict(sd)

    def save_head(self, folder) -> None:
        """Write the head's weights to `folder`/ctc_head.safetensors (atomically)."""
        from safetensors.torch import save_file

        from mmstack.io.atomic import atomic_path

        with atomic_path(Path(folder) / self.FILE) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}, str(tmp))

    def texts(self, examples) -> list[Optional[str]]:
        """Per example: the answer the head reads, or None (and a new step's batch: nothing read yet)."""
        self.last = None
        out = []
        for ex in examples:
            answer = next((m["content"] for m in reversed(ex.messages) if m["role"] == "assistant"), "")
            out.append(answer if len(ex.images) == 1 and self.head.accepts(answer) else None)
        return out

    def loss(self, features: torch.Tensor, batch, texts: list) -> torch.Tensor:
        """CTC loss of the global views (each sample's first view) of the samples with a text."""
        starts, view = [], 0
        for n_img, tiles in zip(batch.images_per_sample, _views_by_sample(batch)):
            starts.append(view if n_img else None)
            view += tiles
        chosen = [(starts[i], t) for i, t in enumerate(texts) if t is not None and starts[i] is not None]
        loss = self.head.loss(features, [v for v, _ in chosen], [t for _, t in chosen])
        self.last = float(loss.detach()) if chosen else None
        return loss

    def step(self, scale: float) -> None:
        """Average the head's gradients over processes, step it at the run's learning-rate `scale`, zero them."""
        grads = [p.grad for p in self.head.parameters() if p.grad is not None]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            for g in grads:
                torch.distributed.all_reduce(g)
                g.div_(world)
        for group in self.opt.param_groups:
            group["lr"] = group.setdefault("base_lr", group["lr"]) * scale
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"head": self.head.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.head.load_state_dict(sd["head"])
        self.opt.load_state_dict(sd["opt"])


def _views_by_sample(batch) -> list[int]:
    views = batch.views_per_image()
    out, i = [], 0
    for n in batch.images_per_sample:
        out.append(sum(views[i : i + n]))
        i += n
    return out


class LossModule(torch.nn.Module):
    """Wraps the model so that DDP / FSDP see every loss computation as its forward: every use of a weight
    happens inside `forward` (FSDP gathers the root group's weights only there)."""

    def __init__(self, model, loss_average: str = "token", ocr: Optional[OCRAuxiliary] = None,
                 code_usage: Optional[torch.Tensor] = None):
        super().__init__()
        self.model = model
        self.loss_average = loss_average
        self.__dict__["ocr"] = ocr  # not a submodule: never wrapped, sharded or saved with the model
        self.__dict__["code_usage"] = code_usage  # [K] codes chosen since the last restart (--vq-restart-every)
        self.__dict__["latest_latents"] = None

    def forward(self, task: str, batch):
        m = self.model
        if task == "understanding":
            texts = None
            if isinstance(batch, tuple):
                batch, texts = batch
            if self.ocr is None or not texts or not any(t is not None for t in texts):
                return training.understanding_loss(m, batch, self.loss_average)
            seen = []
            hook = m.vision.register_forward_hook(lambda mod, args, out: seen.append(out))
            try:
                loss, n = training.understanding_loss(m, batch, self.loss_average)
            finally:
                hook.remove()
            return loss + self.ocr.weight * self.ocr.loss(seen[0], batch, texts), n
        if task == "vq":
            ids, mask, codes = batch
            codes = codes.resolve(m)
            return training.vq_generation_loss(m, ids, mask, codes), codes.numel()
        if task == "flow":
            ids, mask, latents, gen = batch
            return training.flow_generation_loss(m, ids, mask, latents, gen), latents.shape[0]
        if task == "vq_tokenizer":
            loss, parts = training.vq_tokenizer_loss(m.vq, batch)
            if self.code_usage is not None:
                self.code_usage += torch.bincount(parts["indices"].cpu(), minlength=self.code_usage.numel())
                self.__dict__["latest_latents"] = parts["latents"].cpu()
            return loss, batch.shape[0]
        raise ValueError(f"unknown task {task!r}")

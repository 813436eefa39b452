"""Measured memory of one fine-tuning step on CPU, for checking `mmstack.apps.finetune_plan` against: the
trainer's own pieces (`LossModule`, `select_trainable` / `add_lora`, AdamW) on a synthetic understanding batch.

- parameters, gradients, optimizer state: bytes of the unique storages after one step;
- activations: unique storages saved for backward (`torch.autograd.graph.saved_tensors_hooks`), parameters
  excluded, plus, with gradient checkpointing, the inputs each checkpointed block keeps for its recompute (the
  checkpoint's own hooks hide what runs inside; its inputs stay referenced until backward).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mmstack.batch import MultimodalBatch


@dataclass
class Measured:
    parameters: int
    gradients: int
    optimizer: int
    activations: int
    largest_layer: int = 0  # without checkpointing: the most one decoder layer saves (what a recompute holds)

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def understanding_batch(model, seq_len: int, tiles: tuple[int, int] = (1, 1), images: int = 1) -> MultimodalBatch:
    """One sample of `seq_len` tokens: `images` images (VL2: a global view and tw x th tiles each) spliced after
    a few text tokens; every text token after the images is an assistant target."""
    cfg = model.cfg
    v = (1 + tiles[0] * tiles[1]) if cfg.layout.kind == "vl2_tiles" else 1
    s = cfg.vision.image_size
    with torch.no_grad():
        n_img = model.layout.arrange(model.image_features(torch.zeros(v, 3, s, s)), [tiles if v > 1 else (0, 0)]).shape[0]
    n_img *= images
    ids = torch.randint(3, cfg.language.vocab_size, (1, seq_len))
    seq_mask = torch.zeros(1, seq_len, dtype=torch.bool)
    seq_mask[0, 4 : 4 + n_img] = True
    answer = torch.zeros(1, seq_len, dtype=torch.bool)
    answer[0, 4 + n_img :] = True
    return MultimodalBatch(input_ids=ids, attention_mask=torch.ones(1, seq_len, dtype=torch.long),
                           images_seq_mask=seq_mask, pixel_values=torch.randn(v * images, 3, s, s),
                           image_tiles=[tiles if v > 1 else (0, 0)] * images, images_per_sample=[images],
                           assistant_mask=answer)


def measure_step(model, batch: MultimodalBatch, lora_r: int = 0, checkpointing: bool = False,
                 targets: str | None = None, autocast: bool = False) -> Measured:
    """Train `model` one step on `batch` as `apps.train` does (fp32 weights; `autocast`: the forward under bf16
    autocast, the trainer's default on CUDA and its `--dtype bf16` on CPU) and measure its state."""
    from mmstack.apps.train import LossModule, select_trainable

    model.train()
    model.language.gradient_checkpointing = checkpointing
    if lora_r:
        from mmstack.apps.lora import add_lora
        from mmstack.apps.train_args import TrainArgs

        targets = targets or TrainArgs.__dataclass_fields__["lora_targets"].default
        add_lora(model, lora_r, 2 * lora_r, targets.split(","))
    else:
        select_trainable(model, "all")
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved, kept, per_layer, inputs, current = [], [], {}, set(), [None]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved.append(t)
            if current[0] is not None and ptr not in inputs:
                per_layer.setdefault(current[0], {})[ptr] = t.untyped_storage().nbytes()
        return t

    def enter(i):
        def hook(module, args):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            inputs.update(a.untyped_storage().data_ptr() for a in tensors)
            if checkpointing and torch.is_grad_enabled():  # what a checkpointed block holds until backward
                kept.extend(tensors)
            current[0] = i
        return hook

    hooks = [b.register_forward_pre_hook(enter(i)) for i, b in enumerate(model.language.layers)]
    hooks += [b.register_forward_hook(lambda *_: current.__setitem__(0, None)) for b in model.language.layers]
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    loss_mod = LossModule(model)
    device = next(model.parameters()).device
    batch = batch.to(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(device.type, torch.bfloat16,
                                                                                      enabled=autocast):
        loss, _ = loss_mod("understanding", batch)
    for h in hooks:
        h.remove()
    activations = _storage_bytes(saved + kept)
    saved.clear()
    kept.clear()
    loss.backward()
    opt.step()
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return Measured(parameters=_storage_bytes(model.parameters()), gradients=_storage_bytes(p.grad for p in trainable),
                    optimizer=_storage_bytes(state), activations=activations,
                    largest_layer=max((sum(d.values()) for d in per_layer.values()), default=0))

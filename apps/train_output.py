"""What a finished fine-tuning run writes: `OUT/model/` (a native model; with LoRA, the adapters merged in) and/or,
with LoRA, `OUT/adapter/` (a peft folder), as `--save` asks.

After an FSDP run the weights are shards on every rank: rank 0 gathers what the outputs need onto the CPU (the
trainable weights alone for `--save adapter`, every weight for a merged or full model) into a plain model built on
the meta device, with the same adapters added when the run trained LoRA, and writes from that.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch import nn

from . import parallel

__all__ = ["write_outputs"]


def write_outputs(args, out: Path, wrapped: nn.Module, model: nn.Module, lora, ties: list,
                  tokenizer_dir: Optional[Path], rank: int) -> None:
    """Write the run's outputs into `out` (rank 0 writes; under FSDP every rank must call it, for the gather).

    Args:
        args: the run's `TrainArgs` (`save`, `model`, and the LoRA options).
        wrapped: what the loop called (the FSDP root, DDP, or `model`).
        lora: the `LoraPlan` of `add_lora`, or None for a run without LoRA.
        ties: `parallel.tied_names(model)`, read before sharding.
    """
    merged = lora is None or args.save in ("merged", "both")
    if parallel.is_fsdp(wrapped):  # every rank gathers; rank 0 gets a plain model with the full weights
        sd = parallel.model_state(wrapped, model, ties, trainable_only=not merged)
        model = _plain(model, sd, ties, args, lora, strict=merged) if rank == 0 else None
    if rank != 0:
        return
    if lora is not None and args.save in ("adapter", "both"):
        from .lora import save_adapter

        save_adapter(model, lora, out / "adapter", base=args.model)
    if merged:
        from mmstack.loading import save_pretrained

        if lora is not None:
            from .lora import merge_lora

            merge_lora(model)
        save_pretrained(model.eval(), out / "model", tokenizer_dir=tokenizer_dir)


def _plain(like: nn.Module, sd: dict, ties: list, args, lora, strict: bool) -> nn.Module:
    """A plain (unsharded) model holding `sd`, with the run's LoRA adapters added when it trained some."""
    prepare = None
    if lora is not None:
        from .lora import add_lora

        def prepare(m):
            add_lora(m, args.lora_r, args.lora_alpha, args.lora_targets.split(","))

    model = parallel.full_model(like, sd, ties, prepare=prepare, strict=strict)
    if not strict:  # the adapters only: every LoRA weight must have come from the run
        absent = [n for n, p in model.named_parameters() if p.requires_grad and p.is_meta]
        if absent:
            raise RuntimeError(f"the gathered state lacks {len(absent)} adapter weight(s), e.g. {absent[0]}")
    return model

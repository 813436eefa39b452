"""Recipe profiles: one recipe, sized for the machine that builds it.

A recipe's stages count work in samples seen (`"samples"`), not steps, so one recipe describes both a build on 2 CPU
cores and one on a GPU. A profile (`recipe["profiles"][name]`) scales it:

    "cpu": {"device": "cpu", "threads": 2}
    "gpu": {"device": "cuda", "batch_scale": 8, "lr_scale": 2.83, "sample_scale": 10, "synth_scale": 4, "workers": 16}

- batch_scale: each stage's batch size times this (a GPU wants large batches);
- lr_scale: learning rates times this (the usual square-root rule for a larger batch: sqrt(8) ~ 2.83);
- sample_scale: samples seen per stage times this (the GPU's throughput buys more training in less time);
- synth_scale: the rendered training set times this (more distinct images, so the longer run does not repeat them);
- device, threads: where the stages run (threads: CPU threads for the build process);
- workers: processes rendering the synthetic images (the files are the same for any number).
Step-counted fields of a stage (warmup, save_every, eval_every) scale with its number of steps.
"""
from __future__ import annotations

import math
from typing import Any

PROFILE_KEYS = {"device", "threads", "batch_scale", "lr_scale", "sample_scale", "synth_scale", "workers"}
STEP_FIELDS = ("warmup", "save_every", "eval_every")


def profile(recipe: dict, name: str) -> dict[str, Any]:
    """The named profile of `recipe`, with defaults filled in; a clear error for an unknown name or key."""
    profiles = recipe.get("profiles") or {"cpu": {"device": "cpu"}}
    if name not in profiles:
        raise ValueError(f"the recipe has no profile {name!r} (it has {sorted(profiles)})")
    p = dict(profiles[name])
    unknown = set(p) - PROFILE_KEYS
    if unknown:
        raise ValueError(f"profile {name!r}: unknown keys {sorted(unknown)} (known: {sorted(PROFILE_KEYS)})")
    p.setdefault("device", "cpu")
    for key in ("batch_scale", "lr_scale", "sample_scale", "synth_scale"):
        v = p.setdefault(key, 1)
        if not isinstance(v, (int, float)) or not v > 0 or math.isinf(v):
            raise ValueError(f"profile {name!r}: {key} must be a positive number, got {v!r}")
    if not isinstance(p["batch_scale"], int):
        raise ValueError(f"profile {name!r}: batch_scale must be an integer, got {p['batch_scale']!r}")
    return p


def stage_args(stage: dict, prof: dict) -> dict:
    """A stage's `TrainArgs` keywords under a profile: steps from samples, batch and learning rate scaled, and the
    step-counted fields scaled with the steps (without "samples", a stage's "steps" are taken as they are)."""
    args = {k: v for k, v in stage.items() if k not in ("data", "samples")}
    base_batch = int(stage.get("batch_size", 8))
    batch = base_batch * prof["batch_scale"]
    args["batch_size"] = batch
    args["lr"] = float(stage.get("lr", 1e-4)) * prof["lr_scale"]
    if "samples" in stage:
        base_steps = max(1, math.ceil(stage["samples"] / base_batch))
        steps = max(1, math.ceil(stage["samples"] * prof["sample_scale"] / batch))
        ratio = steps / base_steps
        args["steps"] = steps
        for key in STEP_FIELDS:
            if stage.get(key):
                args[key] = max(1, round(stage[key] * ratio))
    args.setdefault("device", prof["device"])
    return args


def synth_args(synth: dict, prof: dict) -> dict:
    """The training set's `synth.generate` keywords with its size scaled by the profile."""
    return {**synth, "n": max(1, round(synth["n"] * prof["synth_scale"])), "workers": int(prof.get("workers", 1))}

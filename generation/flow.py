"""JanusFlow: rectified flow over VAE latents, the LLM between the ShallowUViT encoder and decoder.

The scheduler is separate from the network (`set_timesteps`, `step`; Euler in fp32). Unlike the official
loop, which recomputes prompt + t_emb + image tokens at every step, the prompt's KV is computed once and
each step feeds only [t_emb, latent tokens]; `reuse_prompt_kv=False` is the official full recomputation.
Notation: n images, R = 2n rows (block layout: cond rows first), L' prompt tokens without the dropped
last token, g latent grid (tokens g^2), C UViT width, D LLM width.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from mmstack.kernels.sampling import cfg_combine


class RectifiedFlowScheduler:
    """Euler steps on dz/dt = v from t = 0 (noise) to t = 1 (data); timesteps on a 0..1000 scale."""

    def __init__(self, num_train_timesteps: int = 1000):
        self.scale = num_train_timesteps
        self.timesteps = torch.empty(0)
        self.dt = 0.0

    def set_timesteps(self, steps: int) -> torch.Tensor:
        if steps <= 0:
            raise ValueError(f"steps must be positive, got {steps}")
        self.timesteps = torch.arange(steps, dtype=torch.float32) / steps * self.scale
        self.dt = 1.0 / steps
        return self.timesteps

    def step(self, velocity: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return (z.float() + self.dt * velocity.float()).to(z.dtype)


def uncond_prompt(prompt: list[int], pad_id: int) -> tuple[list[int], list[int]]:
    """JanusFlow's unconditional prompt (and training-time condition dropout): everything after BOS is pad and
    masked out. Returns (ids, mask) of the full prompt length."""
    return [prompt[0]] + [pad_id] * (len(prompt) - 1), [1] + [0] * (len(prompt) - 1)


def flow_prompt(prompt: list[int], n: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [2n, L] (cond rows first, then `uncond_prompt` rows) and the prompt mask [2n, L-1] for the kept
    tokens (the last token is dropped: t_emb takes its slot); uncond rows see only BOS."""
    un_ids, un_mask = uncond_prompt(prompt, pad_id)
    rows = torch.tensor([prompt] * n + [un_ids] * n, dtype=torch.long)
    mask = torch.tensor([[1] * len(prompt)] * n + [un_mask] * n, dtype=torch.long)[:, :-1]
    return rows, mask


def velocity(model, h_img: torch.Tensor, hs: list, t_emb: torch.Tensor, g: int) -> torch.Tensor:
    """LLM hidden at the image positions [R, g^2, D] -> velocity [R, Cz, H, W]."""
    fh = model.flow_head
    x = fh.dec_aligner(fh.dec_norm(h_img))  # [R, g^2, C]
    x = x.reshape(x.shape[0], g, g, -1).permute(0, 3, 1, 2)  # channels last, then NCHW (as official)
    return model.flow_decoder(x, hs, t_emb)


@torch.no_grad()
def generate_latents(model, prompt: list[int], n: int, pad_id: int, steps: int = 30, cfg_weight: float = 2.0,
                     seed: Optional[int] = None, z0: Optional[torch.Tensor] = None, reuse_prompt_kv: bool = True,
                     progress: Optional[Callable[[int, int], None]] = None, record: bool = False):
    """Integrate the flow from noise to VAE latents for `n` images.

    Returns z [n, Cz, H, W] (and with `record`, the per-step CFG velocities [steps, n, ...]).
    """
    lm, fh = model.language, model.flow_head
    cfg = fh.cfg
    dev, dt = lm.device, lm.dtype
    side = cfg.image_size // cfg.vae_downsample
    if z0 is None:
        gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        z0 = torch.randn(n, cfg.latent_channels, side, side, generator=gen)
    z = z0.to(dev, torch.float32)
    rows, pmask = flow_prompt(prompt, n, pad_id)
    emb = lm.embed_tokens(rows.to(dev))[:, :-1]  # [R, L', D]
    lp = emb.shape[1]
    sched = RectifiedFlowScheduler()
    sched.set_timesteps(steps)
    g = None
    cache = None
    velocities = []
    for k, t in enumerate(sched.timesteps.tolist()):
        zz = torch.cat([z, z]).to(dt)
        x_emb, t_emb, hs = model.flow_encoder(zz, torch.full((2 * n,), t, device=dev))
        g = x_emb.shape[-1]
        img = fh.enc_aligner(x_emb.flatten(2).transpose(1, 2))  # [R, g^2, D]
        new = torch.cat([t_emb[:, None], img], 1)  # [R, 1 + g^2, D]
        total = lp + new.shape[1]
        # positions count every slot, masked prompt tokens included (the official call passes no
        # position ids), so they are explicit here
        if reuse_prompt_kv:
            if cache is None:
                cache = lm.new_cache(2 * n, total)
                lm(inputs_embeds=emb, attention_mask=pmask.to(dev), cache=cache,
                   positions=torch.arange(lp, device=dev).expand(2 * n, lp))
            cache.truncate(lp)
            h = lm(inputs_embeds=new, cache=cache, positions=torch.arange(lp, total, device=dev).expand(2 * n, -1))
        else:
            mask = torch.cat([pmask.to(dev), torch.ones(2 * n, new.shape[1], dtype=torch.long, device=dev)], 1)
            h = lm(inputs_embeds=torch.cat([emb, new], 1), attention_mask=mask,
                   positions=torch.arange(total, device=dev).expand(2 * n, total))
        v = velocity(model, h[:, -g * g:], hs, t_emb, g).float()
        v = cfg_combine(v[:n], v[n:], cfg_weight)
        velocities.append(v)
        z = sched.step(v, z)
        if progress is not None:
            progress(k + 1, steps)
    return (z, torch.stack(velocities)) if record else z

"""Training objectives on the shared model (the fine-tuning app drives them; the math lives here).

- `understanding_loss`: next-token cross-entropy on assistant tokens only (images spliced as at inference).
- `vq_generation_loss`: cross-entropy on VQ image codes after the prompt (Janus generation head).
- `flow_generation_loss`: rectified-flow velocity MSE (JanusFlow), x_t = t x1 + (1 - t) x0, target x1 - x0.
- `vq_tokenizer_loss`: reconstruction + codebook + commitment losses of the VQ tokenizer.
Notation: B batch, T tokens, L prompt tokens, N image codes, K codebook size, V vocab.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .batch import MultimodalBatch
from .quantize import refuse_quantized


LOSS_AVERAGES = ("token", "sample")


def understanding_loss(model, batch: MultimodalBatch, average: str = "token") -> tuple[torch.Tensor, int]:
    """Cross-entropy over assistant tokens of a training `MultimodalBatch` (with `assistant_mask`).

    average: "token" (the mean over every target token of the batch: long answers weigh more) or "sample"
        (each example's mean over its own tokens, then the mean over examples: every example weighs the same,
        so a batch mixing one-line OCR answers with long chart tables does not learn mostly the tables).
    Returns (loss, number of target tokens, or of examples with targets for "sample"); callers that combine
    batches weight each loss by that number.
    """
    if average not in LOSS_AVERAGES:
        raise ValueError(f"loss average must be one of {LOSS_AVERAGES}, got {average!r}")
    refuse_quantized(model, "training")
    emb = model.embed(batch)
    lm = model.language
    h = lm(inputs_embeds=emb, attention_mask=batch.attention_mask)
    target = batch.assistant_mask[:, 1:] & batch.attention_mask[:, 1:].bool()
    n = int(target.sum())
    if n == 0:
        return h.sum() * 0.0, 0
    logits = lm.logits(h[:, :-1][target])  # [n, V] only where a target exists
    labels = batch.input_ids[:, 1:][target]
    if average == "token":
        return F.cross_entropy(logits, labels), n
    per_token = F.cross_entropy(logits, labels, reduction="none")  # [n], in row-major order of `target`
    counts = target.sum(1)  # [B]
    rows = torch.repeat_interleave(torch.arange(target.shape[0], device=counts.device), counts)
    per_row = torch.zeros(target.shape[0], dtype=per_token.dtype, device=per_token.device).index_add(0, rows, per_token)
    has = counts > 0
    return (per_row[has] / counts[has]).mean(), int(has.sum())


def vq_generation_loss(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """prompt_ids/prompt_mask [B,L] (left padded, ending with <begin_of_image>), codes [B,N] -> mean CE."""
    refuse_quantized(model, "training")
    lm, head = model.language, model.vq_head
    emb = torch.cat([lm.embed_tokens(prompt_ids), head.embed_codes(codes[:, :-1])], 1)  # [B, L+N-1, D]
    mask = torch.cat([prompt_mask, torch.ones_like(codes[:, :-1])], 1)
    h = lm(inputs_embeds=emb, attention_mask=mask)
    logits = head.logits(h[:, prompt_ids.shape[1] - 1 :])  # [B, N, K]: position L-1 predicts code 0
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1))


def flow_generation_loss(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, latents: torch.Tensor,
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Rectified flow: velocity MSE at a random t for VAE latents x1 [B,C,H,W] (prompt's last token is
    dropped; t_emb takes its slot, as in sampling)."""
    refuse_quantized(model, "training")
    from mmstack.generation.flow import velocity

    lm, fh = model.language, model.flow_head
    b = latents.shape[0]
    x1 = latents.float()
    x0 = torch.randn(x1.shape, generator=generator).to(x1.device)
    t = torch.rand(b, generator=generator).to(x1.device)
    xt = (t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * x0).to(lm.dtype)
    x_emb, t_emb, hs = model.flow_encoder(xt, t * 1000)
    img = fh.enc_aligner(x_emb.flatten(2).transpose(1, 2))
    emb = torch.cat([lm.embed_tokens(prompt_ids)[:, :-1], t_emb[:, None], img], 1)
    mask = torch.cat([prompt_mask[:, :-1], torch.ones(b, 1 + img.shape[1], dtype=prompt_mask.dtype, device=x1.device)], 1)
    pos = torch.arange(emb.shape[1], device=x1.device).expand(b, -1)
    h = lm(inputs_embeds=emb, attention_mask=mask, positions=pos)
    g = x_emb.shape[-1]
    v = velocity(model, h[:, -g * g:], hs, t_emb, g).float()
    return F.mse_loss(v, x1 - x0)


def vq_tokenizer_loss(vq, images: torch.Tensor, beta: float = 0.25) -> tuple[torch.Tensor, dict]:
    """images [B,3,H,W] in [-1,1] -> (total loss, parts). L2-normalised codebook as the official VQ-16."""
    z = vq.pre_quant(images)  # [B,D,h,w]
    zn = F.normalize(z, dim=1) if vq.quantize.l2_norm else z
    _, idx = vq.quantize(z)
    e = vq.quantize.lookup(idx, zn.shape)  # differentiable w.r.t. the codebook
    codebook = F.mse_loss(e, zn.detach())
    commit = F.mse_loss(zn, e.detach())
    rec = vq.decode(zn + (e - zn).detach())  # straight-through
    recon = F.mse_loss(rec, images) + F.l1_loss(rec, images)
    total = recon + codebook + beta * commit
    return total, {"recon": recon.detach(), "codebook": codebook.detach(), "commit": commit.detach(),
                   "codes_used": int(idx.unique().numel()), "indices": idx.detach(),
                   "latents": zn.detach().permute(0, 2, 3, 1).reshape(-1, zn.shape[1])}


@torch.no_grad()
def restart_dead_codes(quantizer, counts: torch.Tensor, latents: torch.Tensor,
                       generator: Optional[torch.Generator] = None) -> int:
    """Codebook rows no latent chose since the last call (`counts` [K] == 0) restart on latents [M, D] of the
    latest batch, drawn at random (with a little noise, so rows restarted on one latent part ways): a codebook
    that collapses onto few codes gets its dead rows back where the encoder's outputs are. Returns how many
    rows restarted."""
    dead = (counts == 0).nonzero().flatten()
    if dead.numel() == 0 or latents.shape[0] == 0:
        return 0
    w = quantizer.embedding.weight
    pick = torch.randint(latents.shape[0], (dead.numel(),), generator=generator)
    new = latents[pick].to(w.device, torch.float32)
    new = new + 0.01 * new.std() * torch.randn(new.shape, generator=generator).to(new.device)
    w[dead.to(w.device)] = new.to(w.dtype)
    return int(dead.numel())

"""What one engine step computes: the first token of each request when its prefill completes, one decode
step over every decoding row (text tokens and VQ codes in the same forward), one Euler step over every
JanusFlow row. The math is the reference loops' (`mmstack.decoding.generate_ids`,
`mmstack.generation.sampler.generate_codes`, `mmstack.generation.flow.generate_latents`), batched across
requests; tests/engine checks that every request gives the reference's output.

Notation: B rows in the step, D LLM width, V vocab, K codebook size, n images, g latent grid.
"""
from __future__ import annotations

import torch

from mmstack.generation.flow import velocity
from ..kernels.sampling import cfg_combine
from .requests import Event
from .state import DECODE, FLOW, Active


def _sample_text(model, group: list[Active], hidden: torch.Tensor) -> None:
    """hidden [len(group), D] (one row per text request) -> each request takes its next token."""
    logits = model.language.logits(hidden)  # [B, V] fp32, one lm_head matmul for every text request
    greedy = [i for i, a in enumerate(group) if a.seen is None and not a.req.params.temperature]
    if greedy:  # one argmax and one host sync for every greedy request
        toks = torch.argmax(logits[greedy], dim=-1).tolist()
        for i, tok in zip(greedy, toks):
            group[i].push_token(tok)
    done = set(greedy)
    for i, a in enumerate(group):
        if i not in done:
            a.take_token(logits[i: i + 1])


@torch.no_grad()
def finish_prefill(model, cache, p) -> None:
    """Truncate every row of a completed prefill to its own prompt and start its request: text and VQ
    requests sample their first token from the last prompt position; flow requests start their steps."""
    for r, n in enumerate(p.lengths):
        cache.truncate(p.start + r, n, next_pos=int(p.valid[r, :n].sum()))
    texts, text_h, r = [], [], 0
    for a in p.members:
        rows = list(range(r, r + a.req.rows))
        r += a.req.rows
        if a.kind == "flow":
            a.phase = FLOW
            continue
        a.phase = DECODE
        if a.done:  # cancelled during the prefill, or nothing to generate
            continue
        if a.kind == "text":
            texts.append(a)
            text_h.append(p.last_hidden[rows[0]])
        else:
            a.take_codes(model.vq_head.logits(p.last_hidden[rows]))
    if texts:
        _sample_text(model, texts, torch.stack(text_h))


@torch.no_grad()
def decode_step(model, cache, group: list[Active], region: tuple[int, int], static=None) -> None:
    """One cached token for every decoding row [lo, hi): text rows feed their last token, VQ rows the
    embedding of their last codes; every request then samples from its own rows."""
    lm = model.language
    lo, hi = region
    dev = lm.device
    inputs = torch.zeros(hi - lo, lm.cfg.hidden_size, dtype=lm.dtype, device=dev)
    texts = [a for a in group if a.kind == "text"]
    if texts:
        rows = torch.tensor([a.rows[0] - lo for a in texts], device=dev)
        ids = torch.tensor([a.last for a in texts], dtype=torch.long, device=dev)
        inputs[rows] = lm.embed_tokens(ids)
    for a in group:
        if a.kind == "vq":
            inputs[torch.tensor(a.rows, device=dev) - lo] = model.vq_head.embed_codes(a.code_rows().to(dev)).to(lm.dtype)
    h = static(inputs, hi) if static is not None and lo == 0 else None  # a captured / static step
    if h is None:
        h = lm(inputs_embeds=inputs[:, None], cache=cache.view(lo, hi))[:, -1]  # [B, D]
    if texts:
        _sample_text(model, texts, h[torch.tensor([a.rows[0] - lo for a in texts], device=dev)])
    for a in group:
        if a.kind == "vq":
            a.take_codes(model.vq_head.logits(h[torch.tensor(a.rows, device=dev) - lo]))
    # rows of requests that did not decode this step (none: every decoding row is in `group`) keep their length
    idle = set(range(lo, hi)) - {r for a in group for r in a.rows}
    for row in idle:
        cache.truncate(row, cache.lengths[row] - 1)


@torch.no_grad()
def flow_step(model, cache, group: list[Active], region: tuple[int, int]) -> None:
    """One Euler step for every JanusFlow request: each re-feeds [t_emb, latent tokens] after its cached
    prompt (rows truncated back to the prompt first), the LLM runs once over all their rows, and each
    request combines its conditional / unconditional velocities with CFG."""
    lm, fh = model.language, model.flow_head
    lo, hi = region  # flow rows are packed after the decoding rows
    dev, dt = lm.device, lm.dtype
    zs, ts, order = [], [], []
    for a in group:
        req = a.req
        for row in a.rows:
            cache.truncate(row, req.prompt_len)
        zs.append(torch.cat([a.z, a.z]))  # [2n, C, H, W]: cond rows then uncond rows
        ts.append(torch.full((2 * req.n,), float(a.timesteps[a.step]), device=dev))
        order.extend(a.rows)
    z = torch.cat(zs).to(dt)
    x_emb, t_emb, hs = model.flow_encoder(z, torch.cat(ts))
    g = x_emb.shape[-1]
    img = fh.enc_aligner(x_emb.flatten(2).transpose(1, 2))  # [R, g^2, D]
    new = torch.cat([t_emb[:, None], img], 1)  # [R, 1 + g^2, D]
    inputs = torch.zeros(hi - lo, new.shape[1], new.shape[2], dtype=dt, device=dev)
    index = torch.tensor(order, device=dev) - lo
    inputs[index] = new
    lengths = torch.tensor(cache.lengths[lo:hi], device=dev)
    positions = lengths[:, None] + torch.arange(new.shape[1], device=dev)[None]  # every slot counts, as official
    h = lm(inputs_embeds=inputs, positions=positions, cache=cache.view(lo, hi))[index]  # [R, 1 + g^2, D]
    v = velocity(model, h[:, -g * g:], hs, t_emb, g).float()  # [R, C, H, W]
    start = 0
    for a in group:
        n = a.req.n
        va = v[start: start + 2 * n]
        start += 2 * n
        a.z = a.scheduler.step(cfg_combine(va[:n], va[n:], a.req.cfg_weight), a.z)
        a.step += 1
        a.handle._emit(Event(done=a.step, total=a.req.steps))
        if a.step >= a.req.steps:
            a.finish_reason = "length"

"""Activation memory of one fine-tuning step (the understanding task), from the model's shapes: the bytes autograd
keeps from the forward for the backward (unique storages), per piece. `apps.finetune_plan` adds them up; the
tests (tests/apps/test_finetune_plan.py) check the sums against storages measured with `saved_tensors_hooks`.

Notation, per token unless said: n tokens of a micro-batch (b samples x T), s keys per token (T); bytes: a of a
compute activation (4 fp32; 2 under bf16 autocast), w of the residual stream and the norms (the weights' dtype: 4,
the trainer keeps fp32 weights), f = 4 (norm statistics, the loss's log-softmax, attention log-sum-exp, the
routed experts, which no autocast list casts), i = 8 (int64 indices). H hidden, Hq query heads, G kv heads, D head
dim; MLA: Q q_lora_rank, C kv_lora_rank, R rope dims, P nope dims, V value dims; I MLP width, E routed experts,
K experts per token; W vision width, M vision MLP width, Vv vocabulary, r LoRA rank.

A Linear saves its input when its weight trains or it has LoRA. In fp32 the Linear layers reading one tensor (q/k/v,
gate/up, router and shared experts) share that storage; under autocast each saves its own bf16 cast of it.

| piece | kept for backward (elements per token) |
|---|---|
| RMSNorm | its input H w (when it needs a gradient), 1 f statistic, the normalised input H w (when its weight trains) |
| LoRA | + r (the A output) per adapted Linear |
| MHA, fused attention | rotated q and k (Hq + G) D, v G D, output Hq D, log-sum-exp Hq f; o_proj input Hq D |
| MLA | kv_a output C + R (fp32: the norm's input is a view of it; autocast: its fp32 copy C), its norm, q Hq (P+R), |
|     | k Hq (P+R), kv_b output Hq (P+V); fused: output Hq V and Hq f log-sum-exp; unfused (CPU when P+R != V, in |
|     | fp32 there even under autocast): the softmax Hq s and a v copy; o_proj input Hq V; q_a output Q + norm |
| SwiGLU (dense, shared) | gate I, up I, silu(gate) I, their product I (the down input) |
| router | scores E, top-k ids K i (+ weights K and group ids for group-limited / noaux routing) |
| routed experts | per token and chosen expert, f: 3 H + 4 I, ids 3 i and a weight; LoRA on the stacked experts |
|                | materialises W + BA: 3 E I H per layer (fp32) |
| loss | lm_head input H and log-softmax Vv f per target token; token ids i |
| ViT block (timm) | 2 LayerNorm inputs 2W w + 4 f, Linear inputs 2W, qkv 3W, attention output W + heads f, fc1 |
|                  | output M, GELU output M; pixels 3 S^2 per view; the final LayerNorm W w + 2 f |
| projector | its input and, per GELU, the hidden twice |
| gradient checkpointing | per decoder layer its input H w (plus the rope tables once); one layer recomputed in backward |
"""
from __future__ import annotations

from dataclasses import dataclass, field

F32, I64 = 4, 8


@dataclass(frozen=True)
class Bytes:
    """Element sizes: `a` compute activations, `w` the residual stream and norms (the weights' dtype), and whether
    each Linear saves its own cast of its input (`autocast`) or the layers reading one tensor share it."""

    a: int = 4
    w: int = 4
    autocast: bool = False

    def inputs(self, n: int, dim: int, savers: int, source: int = 0) -> int:
        """What `savers` Linear layers reading one [n, dim] tensor of `source` bytes (default `w`) keep of it."""
        if not savers:
            return 0
        return n * dim * (self.a * savers if self.autocast else (source or self.w))


@dataclass(frozen=True)
class LayerGrad:
    """What one decoder layer needs gradients for: `full` (its weights train), `lora` (relative names of the Linear
    layers with adapters, e.g. "self_attn.q_proj"), `experts_lora` (elements of the stacked expert tensors that LoRA
    materialises as W + BA), `input` (its input needs a gradient: something before it trains)."""

    full: bool
    lora: frozenset = field(default_factory=frozenset)
    experts_lora: int = 0
    input: bool = True
    rank: int = 0

    def saves(self, *names: str) -> int:
        """How many of the named Linear layers save their input."""
        return sum(self.full or n in self.lora for n in names)

    def lora_width(self, *names: str) -> int:
        return self.rank * sum(n in self.lora for n in names)


def rms_norm(n: int, dim: int, x: int, input_grad: bool, weight_trains: bool, y: int = 0) -> int:
    """x / y: bytes of the saved input and normalised input."""
    return n * (dim * x * input_grad + F32 + dim * (y or x) * weight_trains)


def swiglu(n: int, hidden: int, width: int, b: Bytes, g: LayerGrad, prefix: str) -> int:
    """The input (per Linear that saves it), gate, up and silu(gate) always (the input gradient needs them), their
    product when down saves its input."""
    gu, down = (f"{prefix}.gate_proj", f"{prefix}.up_proj"), f"{prefix}.down_proj"
    keep = 3 * width + width * g.saves(down) + g.lora_width(*gu, down)
    return b.inputs(n, hidden, g.saves(*gu)) + n * b.a * keep


def attention(lm, n: int, s: int, b: Bytes, g: LayerGrad, fused: bool) -> int:
    """The attention half of a decoder layer after its norm: projections, rope, attention, o_proj."""
    hq, a = lm.num_heads, b.a
    if lm.attention != "mla":
        d, gk = lm.head_dim, lm.num_kv_heads or hq
        proj = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        keep = (hq + gk) * d + gk * d + hq * d  # rotated q|k, v, output
        keep += hq * d * g.saves("self_attn.o_proj") + g.lora_width(*proj, "self_attn.o_proj")
        return b.inputs(n, lm.hidden_size, g.saves(*proj)) + n * (a * keep + F32 * hq)
    m = lm.mla
    qk, c, v = m.qk_nope_head_dim + m.qk_rope_head_dim, m.kv_lora_rank, m.v_head_dim
    q_in = ("self_attn.q_a_proj",) if m.q_lora_rank else ("self_attn.q_proj",)
    total = b.inputs(n, lm.hidden_size, g.saves(*q_in, "self_attn.kv_a_proj_with_mqa"))
    keep = g.lora_width(*q_in, "self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj", "self_attn.o_proj")
    # kv_a_layernorm on the kv_a output: fp32, a view of the C+R output; autocast, its fp32 copy and a bf16 y
    if b.autocast:
        total += rms_norm(n, c, F32, True, g.full, y=a)
    else:
        total += n * (c + m.qk_rope_head_dim) * a + rms_norm(n, c, a, False, g.full)
    total += b.inputs(n, c, g.saves("self_attn.kv_b_proj"), a)
    if m.q_lora_rank:
        total += rms_norm(n, m.q_lora_rank, F32 if b.autocast else a, True, g.full, y=a)
        total += b.inputs(n, m.q_lora_rank, g.saves("self_attn.q_b_proj"), a)
        keep += g.lora_width("self_attn.q_b_proj")
    keep += hq * v * g.saves("self_attn.o_proj")
    total += n * a * keep
    if fused:  # q, k, kv_b output (v is a view of it), output, log-sum-exp
        return total + n * (a * (2 * hq * qk + hq * (m.qk_nope_head_dim + v) + hq * v) + F32 * hq)
    # the unfused (math) path: q, k, the probabilities, v (a view of the kv_b output; under autocast on the CPU
    # the math path runs in fp32 and keeps its fp32 copies)
    if b.autocast:
        return total + n * F32 * (2 * hq * qk + hq * s + hq * v)
    return total + n * a * (2 * hq * qk + hq * s + hq * (m.qk_nope_head_dim + v))


def router(n: int, moe, a: int) -> int:
    k = moe.num_experts_per_tok
    extra = 0 if moe.topk_method == "greedy" else k * a + moe.n_group * (3 * I64 + 1) + a
    return n * (moe.n_routed_experts * a + k * I64 + extra)


def routed_experts(n: int, hidden: int, moe, g: LayerGrad) -> int:
    """Tokens sorted by expert, one grouped GEMM per projection (`kernels.moe` "grouped"), in fp32: the input is the
    fp32 norm output and the grouped GEMM is on no autocast list."""
    k, width = moe.num_experts_per_tok, moe.moe_intermediate_size
    trains = g.full or g.experts_lora > 0
    per_pair = F32 * (hidden * (2 + trains) + width * (3 + trains)) + 3 * I64 + F32
    return n * k * per_pair + g.experts_lora * F32


def decoder_layer(lm, index: int, n: int, s: int, b: Bytes, g: LayerGrad, fused: bool) -> int:
    """Bytes one decoder layer keeps for backward."""
    h = lm.hidden_size
    total = rms_norm(n, h, b.w, g.input, g.full) + attention(lm, n, s, b, g, fused)
    total += rms_norm(n, h, b.w, True, g.full)
    moe = lm.moe if lm.moe is not None and lm.moe.is_moe_layer(index) else None
    if moe is None:
        return total + swiglu(n, h, lm.intermediate_size, b, g, "mlp")
    shared = ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj")
    savers = g.saves("mlp.gate") + (g.saves(*shared) if moe.n_shared_experts else 0)
    total += b.inputs(n, h, savers) + router(n, moe, b.a) + routed_experts(n, h, moe, g)
    if moe.n_shared_experts:
        width = moe.moe_intermediate_size * moe.n_shared_experts
        total += swiglu(n, h, width, b, g, "mlp.shared_experts") - b.inputs(n, h, g.saves(*shared))
    return total


def rope_tables(lm, n: int, b: Bytes, checkpointing: bool = False) -> int:
    """cos and sin, built once per forward at the residual dtype: rope keeps them (one storage for every layer), or
    under autocast each layer's bf16 cast of them; checkpointing keeps them as every layer's input."""
    rope = lm.mla.qk_rope_head_dim if lm.attention == "mla" else lm.head_dim
    if b.autocast and not checkpointing:
        return n * b.a * 2 * rope * lm.num_layers
    return n * b.w * 2 * rope


def checkpointed_inputs(lm, n: int, b: Bytes) -> int:
    """What gradient checkpointing keeps: every layer's input and the rope tables."""
    return n * b.w * lm.num_layers * lm.hidden_size + rope_tables(lm, n, b, checkpointing=True)


def head_and_loss(lm, n: int, targets: int, b: Bytes, full: bool) -> int:
    """Final norm, lm_head and the cross-entropy over `targets` tokens, plus the token ids the embedding keeps."""
    h = lm.hidden_size
    return (rms_norm(n, h, b.w, True, full) + targets * (b.a * h * full + F32 * lm.vocab_size + I64)
            + n * I64 * full + 2 * n)


def vision_tower(v, views: int, b: Bytes) -> int:
    """A timm ViT on `views` images of v.image_size^2 pixels, every block training."""
    p = views * v.grid * v.grid
    w, mlp = v.width, int(v.width * v.mlp_ratio)
    block = 2 * b.w * w + 2 * b.inputs(1, w, 1) + b.a * (4 * w + 2 * mlp) + F32 * (4 + v.heads)
    return views * 3 * v.image_size ** 2 * b.a + v.layers * p * block + p * (b.w * w + 2 * F32)


def projector(cfg, tokens_in: int, tokens_out: int, b: Bytes) -> int:
    """The projector's saved inputs: the first Linear's input, and each GELU's input and output."""
    if cfg.kind == "linear":
        return b.inputs(tokens_in, cfg.input_dim, 1)
    r = cfg.downsample_ratio if cfg.kind == "downsample_mlp_gelu" else 1
    hidden = cfg.n_embed * cfg.mlp_ratio if cfg.kind == "downsample_mlp_gelu" else cfg.n_embed
    return b.inputs(tokens_out, cfg.input_dim * r * r, 1) + tokens_out * b.a * 2 * hidden * (cfg.depth - 1)

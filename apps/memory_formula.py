"""Activation memory of one fine-tuning step (the understanding task), from the model's shapes: the bytes autograd
keeps from the forward for the backward (unique storages), per piece. `apps.finetune_plan` adds them up; the
tests (tests/apps/test_finetune_plan.py) check the sums against storages measured with `saved_tensors_hooks`.

Notation, per token unless said: n tokens of a micro-batch (b samples x T), s keys per token (T), a bytes of an
activation element (4 fp32; 2 under bf16 autocast), f = 4 (what stays fp32: norm statistics, router scores, the
log-softmax of the loss, attention log-sum-exp), i = 8 (int64 indices). H hidden, Hq query heads, G kv heads,
D head dim; MLA: Q q_lora_rank, C kv_lora_rank, R rope dims, P nope dims, V value dims; I MLP width, E routed
experts, K experts per token; W vision width, M vision MLP width, Vv vocabulary, r LoRA rank.

| piece | kept for backward (elements per token) |
|---|---|
| RMSNorm | its input H (when it needs a gradient), 1 f statistic, the normalised input H (when its weight trains) |
| Linear | its input (when its weight trains or it has LoRA; one storage for q/k/v or gate/up, which read one tensor) |
| LoRA | + r (the A output) per adapted Linear |
| MHA, fused attention | rotated q and k (Hq + G) D, v G D, output Hq D, log-sum-exp Hq f; o_proj input Hq D |
| MLA | kv_a output C + R, its norm (above), q Hq (P+R), k Hq (P+R), kv_b output Hq (P+V); fused: output Hq V and |
|     | Hq f log-sum-exp; unfused (CPU when P+R != V): the softmax Hq s; o_proj input Hq V; q_a output Q + norm |
| SwiGLU (dense, shared) | gate I, up I, silu(gate) I, their product I (the down input) |
| router | scores E f, top-k ids K i (+ weights K f and group ids for group-limited / noaux routing) |
| routed experts | per token and chosen expert: 3 H + 4 I, ids 3 i and a weight f; LoRA on the stacked experts |
|                | materialises W + BA: 3 E I H per layer (at the weight dtype) |
| loss | lm_head input H and log-softmax Vv f per target token; token ids i |
| ViT block (timm) | 2 LayerNorm inputs 2W + 4 f, their outputs 2W, qkv 3W, attention output W + heads f, fc1 output M, |
|                  | GELU output M; pixels 3 S^2 per view; the final LayerNorm W + 2 f |
| projector | its input and, per GELU, the hidden twice |
| gradient checkpointing | per decoder layer its input H (plus the rope tables once); one layer recomputed in backward |
"""
from __future__ import annotations

from dataclasses import dataclass, field

F32, I64 = 4, 8


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

    def saves_input_of(self, *names: str) -> bool:
        return self.full or any(n in self.lora for n in names)

    def lora_width(self, *names: str) -> int:
        return self.rank * sum(n in self.lora for n in names)


def rms_norm(n: int, dim: int, a: int, input_grad: bool, weight_trains: bool) -> int:
    return n * (dim * a * input_grad + F32 + dim * a * weight_trains)


def swiglu(n: int, hidden: int, width: int, a: int, g: LayerGrad, prefix: str) -> int:
    """gate, up and silu(gate) always (the input gradient needs them); the product when down trains; the input
    when gate/up train."""
    gu, down = (f"{prefix}.gate_proj", f"{prefix}.up_proj"), f"{prefix}.down_proj"
    keep = 3 * width + width * g.saves_input_of(down) + g.lora_width(*gu, down)
    return n * a * keep


def attention(lm, n: int, s: int, a: int, g: LayerGrad, fused: bool) -> int:
    """The attention half of a decoder layer after its norm: projections, rope, attention, o_proj."""
    hq = lm.num_heads
    if lm.attention != "mla":
        d, gk = lm.head_dim, lm.num_kv_heads or hq
        keep = (hq + gk) * d + gk * d + hq * d  # rotated q|k, v, output
        proj = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        keep += lm.hidden_size * g.saves_input_of(*proj) + g.lora_width(*proj)
        keep += hq * d * g.saves_input_of("self_attn.o_proj") + g.lora_width("self_attn.o_proj")
        return n * (a * keep + F32 * hq)
    m = lm.mla
    qk, c = m.qk_nope_head_dim + m.qk_rope_head_dim, m.kv_lora_rank
    q_in = ("self_attn.q_a_proj",) if m.q_lora_rank else ("self_attn.q_proj",)
    keep = lm.hidden_size * g.saves_input_of(*q_in, "self_attn.kv_a_proj_with_mqa")
    keep += g.lora_width(*q_in, "self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj", "self_attn.o_proj")
    total = n * a * keep + rms_norm(n, c, a, True, g.full)  # kv_a_layernorm (input: a view of the C+R output)
    keep = (c + m.qk_rope_head_dim) + c * g.saves_input_of("self_attn.kv_b_proj")
    if m.q_lora_rank:
        keep += m.q_lora_rank * (1 + g.saves_input_of("self_attn.q_b_proj")) + g.lora_width("self_attn.q_b_proj")
        total += n * F32 + n * a * m.q_lora_rank * g.full
    keep += 2 * hq * qk + hq * (m.qk_nope_head_dim + m.v_head_dim)  # q, k, kv_b output (v is a view of it)
    keep += hq * m.v_head_dim * g.saves_input_of("self_attn.o_proj")
    total += n * a * keep
    if fused:
        return total + n * (a * hq * m.v_head_dim + F32 * hq)
    return total + n * a * hq * s  # the attention probabilities of the unfused (math) path


def router(n: int, moe, a: int) -> int:
    k = moe.num_experts_per_tok
    extra = 0 if moe.topk_method == "greedy" else k * F32 + moe.n_group * (3 * I64 + 1) + F32
    return n * (moe.n_routed_experts * F32 + k * I64 + extra)


def routed_experts(n: int, hidden: int, moe, a: int, g: LayerGrad, weight_bytes: int) -> int:
    """Tokens sorted by expert, one grouped GEMM per projection (`kernels.moe` "grouped")."""
    k, width = moe.num_experts_per_tok, moe.moe_intermediate_size
    trains = g.full or g.experts_lora > 0
    per_pair = a * (hidden * (2 + trains) + width * (3 + trains)) + 3 * I64 + F32
    return n * k * per_pair + g.experts_lora * weight_bytes


def decoder_layer(lm, index: int, n: int, s: int, a: int, g: LayerGrad, fused: bool, weight_bytes: int) -> int:
    """Bytes one decoder layer keeps for backward."""
    h = lm.hidden_size
    total = rms_norm(n, h, a, g.input, g.full) + attention(lm, n, s, a, g, fused)
    total += rms_norm(n, h, a, True, g.full)
    moe = lm.moe if lm.moe is not None and lm.moe.is_moe_layer(index) else None
    if moe is None:
        gu = ("mlp.gate_proj", "mlp.up_proj")
        return total + n * a * h * g.saves_input_of(*gu) + swiglu(n, h, lm.intermediate_size, a, g, "mlp")
    shared = ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj")
    total += n * a * h * g.saves_input_of("mlp.gate", *shared)  # the norm output, kept once
    total += router(n, moe, a) + routed_experts(n, h, moe, a, g, weight_bytes)
    if moe.n_shared_experts:
        total += swiglu(n, h, moe.moe_intermediate_size * moe.n_shared_experts, a, g, "mlp.shared_experts")
    return total


def checkpointed_inputs(lm, n: int, a: int) -> int:
    """What gradient checkpointing keeps: every layer's input and the rope tables (shared by all layers)."""
    rope = lm.mla.qk_rope_head_dim if lm.attention == "mla" else lm.head_dim
    return n * a * (lm.num_layers * lm.hidden_size + 2 * rope)


def rope_tables(lm, n: int, a: int) -> int:
    rope = lm.mla.qk_rope_head_dim if lm.attention == "mla" else lm.head_dim
    return n * a * 2 * rope


def head_and_loss(lm, n: int, targets: int, a: int, full: bool) -> int:
    """Final norm, lm_head and the cross-entropy over `targets` tokens, plus the token ids the embedding keeps."""
    h = lm.hidden_size
    return (rms_norm(n, h, a, True, full) + targets * (a * h * full + F32 * lm.vocab_size + I64)
            + n * I64 * full + 2 * n)


def vision_tower(v, views: int, a: int) -> int:
    """A timm ViT on `views` images of v.image_size^2 pixels, every block training."""
    p = views * v.grid * v.grid
    w, mlp = v.width, int(v.width * v.mlp_ratio)
    block = a * (8 * w + 2 * mlp) + F32 * (4 + v.heads)
    return views * 3 * v.image_size ** 2 * a + v.layers * p * block + p * (a * w + 2 * F32)


def projector(cfg, tokens_in: int, tokens_out: int, a: int) -> int:
    """The projector's saved inputs: the first Linear's input, and each GELU's input and output."""
    if cfg.kind == "linear":
        return tokens_in * cfg.input_dim * a
    r = cfg.downsample_ratio if cfg.kind == "downsample_mlp_gelu" else 1
    hidden = cfg.n_embed * cfg.mlp_ratio if cfg.kind == "downsample_mlp_gelu" else cfg.n_embed
    return tokens_out * a * (cfg.input_dim * r * r + 2 * hidden * (cfg.depth - 1))

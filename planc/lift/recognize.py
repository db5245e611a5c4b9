"""Structural recognizers: which module is which semantic block.

A block is recognized by its children, parameter shapes and config — never by class name alone —
so any decoder LM laid out the Hugging Face way (DeepSeek-V2/V3, Kimi-K2, Llama, Qwen3) lifts.
The result is a numbered `Block` list in execution order; `planc.lift.check` then confirms each
against the captured graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from planc.errors import ModelError
from planc.dims import GqaDims, MlaDims, RouterDims

MLA_CHILDREN = frozenset(("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"))
GQA_CHILDREN = frozenset(("q_proj", "k_proj", "v_proj", "o_proj"))
MLP_CHILDREN = frozenset(("gate_proj", "up_proj", "down_proj"))
CAPTURED = "captured"  # a block no recognizer knows, run as its exported graph (planc.lift.captured)
FFN_KINDS = ("mlp", "moe")  # what planc lifts in a decoder layer's feed-forward slot


@dataclass(frozen=True)
class Block:
    kind: str
    fqn: str
    cls: str
    layer: int | None = None
    dims: object = None
    attrs: dict = field(default_factory=dict)


def _children(m: nn.Module) -> set[str]:
    return {name for name, child in m.named_children() if child is not None}


def _is_linear(m: nn.Module | None) -> bool:
    return isinstance(m, nn.Linear)


def rmsnorm_eps(m: nn.Module) -> float | None:
    """eps if `m` is an RMSNorm-shaped leaf (1-D weight, an epsilon, no bias), else None."""
    weight = getattr(m, "weight", None)
    if _children(m) or weight is None or weight.dim() != 1 or getattr(m, "bias", None) is not None:
        return None
    eps = getattr(m, "variance_epsilon", getattr(m, "eps", None))
    return float(eps) if isinstance(eps, (int, float)) else None


def _act_name(m: nn.Module, config) -> str:
    return getattr(config, "hidden_act", "silu")


def _mla_dims(attn: nn.Module, rope_scaling: float) -> MlaDims | None:
    if not MLA_CHILDREN <= _children(attn) or not all(_is_linear(getattr(attn, c)) for c in ("kv_a_proj_with_mqa", "kv_b_proj")):
        return None
    q_lora = attn.q_a_proj.out_features if getattr(attn, "q_a_proj", None) is not None else 0
    dims = MlaDims(
        num_heads=attn.num_heads, q_lora_rank=q_lora, kv_lora_rank=attn.kv_lora_rank,
        nope_dim=attn.qk_nope_head_dim, rope_dim=attn.qk_rope_head_dim, v_dim=attn.v_head_dim,
        eps=rmsnorm_eps(attn.kv_a_layernorm), scale=float(attn.scaling), rope_scaling=rope_scaling,
        rope_interleave=bool(getattr(attn.config, "rope_interleave", False)),
    )
    # The shapes must agree with the attributes, or the module is something else.
    shapes_agree = (attn.kv_a_proj_with_mqa.out_features == dims.kv_lora_rank + dims.rope_dim
                    and attn.kv_b_proj.out_features == dims.num_heads * (dims.nope_dim + dims.v_dim))
    return dims if shapes_agree else None


def _gqa_dims(attn: nn.Module, rope_scaling: float) -> GqaDims | None:
    if not GQA_CHILDREN <= _children(attn) or not all(_is_linear(getattr(attn, c)) for c in sorted(GQA_CHILDREN)):
        return None
    head_dim = attn.head_dim
    q_norm = getattr(attn, "q_norm", None)
    return GqaDims(
        num_heads=attn.q_proj.out_features // head_dim, num_kv_heads=attn.k_proj.out_features // head_dim,
        head_dim=head_dim, eps=rmsnorm_eps(q_norm) if q_norm is not None else 0.0,
        scale=float(attn.scaling), rope_scaling=rope_scaling,
    )


def _router_dims(moe: nn.Module) -> RouterDims | None:
    gate, experts = getattr(moe, "gate", None), getattr(moe, "experts", None)
    if gate is None or experts is None or not hasattr(gate, "e_score_correction_bias"):
        return None
    if getattr(experts, "gate_up_proj", None) is None or experts.gate_up_proj.dim() != 3:
        return None
    return RouterDims(
        num_experts=gate.weight.shape[0], num_groups=gate.num_group, topk_groups=gate.topk_group,
        top_k=gate.top_k, normalize=bool(gate.norm_topk_prob), scaling=float(gate.routed_scaling_factor),
    )


def _is_mlp(m: nn.Module) -> bool:
    return MLP_CHILDREN <= _children(m) and all(_is_linear(getattr(m, c)) for c in sorted(MLP_CHILDREN))


def _attention_block(attn: nn.Module, fqn: str, layer: int, rope_scaling: float) -> Block:
    for kind, dims in (("mla_attention", _mla_dims(attn, rope_scaling)), ("gqa_attention", _gqa_dims(attn, rope_scaling))):
        if dims is not None:
            return Block(kind, fqn, type(attn).__name__, layer, dims)
    raise ModelError(f"{fqn} ({type(attn).__name__}): not a recognized attention block; planc lifts MLA "
                     f"(children {', '.join(sorted(MLA_CHILDREN))}) and GQA (children {', '.join(sorted(GQA_CHILDREN))})")


def _ffn_block(ffn: nn.Module, fqn: str, layer: int, config) -> Block:
    act = _act_name(ffn, config)
    router = _router_dims(ffn)
    if router is not None:
        shared = getattr(ffn, "shared_experts", None)
        return Block("moe", fqn, type(ffn).__name__, layer, router,
                     {"act": act, "shared": shared is not None, "intermediate": ffn.experts.gate_up_proj.shape[1] // 2})
    if _is_mlp(ffn):
        return Block("mlp", fqn, type(ffn).__name__, layer, None, {"act": act, "intermediate": ffn.gate_proj.out_features})
    raise ModelError(f"{fqn} ({type(ffn).__name__}): not a recognized feed-forward block; planc lifts gated MLPs "
                     f"({', '.join(sorted(MLP_CHILDREN))}) and DeepSeek-style MoE (gate with e_score_correction_bias + "
                     "fused experts)")


def _norm_block(m: nn.Module, fqn: str, layer: int | None) -> Block:
    eps = rmsnorm_eps(m)
    if eps is None:
        raise ModelError(f"{fqn} ({type(m).__name__}): expected an RMSNorm (1-D weight, eps, no bias)")
    return Block("rmsnorm", fqn, type(m).__name__, layer, None, {"eps": eps})


def _decoder(model: nn.Module) -> tuple[str, nn.Module]:
    base = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm")
    if base is None or not all(hasattr(base, n) for n in needed) or not isinstance(getattr(model, "lm_head", None), nn.Linear):
        raise ModelError(f"{type(model).__name__}: not a decoder LM laid out as model.embed_tokens / model.layers / "
                         "model.norm / lm_head; planc lifts Hugging Face-style causal LMs")
    return "model", base


def _ffn_or_captured(ffn: nn.Module, fqn: str, layer: int, config) -> Block:
    """A feed-forward block planc does not recognize runs as captured (planc.lift.captured)."""
    try:
        return _ffn_block(ffn, fqn, layer, config)
    except ModelError as exc:
        why = str(exc).removeprefix(f"{fqn} ({type(ffn).__name__}): ")
        return Block(CAPTURED, fqn, type(ffn).__name__, layer, None, {"why": why, "lifts": FFN_KINDS})


def _stateful_block(attn: nn.Module, fqn: str, layer: int, rope_scaling: float) -> Block:
    """An attention block planc does not recognize is an error: it cannot run as captured."""
    try:
        return _attention_block(attn, fqn, layer, rope_scaling)
    except ModelError as exc:
        raise ModelError(f"{exc}. It cannot run as captured either: attention keeps a KV cache from prefill to "
                         "each decode step, and a captured graph of one forward has no cache to carry") from exc


def recognize(model: nn.Module) -> list[Block]:
    """The blocks of a decoder LM, in execution order; an unrecognized feed-forward block is a
    `captured` block (run as its exported graph, replicated)."""
    prefix, base = _decoder(model)
    rotary = getattr(base, "rotary_emb", None)
    rope_scaling = float(getattr(rotary, "attention_scaling", 1.0))
    blocks = [Block("embedding", f"{prefix}.embed_tokens", type(base.embed_tokens).__name__)]
    for i, layer in enumerate(base.layers):
        lp = f"{prefix}.layers.{i}"
        blocks += [
            _norm_block(layer.input_layernorm, f"{lp}.input_layernorm", i),
            _stateful_block(layer.self_attn, f"{lp}.self_attn", i, rope_scaling),
            _norm_block(layer.post_attention_layernorm, f"{lp}.post_attention_layernorm", i),
            _ffn_or_captured(layer.mlp, f"{lp}.mlp", i, model.config),
        ]
    blocks.append(_norm_block(base.norm, f"{prefix}.norm", None))
    blocks.append(Block("lm_head", "lm_head", "Linear", None, None, {"vocab": model.lm_head.out_features}))
    return blocks

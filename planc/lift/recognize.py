"""Structural recognizers: which module is which semantic block.

A block is recognized by its children, parameter shapes and config — never by class name alone —
so any decoder LM laid out the Hugging Face way (DeepSeek-V2/V3, Kimi-K2, Llama, Qwen3) lifts.
The result is a numbered `Block` list in execution order; `planc.lift.check` then confirms each
against the captured graph.
"""
from __future__ import annotations

import copy
import functools
import inspect
import sys
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from planc.errors import ModelError, one_line
from planc.lift.restore import touch
from planc.dims import CLAMPED_GLU, ExpertsLayout, GqaDims, MlaDims, RouterDims
from planc.lift.glue import Scale
from planc.ops import Ops, act, apply_rope, unit_rmsnorm
from planc.weights import SPLIT

MLA_CHILDREN = frozenset(("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"))
GQA_CHILDREN = frozenset(("q_proj", "k_proj", "v_proj", "o_proj"))
MLP_CHILDREN = frozenset(("gate_proj", "up_proj", "down_proj"))
PLAIN_MLP_CHILDREN = frozenset(("up_proj", "down_proj"))  # an MLP without a gate (Arcee)
# every child with weights the attention ops read: the projections, q LoRA, per-head or whole q/k norms
MLA_READS = MLA_CHILDREN | {"q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj"}
# per-head q/k norms: (q's, k's, whether they normalize the rotated heads): Qwen3's before rope,
# HunYuan's after (the lift's numeric check confirms the order on real weights)
QK_NORMS = (("q_norm", "k_norm", False), ("query_layernorm", "key_layernorm", True))
UNIT_QK_NORM = "qk_norm"  # one weightless norm for q and k after rope (Llama 4)
GQA_READS = GQA_CHILDREN | {name for q, k, _ in QK_NORMS for name in (q, k)} | {UNIT_QK_NORM}
OUTPUT_GATE = "gate_proj"  # a GQA attention's output gate (AFMoE): o · sigmoid(gate_proj(x)) before o_proj
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
    post: bool = False  # a norm of its branch's output (Gemma's and OLMo2's post-norms), not of its input
    parallel: bool = False  # a block reading the branch before it's normed input, its output added beside (Cohere)


@dataclass(frozen=True)
class Branch:
    """One residual branch of a decoder layer, h + post(block(pre(h))): the names (in a layout) or
    FQNs (in layer_branches) of its norms, None where it has none, around its block's. A parallel
    branch reads the same h and pre-norm as the branch before it and adds its output beside that
    branch's: h + attn(x) + mlp(x), x = pre(h) (Cohere)."""

    pre: str | None
    block: str
    post: str | None
    parallel: bool = False

    @property
    def first(self) -> str:
        """What the residual stream enters."""
        return self.pre or self.block

    @property
    def last(self) -> str:
        """What is added back to the stream."""
        return self.post or self.block


def is_norm(b: Block) -> bool:
    """A norm slot of a decoder: an RMSNorm, or a norm that runs as captured."""
    return b.kind == "rmsnorm" or (b.kind == CAPTURED and b.attrs.get("lifts") == ("rmsnorm",))


def layer_branches(blocks: list[Block]) -> dict[str, tuple[Branch, ...]]:
    """Each decoder layer's FQN -> its branches (the attention's, the feed-forward's) as FQNs, read
    from the block order: a norm before its block, and a post-norm after it."""
    out: dict[str, list[Branch]] = {}
    pre = None
    for b in blocks:
        if b.layer is None:
            continue
        branches = out.setdefault(b.fqn.rsplit(".", 1)[0], [])
        if is_norm(b) and b.post:
            branches[-1] = replace(branches[-1], post=b.fqn)
        elif is_norm(b):
            pre = b.fqn
        elif b.parallel:
            branches.append(Branch(branches[-1].pre, b.fqn, None, parallel=True))
        else:
            branches.append(Branch(pre, b.fqn, None))
            pre = None
    return {layer: tuple(branches) for layer, branches in out.items()}


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


def unit_norm_eps(m: nn.Module) -> float | None:
    """eps if `m` is an RMSNorm without a weight (no parameters, an epsilon, x / rms(x) in fp32 on
    a probe: Llama 4's L2 norm), else None."""
    eps = getattr(m, "variance_epsilon", getattr(m, "eps", None))
    if _children(m) or any(True for _ in m.parameters()) or type(eps) not in (int, float):
        return None
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            got = m(x)
    except Exception:
        return None
    return float(eps) if isinstance(got, torch.Tensor) and torch.allclose(got, unit_rmsnorm(x, float(eps))) else None


def attention_chunk(attn: nn.Module, layer: int) -> int | None:
    """The chunk of Llama 4's chunked attention on the layers its config's layer_types make
    `chunked_attention` (attention_chunk_size), else None."""
    config = getattr(attn, "config", None)
    types, size = getattr(config, "layer_types", None), getattr(config, "attention_chunk_size", None)
    if not isinstance(types, list) or layer >= len(types) or types[layer] != "chunked_attention":
        return None
    if type(size) is not int or size <= 0:
        raise ModelError(f"layer_types[{layer}] is chunked_attention with attention_chunk_size {size!r}; planc "
                         "chunks by a positive number of positions")
    return size


def _temperature(attn: nn.Module) -> tuple[float, float] | None:
    """Llama 4's temperature tuning of its NoPE layers' queries: (floor_scale, attn_scale) where
    attn_temperature_tuning is on and the layer turns no rope, else None."""
    if not getattr(attn, "attn_temperature_tuning", False) or getattr(attn, "use_rope", True):
        return None
    floor_scale, attn_scale = getattr(attn, "floor_scale", None), getattr(attn, "attn_scale", None)
    if type(floor_scale) not in (int, float) or type(attn_scale) not in (int, float) or floor_scale <= 0:
        raise ModelError(f"attn_temperature_tuning with floor_scale {floor_scale!r} and attn_scale {attn_scale!r}: "
                         "planc scales queries by log1p(floor((pos + 1) / floor_scale)) · attn_scale + 1, two numbers")
    return float(floor_scale), float(attn_scale)


ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu2", "relu")  # what planc.ops.act applies


def _act_name(ffn: nn.Module, config) -> str:
    """The block's activation, asked of its own `act_fn` (the MLP's, or the fused experts') on a
    probe: config key names differ across families (hidden_act; Gemma's hidden_activation).
    Its `act_fn` (Phi's: `activation_fn`); without one, the config's name, refused when planc does
    not apply it."""
    fn = next((f for m in (ffn, getattr(ffn, "experts", None)) for name in ("act_fn", "activation_fn")  # Phi: activation_fn
               if callable(f := getattr(m, name, None))), None)
    if fn is None:
        name = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None) or "silu"
        if name not in ACTIVATIONS:
            raise ModelError(f"hidden_act {name!r}: an activation planc does not apply; its mlp applies "
                             f"{', '.join(ACTIVATIONS)}")
        return name
    x = torch.linspace(-6.0, 6.0, 97, dtype=torch.float64)
    try:
        with torch.no_grad():
            y = fn(x)
    except Exception:
        y = None
    for name in ACTIVATIONS:
        if isinstance(y, torch.Tensor) and y.shape == x.shape and torch.allclose(y, act(name, x), rtol=1e-6, atol=1e-9):
            return name
    raise ModelError(f"{type(fn).__name__}: an activation planc does not apply; its mlp applies "
                     f"{', '.join(ACTIVATIONS)}")


def _mla_dims(attn: nn.Module, rope_scaling: float, complex_rope: bool) -> MlaDims | None:
    if not MLA_CHILDREN <= _children(attn) or not all(_is_linear(getattr(attn, c)) for c in ("kv_a_proj_with_mqa", "kv_b_proj")):
        return None
    q_lora = attn.q_a_proj.out_features if getattr(attn, "q_a_proj", None) is not None else 0
    dims = MlaDims(
        num_heads=attn.num_heads, q_lora_rank=q_lora, kv_lora_rank=attn.kv_lora_rank,
        nope_dim=attn.qk_nope_head_dim, rope_dim=attn.qk_rope_head_dim, v_dim=attn.v_head_dim,
        eps=rmsnorm_eps(attn.kv_a_layernorm), scale=float(attn.scaling), rope_scaling=rope_scaling,
        # Rotating pairs as complex numbers (DeepSeek-V2) is the interleaved rotation: it turns
        # x[2i], x[2i+1] by position * inv_freq[i]. Where the rotated pairs are laid out after
        # (interleaved, or de-interleaved as DeepSeek-V3 does) does not change q . k.
        rope_interleave=complex_rope or bool(getattr(attn.config, "rope_interleave", False)),
    )
    # The shapes must agree with the attributes, or the module is something else.
    shapes_agree = (attn.kv_a_proj_with_mqa.out_features == dims.kv_lora_rank + dims.rope_dim
                    and attn.kv_b_proj.out_features == dims.num_heads * (dims.nope_dim + dims.v_dim))
    return dims if shapes_agree else None


def sliding_window(attn: nn.Module, layer: int) -> int | None:
    """The layer's attention window in transformers' conventions: the attention module's own
    `sliding_window` where it has one (None on its full-attention layers: Qwen2/3, Gemma3); else the
    config's `layer_types` entry for the layer; else the config's `sliding_window` (Mistral, Mixtral,
    Starcoder2 apply it to every layer)."""
    if hasattr(attn, "sliding_window"):
        window = attn.sliding_window
    else:
        config = getattr(attn, "config", None)
        types = getattr(config, "layer_types", None)
        window = getattr(config, "sliding_window", None)
        if types is not None and layer < len(types) and types[layer] != "sliding_attention":
            window = None
    longest = getattr(getattr(attn, "config", None), "max_position_embeddings", None)
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return None
    return None if isinstance(longest, int) and window >= longest else window  # a window no sequence reaches


def _gqa_dims(attn: nn.Module, rope_scaling: float, layer: int, rope_width: int | None,
              complex_rope: bool = False) -> GqaDims | None:
    if not GQA_CHILDREN <= _children(attn) or not all(_is_linear(getattr(attn, c)) for c in sorted(GQA_CHILDREN)):
        return None
    head_dim, scaling = getattr(attn, "head_dim", None), getattr(attn, "scaling", None)
    if type(head_dim) is not int or type(scaling) not in (int, float):
        return None  # q/k/v/o projections without the head width and score scale of softmax attention (a delta rule's)
    if attn.v_proj.out_features != attn.k_proj.out_features:  # MiMo-V2-Flash's wider value heads
        raise ModelError(f"v_proj has {attn.v_proj.out_features} outputs and k_proj {attn.k_proj.out_features}: value "
                         f"heads of another width than the {head_dim}-wide key heads; planc's gqa_attention reads "
                         "keys and values of one head width")
    if rope_width is not None and rope_width > head_dim:
        raise ModelError(f"the rotary embedding turns {rope_width} dims of a {head_dim}-wide head")
    names = next(((q, k, after) for q, k, after in QK_NORMS if getattr(attn, q, None) is not None
                  and getattr(attn, k, None) is not None), ("q_norm", "k_norm", False))
    q_norm, k_norm = getattr(attn, names[0], None), getattr(attn, names[1], None)
    qk_norm, eps, qk_offset, weightless = "none", 0.0, 0.0, False
    unit = getattr(attn, UNIT_QK_NORM, None)
    if unit is not None and q_norm is None:
        eps = unit_norm_eps(unit)
        if eps is None:
            raise ModelError(f"{UNIT_QK_NORM} ({type(unit).__name__}) is not an RMSNorm without a weight (x / rms(x)), "
                             "which is the one q/k norm planc's gqa_attention applies to both")
        qk_norm, names, weightless = "head", (UNIT_QK_NORM, UNIT_QK_NORM, True), True
    elif q_norm is not None and k_norm is not None:
        eps = rmsnorm_eps(q_norm)
        if eps is None or rmsnorm_eps(k_norm) != eps:  # a norm without a weight (NanoChat's), or another norm
            raise ModelError(f"{names[0]} ({type(q_norm).__name__}) and {names[1]} are not RMSNorms scaling by a weight "
                             "with one epsilon, which is the q/k norm planc's gqa_attention applies")
        qk_offset = rmsnorm_offset(q_norm, eps)
        if qk_offset is None or rmsnorm_offset(k_norm, eps) != qk_offset:
            raise ModelError(f"{names[0]} ({type(q_norm).__name__}) and {names[1]} scale neither by their weight nor by 1 + "
                             "weight alike, as the q/k norm planc's gqa_attention does")
        widths = (q_norm.weight.shape[0], k_norm.weight.shape[0])
        if widths == (head_dim, head_dim):
            qk_norm = "head"  # Qwen3: each head's q and k normalized on its own (MiniMax-M3: by 1 + weight)
        elif widths == (attn.q_proj.out_features, attn.k_proj.out_features) and qk_offset == 0.0 and not names[2]:
            qk_norm = "full"  # OLMoE: the whole q and k projections normalized before the head split
        else:
            return None
    softcap = getattr(attn, "attn_logit_softcapping", getattr(getattr(attn, "config", None), "attn_logit_softcapping", None))
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap > 0):
        raise ModelError(f"attn_logit_softcapping {softcap!r}: planc caps attention scores by a positive number")
    if getattr(getattr(attn, "config", None), "clip_qkv", None) is not None:
        return None  # OLMoE's optional clamp of q, k, v: not part of the semantic op
    return GqaDims(
        num_heads=attn.q_proj.out_features // head_dim, num_kv_heads=attn.k_proj.out_features // head_dim,
        head_dim=head_dim, eps=eps, scale=float(scaling), rope_scaling=rope_scaling, qk_norm=qk_norm,
        window=sliding_window(attn, layer), rope_dim=_rope_dim(attn, rope_width, head_dim),
        # complex rotations (Llama 4's freqs_cis) turn pairs (x[2i], x[2i+1])
        rope_interleave=complex_rope or rope_interleaved(type(attn), rope_width or head_dim), qk_offset=qk_offset,
        softcap=None if softcap is None else float(softcap), sinks=_sinks(attn, attn.q_proj.out_features // head_dim),
        qk_norm_weightless=weightless, chunk=attention_chunk(attn, layer), temperature=_temperature(attn),
        output_gate=_output_gate(attn),
        **({"qk_norm_names": names[:2], "qk_norm_after_rope": names[2]} if qk_norm == "head" else {}),
    )


def _output_gate(attn: nn.Module) -> bool:
    """Whether the attention gates its heads' output by a projection of its input as wide as q
    (AFMoE's `gate_proj`; the lift's numeric check confirms the sigmoid and where it applies)."""
    gate = getattr(attn, OUTPUT_GATE, None)
    if gate is None:
        return False
    if not _is_linear(gate) or (gate.in_features, gate.out_features) != (attn.q_proj.in_features, attn.q_proj.out_features):
        raise ModelError(f"{OUTPUT_GATE} ({type(gate).__name__}) is not a Linear from the attention's input to q's width "
                         f"({attn.q_proj.in_features} -> {attn.q_proj.out_features}), the output gate planc's "
                         "gqa_attention applies")
    return True


def _sinks(attn: nn.Module, num_heads: int) -> bool:
    """Whether the attention holds one learned sink logit per query head (gpt-oss's `sinks`)."""
    sinks = getattr(attn, "sinks", None)
    if sinks is None:
        return False
    if not isinstance(sinks, torch.Tensor) or tuple(sinks.shape) != (num_heads,):
        raise ModelError(f"sinks of shape {tuple(getattr(sinks, 'shape', ()))}: planc's gqa_attention reads one sink "
                         f"logit per query head ({num_heads},)")
    return True


def _rope_dim(attn: nn.Module, rope_width: int | None, head_dim: int) -> int | None:
    """How much of each head rope turns: None for all of it; 0 on a NoPE layer (SmolLM3, Llama4:
    the attention's `use_rope` is False there; Cohere 2, AFMoE: it says nothing, and its output
    does not depend on the rotation it is handed)."""
    use_rope = getattr(attn, "use_rope", None)
    if isinstance(use_rope, (bool, int)) and not use_rope:  # SmolLM3 stores 0 / 1
        return 0
    if use_rope is None and _skips_rope(attn, rope_width or head_dim):
        return 0
    return rope_width if rope_width not in (None, head_dim) else None


def _skips_rope(attn: nn.Module, width: int) -> bool:
    """Whether the attention's output is the same under two different rotations: asked of it on
    one random input, on its own weights (on random ones where it lives on meta), once per class,
    config, plain attributes (a window, say) and shapes. False where it cannot be asked (the lift's
    numeric check then says what differs)."""
    key = (type(attn), id(getattr(attn, "config", None)), tuple(
        (k, v) for k, v in sorted(vars(attn).items()) if not k.startswith("_") and k != "layer_idx"
        and type(v) in (bool, int, float, str, type(None))), tuple(
        (name, tuple(t.shape)) for name, t in [*attn.named_parameters(), *attn.named_buffers()]), width)
    if key not in _SKIPS_ROPE:
        _SKIPS_ROPE[key] = _same_under_two_rotations(attn, width)
    return _SKIPS_ROPE[key]


_SKIPS_ROPE: dict[tuple, bool] = {}


def _same_under_two_rotations(attn: nn.Module, width: int) -> bool:
    gen = torch.Generator().manual_seed(0)
    tensors = dict([*attn.named_parameters(), *attn.named_buffers()])
    dtype = attn.q_proj.weight.dtype
    if any(t.is_meta for t in tensors.values()):  # random weights, in bf16 to halve what a large model's probe holds
        dtype = torch.bfloat16
        tensors = {name: torch.empty(t.shape, dtype=dtype).uniform_(-0.5, 0.5, generator=gen) if t.is_floating_point()
                   else torch.zeros(t.shape, dtype=t.dtype) for name, t in tensors.items()}
    x = torch.randn(1, 3, attn.q_proj.in_features, generator=gen).to(dtype)
    angles = torch.rand(1, 3, width // 2, generator=gen) * 6.0
    angles = torch.cat([angles, angles], -1).to(dtype)
    outputs = []
    for cos, sin in ((torch.ones_like(angles), torch.zeros_like(angles)), (angles.cos(), angles.sin())):
        try:
            with torch.no_grad():
                out = torch.func.functional_call(attn, tensors, (), {
                    "hidden_states": x, "position_embeddings": (cos, sin), "attention_mask": None})
        except Exception:
            return False
        outputs.append(out[0] if isinstance(out, tuple) else out)
    a, b = outputs
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)


@functools.lru_cache(maxsize=None)
def rope_interleaved(attention_class: type, width: int) -> bool:
    """Whether the attention's rope turns interleaved pairs (GLM, Helium, Cohere): asked of its
    modeling file's `apply_rotary_pos_emb` (transformers' name for it) on one random row, its angles
    laid out either way a rotary embedding hands them out. False without one, or when it answers in
    neither layout (the lift's numeric check then says what differs)."""
    apply = getattr(sys.modules.get(attention_class.__module__), "apply_rotary_pos_emb", None)
    if not callable(apply) or width % 2:
        return False
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, width, generator=gen, dtype=torch.float64)
    angles = torch.rand(1, 1, width // 2, generator=gen, dtype=torch.float64) * 6.0
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    turned = apply_rope(q[0].transpose(0, 1), cos, sin, True).transpose(0, 1)[None]  # [B, S, H, R] layout
    # the angles as most rotary embeddings hand them out (each half), or each one twice in a row (Cohere's)
    for layout in (angles.repeat(1, 1, 2), angles.repeat_interleave(2, -1)):
        try:
            with torch.no_grad():
                got = apply(q, q.clone(), layout.cos(), layout.sin())[0]
        except Exception:
            continue
        if isinstance(got, torch.Tensor) and got.shape == q.shape and torch.allclose(
                torch.cat([got[..., 0::2], got[..., 1::2]], -1), turned):
            return True
    return False


ROUTER_NAMES = ("gate", "router")  # a MoE block's router child (GraniteMoE and gpt-oss: router)


@dataclass(frozen=True)
class MoeParts:
    """What the lift reads of a MoE block: its router, how its experts hold their weights, the
    hidden width and each expert's intermediate width."""

    router: RouterDims
    layout: ExpertsLayout
    hidden: int
    intermediate: int


def _moe_parts(moe: nn.Module) -> MoeParts | None:
    """A MoE block's router (_router_dims) and its fused experts' layout (experts_layout); None
    when the block is not one planc lifts as `moe`."""
    name = next((n for n in ROUTER_NAMES if getattr(moe, n, None) is not None), None)
    gate, experts = getattr(moe, name or "gate", None), getattr(moe, "experts", None)
    path = _logits_path(gate, name)
    if experts is None or path is None or not isinstance(getattr(gate, "top_k", None), int):
        return None
    holder = moe.get_submodule(path)
    found = experts_layout(experts, *holder.weight.shape)
    if found is None:
        return None
    router = _router_dims(gate, holder, path, experts, moe)
    layout, intermediate = found
    return None if router is None else MoeParts(router, layout, holder.weight.shape[1], intermediate)


def _router_dims(gate: nn.Module, holder: nn.Module, path: str, experts: nn.Module, block: nn.Module) -> RouterDims | None:
    """The router's variant, read from the gate's attributes (`holder`: the module holding its
    weight, at `path` under the block).

    DeepSeek-V3 / Kimi-K2: sigmoid scores with a correction bias (e_score_correction_bias).
    DeepSeek-V2: softmax scores, greedy or group-limited greedy selection (topk_method).
    Mixtral, Qwen2-MoE / Qwen3-MoE, OLMoE: softmax top-k, renormalized when norm_topk_prob
    says so (Mixtral has no such switch: always). GraniteMoE and gpt-oss (a router named
    `router`; gpt-oss's with a bias): the softmax of the top-k logits, which is the renormalized
    softmax top-k; HunYuan-MoE's weight in its one Linear child (`gate.wg`); whether the weights
    come back in the model dtype is asked of the router.
    """
    num_experts = holder.weight.shape[0]
    bias = getattr(holder, "bias", None)
    common = {"num_experts": num_experts, "top_k": gate.top_k, "module": path,
              "bias": isinstance(bias, torch.Tensor) and tuple(bias.shape) == (num_experts,)}
    if hasattr(holder, "e_score_correction_bias"):  # MiniMax-M2, HY-V3 and AFMoE name no groups, always renormalize
        # AFMoE: route_scale; MiniMax-M3 scales the experts' sum in the block
        scaling = next((getattr(m, n) for m in (gate, block) for n in ("routed_scaling_factor", "router_scaling_factor",
                                                                        "route_scale") if hasattr(m, n)), 1.0)
        return RouterDims(**common, scoring="sigmoid", num_groups=getattr(gate, "num_group", 1),
                          topk_groups=getattr(gate, "topk_group", 1), group_score="top2_sum", correction_bias=True,
                          normalize=bool(getattr(gate, "norm_topk_prob", True)), scaling=float(scaling), fp32_logits=True)
    if hasattr(gate, "topk_method"):
        if gate.topk_method not in ("greedy", "group_limited_greedy"):
            return None
        grouped = gate.topk_method == "group_limited_greedy"
        return RouterDims(**common, num_groups=gate.num_group if grouped else 1,
                          topk_groups=gate.topk_group if grouped else 1, group_score="max",
                          scaling=float(gate.routed_scaling_factor), fp32_logits=True)
    if hasattr(gate, "norm_topk_prob"):
        return RouterDims(**common, normalize=bool(gate.norm_topk_prob), weights_in_model_dtype=True)
    # logits in fp32 where the router keeps an fp32 weight in a narrower model (HunYuan's wg)
    fp32 = holder.weight.dtype == torch.float32 and experts.gate_up_proj.dtype != torch.float32
    return _probed_top_k(gate, RouterDims(**common, normalize=True, fp32_logits=fp32), experts.gate_up_proj.dtype)


def _logits_path(gate: nn.Module | None, name: str | None) -> str | None:
    """Where the router's logits GEMM weight [E, D] lives under the MoE block: the router itself
    (`gate`, `router`), or its one Linear child (HunYuan's `gate.wg`); None when neither."""
    if gate is None or name is None:
        return None
    weight = getattr(gate, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return name
    children = [(n, c) for n, c in gate.named_children() if c is not None]
    if len(children) == 1 and _is_linear(children[0][1]):
        return f"{name}.{children[0][0]}"
    return None


def _probed_top_k(gate: nn.Module, dims: RouterDims, model_dtype: torch.dtype) -> RouterDims | None:
    """A router with no attribute naming its variant (Mixtral, GraniteMoE, gpt-oss, HunYuan, Llama 4),
    asked on a probe: a copy of it holding random fp32 weights of its shapes (so a model on meta
    answers too) must choose the experts and weights `dims` does (the softmax of the top-k logits),
    or those of the sigmoid of each top-k logit, not renormalized (Llama 4's); else None (PhiMoE's
    sparsemixer: the block runs as captured). Whether it hands the k
    weights back narrower than fp32 (in a bf16 model GraniteMoE and gpt-oss do, Mixtral does not)
    is asked of it in its own dtype."""
    child = dims.module.partition(".")[2]  # "" for the router itself, "wg" for HunYuan's
    holder = gate.get_submodule(child)
    num_experts, hidden = holder.weight.shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, hidden, generator=g)
    W = {"weight": torch.randn(num_experts, hidden, generator=g) / hidden ** 0.5}
    if dims.bias:
        W["bias"] = torch.randn(num_experts, generator=g)
    theirs = _probe(gate, child, W, x, num_experts)
    if theirs is None or not bool(((theirs != 0).sum(-1) == dims.top_k).all()):
        return None
    # the softmax of the top-k logits (renormalized softmax top-k), or the sigmoid of each (Llama 4's)
    found = next((d for d in (dims, replace(dims, scoring="sigmoid", normalize=False))
                  if torch.allclose(theirs.float(), _routing(*Ops().moe_route(x, W, d), num_experts), rtol=1e-4,
                                    atol=1e-6)), None)
    if found is None:
        return None
    native = _probe(gate, child, {k: v.to(holder.weight.dtype) for k, v in W.items()}, x.to(model_dtype), num_experts)
    narrowed = native is not None and native.is_floating_point() and native.dtype != torch.float32
    return replace(found, weights_in_model_dtype=narrowed)


def _probe(gate: nn.Module, child: str, W: dict[str, torch.Tensor], x: torch.Tensor, num_experts: int
           ) -> torch.Tensor | None:
    """gate's forward on x with the tensors of its part `child` ("" for itself) replaced by W
    (shallow copies; the model is untouched), as each token's weight per expert [N, E] in the
    dtype the router hands them back: from (logits, weights [N, k], experts [N, k]) (Mixtral,
    GraniteMoE, gpt-oss), or from (scores [N, E], logits [N, E]), zero where a token does not go
    (Llama 4's); None for anything else."""
    holder = copy.copy(gate.get_submodule(child))
    holder._parameters = {**holder._parameters, **{k: nn.Parameter(v, requires_grad=False) for k, v in W.items()}}
    holder._buffers = dict(holder._buffers)
    probe = holder
    if child:
        probe = copy.copy(gate)
        probe._modules = {**gate._modules, child: holder}
    try:
        with torch.no_grad():
            out = probe(x)
    except Exception:
        return None
    if not isinstance(out, tuple) or not all(isinstance(t, torch.Tensor) for t in out):
        return None
    if len(out) == 3 and out[2].dtype in (torch.int64, torch.int32) and out[1].shape == out[2].shape:
        weights = out[1] if out[1].is_floating_point() else out[1].float()
        return torch.zeros(out[2].shape[0], num_experts, dtype=weights.dtype).scatter_(1, out[2].long(), weights)
    if len(out) == 2 and out[0].shape == (x.shape[0], num_experts) and out[0].is_floating_point():
        return out[0]
    return None


def _routing(idx_NK: torch.Tensor, w_NK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[N, E]: each token's weight per expert (0 for the experts it does not go to)."""
    return torch.zeros(idx_NK.shape[0], num_experts).scatter_(1, idx_NK.long(), w_NK.float())


def experts_layout(experts: nn.Module, num_experts: int, hidden: int) -> tuple[ExpertsLayout, int] | None:
    """How fused experts hold their weights (ExpertsLayout) and each one's intermediate width, read
    from their shapes and attributes; None when they are not fused experts planc reads.

    gate_up_proj [E, 2I, D] with down_proj [E, D, I] is the common layout; [E, D, 2I] with
    [E, I, D] is transposed, gpt-oss's, whose gate and up columns alternate (Aria's hold them as
    halves: _experts_packing asks the experts which, once the activation is known). The lift's numeric
    check confirms the packing on real weights (a model that packs otherwise is declined there,
    not compiled into another model). Biases: gate_up_proj_bias [E, 2I] and down_proj_bias [E, D],
    both or neither. A clamp (`limit`, with `alpha`) is gpt-oss's clamped GLU."""
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == down.dim() == 3
            and gate_up.shape[0] == down.shape[0] == num_experts):
        return None
    if gate_up.shape[2] == down.shape[1] == hidden and gate_up.shape[1] == 2 * down.shape[2]:
        transposed, intermediate = False, down.shape[2]
    elif gate_up.shape[1] == down.shape[2] == hidden and gate_up.shape[2] == 2 * down.shape[1]:
        transposed, intermediate = True, down.shape[1]
    else:
        return None
    biases = [getattr(experts, name, None) for name in ("gate_up_proj_bias", "down_proj_bias")]
    if any(b is not None for b in biases):
        if [tuple(getattr(b, "shape", ())) for b in biases] != [(num_experts, 2 * intermediate), (num_experts, hidden)]:
            return None
    clamp = glu_clamp(experts)
    if clamp is False:
        return None
    limit, alpha = clamp or (None, 1.0)
    return ExpertsLayout(transposed=transposed, interleaved=transposed, bias=biases[0] is not None,
                         limit=limit, alpha=alpha), intermediate


def glu_clamp(m: nn.Module) -> tuple[float, float] | None | bool:
    """(limit, alpha) of a clamped GLU, read from the module's attributes (gpt-oss's experts: limit,
    alpha; MiniMax-M3's: swiglu_limit, swiglu_alpha); None when it names no limit, False when it
    names one that is not a number."""
    limit = next((getattr(m, n) for n in ("limit", "swiglu_limit") if getattr(m, n, None) is not None), None)
    if limit is None:
        return None
    alpha = next((getattr(m, n) for n in ("alpha", "swiglu_alpha") if hasattr(m, n)), 1.0)
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (limit, alpha))
    return (float(limit), float(alpha)) if numbers else False


def _experts_packing(experts: nn.Module, layout: ExpertsLayout, act_name: str) -> ExpertsLayout:
    """_probe_packing, once per experts class, shapes, activation and layout (every MoE layer of a
    model asks the same)."""
    key = (type(experts), tuple((n, tuple(t.shape)) for n, t in experts.named_parameters()), act_name, layout)
    if key not in _PACKINGS:
        _PACKINGS[key] = _probe_packing(experts, layout, act_name)
    return _PACKINGS[key]


_PACKINGS: dict[tuple, ExpertsLayout] = {}


def _probe_packing(experts: nn.Module, layout: ExpertsLayout, act_name: str) -> ExpertsLayout:
    """Transposed experts hold gate and up as the two halves of gate_up_proj's columns (Aria) or as
    alternating columns (gpt-oss): asked of the experts on a probe holding random weights of their
    shapes (so a model on meta answers too; one expert's, seen by every expert, so a large model's
    probe holds one expert), both tokens sent to expert 0 with weight 1. `layout` as read from the
    shapes where the probe cannot run or neither packing answers (the lift's numeric check then
    says what differs)."""
    gen = torch.Generator().manual_seed(0)
    W = {name: (torch.randn((1, *t.shape[1:]), generator=gen) * 0.3).expand(t.shape)
         for name, t in experts.named_parameters()}
    num_experts = W["gate_up_proj"].shape[0]
    x = torch.randn(2, W["gate_up_proj"].shape[1], generator=gen)
    theirs, every_token = _run_experts(experts, W, x), False
    if theirs is None:
        theirs, every_token = _run_experts(experts, W, x, every_token=True), True
    if theirs is None:
        return layout
    to_first = torch.zeros(2, num_experts)
    to_first[:, 0] = 1.0
    for interleaved in (layout.interleaved, not layout.interleaved):
        candidate = replace(layout, interleaved=interleaved, scaled_inputs=every_token)
        ours = Ops().moe_experts(x, to_first, W, act_name, candidate)
        if isinstance(theirs, torch.Tensor) and theirs.shape == ours.shape and torch.allclose(theirs, ours, rtol=1e-4, atol=1e-5):
            return candidate
    return layout


def _run_experts(experts: nn.Module, W: dict[str, torch.Tensor], x: torch.Tensor, every_token: bool = False
                 ) -> torch.Tensor | None:
    """Expert 0 on the rows of x, as the experts compute it, where they take the rows with their
    experts and weights (x, experts [N, 1], weights [N, 1]); with `every_token`, where they take the
    hidden states alone, every expert on every row (Llama 4's: the block scales each expert's input
    rows by its router weight, zero where a token does not go); None where they run neither way."""
    try:
        with torch.no_grad():
            if not every_token:
                return torch.func.functional_call(experts, W, (x, torch.zeros(x.shape[0], 1, dtype=torch.long),
                                                               torch.ones(x.shape[0], 1)))
            num_experts = W["gate_up_proj"].shape[0]
            out = torch.func.functional_call(experts, W, (x.repeat(num_experts, 1),))
            return out.view(num_experts, x.shape[0], -1)[0]
    except Exception:
        return None


def _shared_expert(moe: nn.Module) -> tuple[str | None, str | None]:
    """(the shared expert MLP's child name, the name of its sigmoid gate) of a MoE block."""
    shared = next((n for n in ("shared_experts", "shared_expert", "shared_mlp") if _is_mlp(getattr(moe, n, None))), None)
    gate = getattr(moe, "shared_expert_gate", None)
    has_gate = shared is not None and _is_linear(gate) and gate.out_features == 1
    return shared, "shared_expert_gate" if has_gate else None


def _is_mlp(m: nn.Module | None, gated: bool = True) -> bool:
    """gate/up/down linears (up/down without a gate) and no other weights (BitNet's ffn_sub_norm
    makes another block: captured)."""
    names = MLP_CHILDREN if gated else PLAIN_MLP_CHILDREN
    return (m is not None and names <= _children(m) and all(_is_linear(getattr(m, c)) for c in sorted(names))
            and not unread_weights(m, names))


def unread_weights(m: nn.Module, read: frozenset[str]) -> list[str]:
    """m's own parameters and the children holding parameters that a semantic op reading `read`
    would leave out (a fused linear the lift split is read through its parts)."""
    own = [name for name, _ in m.named_parameters(recurse=False) if name not in read]
    return own + sorted(name for name, child in m.named_children()
                        if child is not None and name not in read and not getattr(child, SPLIT, None)
                        and next(child.parameters(), None) is not None)


def _refuse_unread(m: nn.Module, fqn: str, kind: str, read: frozenset[str], then: str) -> None:
    """ModelError naming the weights of `m` that planc's `kind` op, reading `read`, would leave out
    (`then`: what the message goes on to say); nothing when there are none."""
    unread = unread_weights(m, read)
    if unread:
        raise ModelError(f"{fqn} ({type(m).__name__}): {', '.join(unread)} {'holds' if len(unread) == 1 else 'hold'} "
                         f"weights that planc's {kind} does not read{then}")


def _attention_block(attn: nn.Module, fqn: str, layer: int, rope: Rope) -> Block:
    mla = _mla_dims(attn, rope.scaling, rope.complex)
    if mla is not None and sliding_window(attn, layer) is not None:
        raise ModelError(f"{fqn} ({type(attn).__name__}): MLA with a sliding window; planc's MLA attends to every "
                         "cached key")
    try:
        gqa = None if mla is not None else _gqa_dims(attn, rope.scaling, layer, rope.width, rope.complex)
    except ModelError as exc:
        raise ModelError(f"{fqn} ({type(attn).__name__}): {exc}") from None
    gqa_reads = GQA_READS | ({"sinks"} if gqa is not None and gqa.sinks else set()) | (
        {OUTPUT_GATE} if gqa is not None and gqa.output_gate else set())
    for kind, dims, read in (("mla_attention", mla, MLA_READS), ("gqa_attention", gqa, gqa_reads)):
        if dims is not None:
            # a sub-norm before o_proj (BitNet): another op
            _refuse_unread(attn, fqn, kind, read, f" (it reads {', '.join(sorted(read & _children(attn)))}); "
                                                  "planc lifts attention made of those alone")
            return Block(kind, fqn, type(attn).__name__, layer, dims)
    raise ModelError(f"{fqn} ({type(attn).__name__}): not a recognized attention block; planc lifts MLA "
                     f"(children {', '.join(sorted(MLA_CHILDREN))}) and GQA (children {', '.join(sorted(GQA_CHILDREN))})")


def _ffn_block(ffn: nn.Module, fqn: str, layer: int, config) -> Block:
    moe = _moe_parts(ffn)
    if moe is not None:
        shared, shared_gate = _shared_expert(ffn)
        # a norm on the block's output (A.X-K1's post_mlp_layernorm): another op, run as captured
        name = moe.router.module.split(".")[0]
        held = _held_router_bias(ffn) if moe.router.correction_bias else None  # the router reads it (router_bias_on_gate)
        _refuse_unread(ffn, fqn, "moe", frozenset({name, "experts", shared, shared_gate, held} - {None}),
                       f" (it reads the {name}, the experts and a shared expert MLP)")
        act = CLAMPED_GLU if moe.layout.limit is not None else _act_name(ffn, config)
        layout = _experts_packing(ffn.experts, moe.layout, act) if moe.layout.transposed else moe.layout
        return Block("moe", fqn, type(ffn).__name__, layer, moe.router,
                     {"act": act, "shared": shared, "shared_gate": shared_gate, "layout": layout,
                      "hidden": moe.hidden, "intermediate": moe.intermediate})
    if _is_mlp(ffn):
        clamp = glu_clamp(ffn)  # MiniMax-M3's dense MLP: the clamped GLU of its experts
        act = {"act": CLAMPED_GLU, "limit": clamp[0], "alpha": clamp[1]} if clamp else {"act": _act_name(ffn, config)}
        return Block("mlp", fqn, type(ffn).__name__, layer, None, {**act, "intermediate": ffn.gate_proj.out_features})
    act = _act_name(ffn, config)
    if _is_mlp(ffn, gated=False):  # Arcee's up/down MLP: down(act(up(x)))
        return Block("mlp", fqn, type(ffn).__name__, layer, None,
                     {"act": act, "intermediate": ffn.up_proj.out_features, "gated": False})
    raise ModelError(f"{fqn} ({type(ffn).__name__}): not a recognized feed-forward block; planc lifts MLPs "
                     f"({', '.join(sorted(MLP_CHILDREN))}, or {' and '.join(sorted(PLAIN_MLP_CHILDREN))} alone) and MoE blocks with a top-k router (`gate` or `router`: "
                     "weight [E, D], top_k) over fused experts (`experts`: gate_up_proj [E, 2I, D] and down_proj "
                     "[E, D, I], or both transposed), optionally with a shared expert MLP")


def _norm_block(m: nn.Module, fqn: str, layer: int | None) -> Block:
    eps = rmsnorm_eps(m)
    offset = None if eps is None else rmsnorm_offset(m, eps)
    if offset is None:
        raise ModelError(f"{fqn} ({type(m).__name__}): not a recognized norm; planc lifts RMSNorm (a 1-D weight, an "
                         "epsilon, no bias; scaling by the weight or by 1 + weight)")
    return Block("rmsnorm", fqn, type(m).__name__, layer, None, {"eps": eps, "offset": offset})


_OFFSETS: dict[type, float | None] = {}


def rmsnorm_offset(m: nn.Module, eps: float) -> float | None:
    """0.0 when the norm computes x̂ · w, 1.0 for x̂ · (1 + w) (Gemma's zero-centred weight), None
    for anything else: asked of a CPU copy of the module whose weight is set to 0.5, so it answers
    the same on meta, and once per class (a module with its own forward or hooks is asked itself)."""
    own = "forward" in vars(m) or m._forward_hooks or m._forward_pre_hooks
    if not own and type(m) in _OFFSETS:
        return _OFFSETS[type(m)]
    found = None
    try:
        probe = copy.deepcopy(m).to_empty(device="cpu").float()
        with torch.no_grad():
            probe.weight.fill_(0.5)
            x = torch.randn(2, 3, probe.weight.shape[0], generator=torch.Generator().manual_seed(0))
            y = probe(x)
            x_hat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        for offset in (0.0, 1.0):
            if isinstance(y, torch.Tensor) and y.shape == x.shape and torch.allclose(y, x_hat * (offset + 0.5), rtol=1e-5, atol=1e-6):
                found = offset
                break
    except Exception:  # a norm that cannot be copied or run alone: not one planc reproduces
        found = None
    if not own:
        _OFFSETS[type(m)] = found
    return found


def _embedding_scale(emb: nn.Module) -> Scale | None:
    """The constant a scaled word embedding multiplies its rows by (Gemma: √hidden, in the weights'
    dtype); None for a plain one."""
    scale = getattr(emb, "embed_scale", None)
    weight = getattr(emb, "weight", None)
    if scale is None or weight is None:
        return None
    if isinstance(scale, torch.Tensor) and scale.is_meta:
        scale = getattr(emb, "scalar_embed_scale", None)  # the same constant as a number, where meta holds no value
        if scale is None:
            raise ModelError(f"{type(emb).__name__}: its embed_scale lives on the meta device, with no value to read")
    value = float(torch.as_tensor(scale, dtype=torch.float64).to(weight.dtype))
    return None if value == 1.0 else Scale("mul", value)


FINAL_NORMS = ("norm", "final_layernorm")  # the decoder's last norm (Phi: final_layernorm)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layers (model.model.layers), once the model is laid out as planc lifts."""
    return _decoder(model)[1].layers


def _decoder(model: nn.Module) -> tuple[str, nn.Module, str]:
    """(the decoder's FQN, the decoder, the name of its final norm)."""
    base = getattr(model, "model", None)
    norm = next((n for n in FINAL_NORMS if isinstance(getattr(base, n, None), nn.Module)), None)
    if (base is None or norm is None or not all(hasattr(base, n) for n in ("embed_tokens", "layers"))
            or not isinstance(getattr(model, "lm_head", None), nn.Linear)):
        raise ModelError(f"{type(model).__name__}: not a decoder LM laid out as model.embed_tokens / model.layers / "
                         "model.norm / lm_head; planc lifts Hugging Face-style causal LMs")
    return "model", base, norm


@dataclass(frozen=True)
class Rope:
    """The model's one rotary embedding (model.rotary_emb): its attention scaling, whether it hands
    out complex rotations, and how many dims of a head it turns (2 × len(inv_freq); None without one)."""

    scaling: float
    complex: bool
    width: int | None


def _rope(base: nn.Module) -> Rope:
    rotary = getattr(base, "rotary_emb", None)
    others = sorted(name for name, child in base.named_children() if "rotary" in name and child is not rotary)
    if others:  # Gemma3's local and global rotations: one per layer type
        raise ModelError(f"{type(base).__name__}: {len(others) + 1} rotary embeddings (rotary_emb, {', '.join(others)}); "
                         "planc lifts models with one rotary embedding shared by every layer")
    inv_freq = getattr(rotary, "inv_freq", None)
    width = 2 * inv_freq.numel() if isinstance(inv_freq, torch.Tensor) else None
    return Rope(float(getattr(rotary, "attention_scaling", 1.0)), _complex_rope(rotary), width)


def long_rope(model: nn.Module) -> None:
    """A rope whose frequencies depend on the sequence length, made static for planc: longrope
    (Phi-3's 128K variants, Phi-3.5, Phi-4-mini) turns by its short factors up to the original
    context and by its long ones from there, per forward (overwriting inv_freq with the set it
    used). Both sets (the long one computed as transformers does when a sequence first passes the
    original context) and that position become buffers of the rotary embedding, which
    planc.ops.rope_inv_freq chooses between per step."""
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type == "dynamic":
        raise ModelError(f"{type(rotary).__name__}: rope_type 'dynamic' rescales the rotary frequencies at every "
                         "sequence length past max_position_embeddings, which planc does not compile; use the "
                         "checkpoint with a static rope (default, linear, yarn, llama3) or longrope")
    if rope_type != "longrope" or "long_after" in dict(rotary.named_buffers(recurse=False)):
        return
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = rotary.config
    params = getattr(config, "rope_parameters", None) or {}
    original = params.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings")
    short_inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu")
    long_inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len=original + 1)
    device, dtype = rotary.inv_freq.device, rotary.inv_freq.dtype
    touch(rotary)
    if "long_inv_freq" in vars(rotary):  # transformers' own copy, a plain attribute
        delattr(rotary, "long_inv_freq")
    rotary.register_buffer("short_inv_freq", short_inv_freq.to(device, dtype), persistent=False)
    rotary.register_buffer("long_inv_freq", long_inv_freq.to(device, dtype), persistent=False)
    rotary.register_buffer("long_after", torch.tensor(original, device=device), persistent=False)


def router_bias_on_gate(model: nn.Module) -> None:
    """A correction bias the MoE block holds and hands to its router's forward (MiniMax-M2, HY-V3:
    `e_score_correction_bias`; AFMoE: `expert_bias`, to its `router`) also becomes a buffer of the
    router named as DeepSeek-V3's gate holds its own, where planc's router reads it: the same tensor."""
    for layer in getattr(getattr(model, "model", None), "layers", None) or ():
        moe = getattr(layer, "mlp", None)
        router = next((n for n in ROUTER_NAMES if getattr(moe, n, None) is not None), None)
        path, name = _logits_path(getattr(moe, router) if router else None, router), _held_router_bias(moe)
        if path is None or name is None:
            continue
        gate, holder = getattr(moe, router), moe.get_submodule(path)  # holder: AFMoE's router.gate
        if hasattr(gate, "e_score_correction_bias") or hasattr(holder, "e_score_correction_bias"):
            continue
        if name in inspect.signature(gate.forward).parameters:
            touch(holder).register_buffer("e_score_correction_bias", getattr(moe, name).detach(), persistent=False)


ROUTER_BIASES = ("e_score_correction_bias", "expert_bias")  # a correction bias the MoE block holds


def _held_router_bias(moe: nn.Module | None) -> str | None:
    """The name of the correction bias the MoE block holds for its router, if it holds one."""
    return next((n for n in ROUTER_BIASES if isinstance(getattr(moe, n, None), torch.Tensor)), None)


class LayerRope(nn.Module):
    """One layer's rotary frequencies, attached to its attention as `rotary` (what planc's ops read
    as `rotary.inv_freq`) where the model's rotary embedding holds one set per layer type."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_scaling = attention_scaling


def rope_per_layer_type(model: nn.Module) -> None:
    """A rotary embedding with one set of frequencies per layer type (Mellum, OLMo3: `<type>_inv_freq`,
    a full-attention theta and a sliding-window one) made one rope per layer: each layer's attention
    gets a LayerRope child holding its type's frequencies and scaling (the model's own tensors)."""
    base = getattr(model, "model", None)
    rotary = getattr(base, "rotary_emb", None)
    types = getattr(getattr(model, "config", None), "layer_types", None)
    if rotary is None or isinstance(getattr(rotary, "inv_freq", None), torch.Tensor) or not isinstance(types, list):
        return
    buffers = dict(rotary.named_buffers(recurse=False))
    if not any(name.endswith("_inv_freq") for name in buffers):
        return
    kinds = getattr(rotary, "rope_type", None)
    for i, layer in enumerate(base.layers):
        attn = getattr(layer, "self_attn", None)
        if not isinstance(attn, nn.Module) or i >= len(types):
            continue  # not a layer planc lifts (ModernBERT's decoder names it `attn`): recognition says so
        kind = kinds.get(types[i], "default") if isinstance(kinds, dict) else "default"
        inv_freq = buffers.get(f"{types[i]}_inv_freq")
        where = f"{type(rotary).__name__} (model.rotary_emb)"
        if inv_freq is None:
            raise ModelError(f"{where}: layer {i} is a {types[i]!r} layer and the rotary embedding holds no "
                             f"{types[i]}_inv_freq (it holds {', '.join(sorted(buffers))}); planc needs every "
                             "layer's rotary frequencies")
        if kind in ("dynamic", "longrope"):
            raise ModelError(f"{where}: the {types[i]!r} layers' rope_type {kind!r} changes the frequencies with the "
                             "sequence length, which planc does not compile per layer type; use a static rope "
                             "(default, linear, yarn, llama3)")
        held = getattr(attn, "rotary", None)
        if held is not None and not isinstance(held, LayerRope):
            raise ModelError(f"model.layers.{i}.self_attn ({type(attn).__name__}): has a child named "
                             "rotary already, where planc would attach the layer's rope frequencies")
        touch(attn).rotary = LayerRope(inv_freq, float(getattr(rotary, f"{types[i]}_attention_scaling", 1.0)))


def _layer_rope(attn: nn.Module, rope: Rope) -> Rope:
    """The rope of one layer: its LayerRope where rope_per_layer_type attached one, else the model's."""
    held = getattr(attn, "rotary", None)
    if not isinstance(held, LayerRope):
        return rope
    return Rope(held.attention_scaling, False, 2 * held.inv_freq.numel())


# The layer layouts planc lifts, as (attention branch, feed-forward branch). Pre-norm (Llama and
# most): a norm before each block, under either of the names it goes by (Apertus:
# attention_layernorm, feedforward_layernorm). Sandwich (Gemma 2 and 3): norms before and after
# both. Post-norm (OLMo 2 and 3): a norm after each block, none before. Parallel (Cohere): one norm
# read by both blocks, both outputs added to h. The feed-forward block of a pre-norm layer is `mlp`,
# `block_sparse_moe` (GraniteMoE, older MoE checkpoints) or `feed_forward` (Llama 4).
LAYOUTS = (
    *((Branch(pre_attention, "self_attn", None), Branch(pre_mlp, ffn, None))
      for pre_attention in ("input_layernorm", "attention_layernorm")
      for pre_mlp in ("post_attention_layernorm", "feedforward_layernorm", "pre_feedforward_layernorm")  # Apertus; VaultGemma
      for ffn in ("mlp", "block_sparse_moe", "feed_forward")),  # Llama 4: feed_forward
    *((Branch("input_layernorm", "self_attn", post_attention), Branch(pre_mlp, "mlp", post_mlp))
      for post_attention, pre_mlp, post_mlp in (
          ("post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),  # Gemma 2/3
          ("post_attention_layernorm", "pre_mlp_layernorm", "post_mlp_layernorm"),  # AFMoE
          ("post_self_attn_layernorm", "post_attention_layernorm", "post_mlp_layernorm"),  # GLM-4
          ("post_norm1", "post_attention_layernorm", "post_norm2"))),  # HyperCLOVA X (use_post_norm)
    (Branch(None, "self_attn", "post_attention_layernorm"), Branch(None, "mlp", "post_feedforward_layernorm")),
    (Branch("input_layernorm", "self_attn", None), Branch("input_layernorm", "mlp", None, parallel=True)),
)
LAYOUT_TEXT = ("h + self_attn(input_layernorm(h)), then + mlp(post_attention_layernorm(.)) (pre-norm); "
               "h + post_attention_layernorm(self_attn(input_layernorm(h))), then + post_feedforward_layernorm("
               "mlp(pre_feedforward_layernorm(.))) (sandwich); h + post_attention_layernorm(self_attn(h)), then "
               "+ post_feedforward_layernorm(mlp(.)) (post-norm); or h + self_attn(x) + mlp(x), x = "
               "input_layernorm(h) (parallel)")


def _layer_layout(layer: nn.Module, fqn: str) -> tuple[Branch, Branch]:
    """The layout (LAYOUTS) whose names are exactly the layer's children (dropouts and identities
    aside). Names say which norm is where; the lift's residual and junction checks confirm that
    the layer computes what they say."""
    children = {c for c in _children(layer) if not isinstance(getattr(layer, c), (nn.Dropout, nn.Identity))}
    for layout in LAYOUTS:
        if {name for b in layout for name in (b.pre, b.block, b.post) if name} == children:
            return layout
    raise ModelError(f"{fqn} ({type(layer).__name__}): children {', '.join(sorted(children))} are not a decoder "
                     f"layer layout planc lifts; it lifts layers computing {LAYOUT_TEXT}")


def _complex_rope(rotary: nn.Module | None) -> bool:
    """Whether the model's rotary embedding hands out complex rotations (DeepSeek-V2) rather than
    (cos, sin): asked of the module itself, on one position."""
    inv_freq = getattr(rotary, "inv_freq", None)
    if not isinstance(inv_freq, torch.Tensor):
        return False
    try:
        with torch.no_grad():
            out = rotary(inv_freq.new_zeros(1, 1, 1), torch.zeros(1, 1, dtype=torch.long, device=inv_freq.device))
    except Exception as exc:  # the model's own rope code, failing on its config (sections that do not fit the width)
        raise ModelError(f"{type(rotary).__name__}: the model's rotary embedding fails on one position "
                         f"({type(exc).__name__}: {one_line(exc)}); its config's rope values do not fit each other "
                         "(transformers' forward would fail alike)") from exc
    return isinstance(out, torch.Tensor) and out.is_complex()


def _ffn_or_captured(ffn: nn.Module, fqn: str, layer: int, config) -> Block:
    """A feed-forward block planc does not recognize runs as captured (planc.lift.captured)."""
    try:
        return _ffn_block(ffn, fqn, layer, config)
    except ModelError as exc:
        why = str(exc).removeprefix(f"{fqn} ({type(ffn).__name__}): ")
        return Block(CAPTURED, fqn, type(ffn).__name__, layer, None, {"why": why, "lifts": FFN_KINDS})


def _norm_or_captured(m: nn.Module, fqn: str, layer: int | None) -> Block:
    """A norm that is not an RMSNorm (a LayerNorm with bias, say) runs as captured."""
    try:
        return _norm_block(m, fqn, layer)
    except ModelError as exc:
        why = str(exc).removeprefix(f"{fqn} ({type(m).__name__}): ")
        return Block(CAPTURED, fqn, type(m).__name__, layer, None, {"why": why, "lifts": ("rmsnorm",)})


def _stateful_block(attn: nn.Module, fqn: str, layer: int, rope: Rope) -> Block:
    """An attention block planc does not recognize is an error: it cannot run as captured."""
    try:
        return _attention_block(attn, fqn, layer, rope)
    except ModelError as exc:
        raise ModelError(f"{exc}. It cannot run as captured either: attention keeps a KV cache from prefill to "
                         "each decode step, and a captured graph of one forward has no cache to carry") from exc


def recognize(model: nn.Module, same: dict[int, int] | None = None) -> list[Block]:
    """The blocks of a decoder LM, in execution order; an unrecognized feed-forward block or norm
    is a `captured` block (run as its exported graph, replicated).

    same: layer -> an earlier layer of the same structure (planc.lift.structure.representatives),
    whose blocks it takes, moved to its own FQNs, rather than being recognized again."""
    prefix, base, final_norm = _decoder(model)
    rope = _rope(base)
    blocks = [Block("embedding", f"{prefix}.embed_tokens", type(base.embed_tokens).__name__, None, None,
                    {"scale": _embedding_scale(base.embed_tokens)})]
    own: dict[int, list[Block]] = {}  # a recognized layer's blocks
    for i, layer in enumerate(base.layers):
        lp = f"{prefix}.layers.{i}"
        j = (same or {}).get(i, i)
        if j != i:
            cut = len(f"{prefix}.layers.{j}")
            blocks += [replace(b, fqn=lp + b.fqn[cut:], layer=i) for b in own[j]]
            continue
        start = len(blocks)
        attention, mlp = _layer_layout(layer, lp)
        cores = (_stateful_block(layer.self_attn, f"{lp}.self_attn", i, _layer_rope(layer.self_attn, rope)),
                 _ffn_or_captured(getattr(layer, mlp.block), f"{lp}.{mlp.block}", i, model.config))
        for branch, core in zip((attention, mlp), cores):
            if branch.parallel:  # its norm is the branch before's
                core = replace(core, parallel=True)
            elif branch.pre:
                blocks.append(_norm_or_captured(getattr(layer, branch.pre), f"{lp}.{branch.pre}", i))
            blocks.append(core)
            if branch.post:
                blocks.append(replace(_norm_or_captured(getattr(layer, branch.post), f"{lp}.{branch.post}", i), post=True))
        own[i] = blocks[start:]
    blocks.append(_norm_or_captured(getattr(base, final_norm), f"{prefix}.{final_norm}", None))
    blocks.append(Block("lm_head", "lm_head", "Linear", None, None, {"vocab": model.lm_head.out_features}))
    return blocks

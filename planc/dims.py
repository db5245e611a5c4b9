"""The static shape facts a semantic op needs, read from the model at lift time.

They are printed verbatim into the generated program (`repr` is valid Python), so a reader sees
every number a rank uses.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from planc.lazy import lazy

torch = lazy("torch")


class _Dtypes(Mapping):
    """Plan and manifest dtype names -> torch dtypes (torch is imported at the first lookup)."""

    NAMES = ("float32", "float64", "bfloat16", "float16")

    def __getitem__(self, name: str) -> torch.dtype:
        if name not in self.NAMES:
            raise KeyError(name)
        return getattr(torch, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.NAMES)

    def __len__(self) -> int:
        return len(self.NAMES)


DTYPES = _Dtypes()


@dataclass(frozen=True)
class MlaDims:
    num_heads: int  # heads on this rank (all heads before partitioning)
    q_lora_rank: int  # 0 when q is a single projection
    kv_lora_rank: int
    nope_dim: int
    rope_dim: int
    v_dim: int
    eps: float
    scale: float
    rope_scaling: float
    rope_interleave: bool

    def local(self, num_heads: int) -> "MlaDims":
        return replace(self, num_heads=num_heads)

    def cache(self) -> dict:
        """What one rank caches per token: the normalized latent and the rotated rope key."""
        return {"kind": "mla", "ckv": self.kv_lora_rank, "kpe": self.rope_dim}


@dataclass(frozen=True)
class GqaDims:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    scale: float
    rope_scaling: float
    qk_norm: str = "none"  # "head": per-head q/k RMSNorm (Qwen3); "full": over the whole projection (OLMoE)
    window: int | None = None  # sliding-window attention: a query sees the keys of its last `window` slots
    rope_dim: int | None = None  # partial rotary: rope turns the first rope_dim of each head (None: all; 0: NoPE)
    rope_interleave: bool = False  # rope turns pairs (x[2i], x[2i+1]) rather than (x[i], x[i + R/2])
    qk_offset: float = 0.0  # per-head q/k norms scaling by offset + weight (MiniMax-M3: 1, Gemma-style)
    softcap: float | None = None  # Gemma 2: scores -> softcap · tanh(scores / softcap) before the softmax
    sinks: bool = False  # gpt-oss: a learned logit per head (`sinks` [H]) joins each softmax's normalizer
    # per-head q/k norms: their children (HunYuan: query_layernorm, key_layernorm), and whether they
    # normalize the rotated heads (HunYuan) rather than the heads before rope (Qwen3)
    qk_norm_names: tuple[str, str] = ("q_norm", "k_norm")
    qk_norm_after_rope: bool = False
    # AFMoE: the heads' output scaled by sigmoid(gate_proj(x)), element by element, before o_proj
    output_gate: bool = False
    # Llama 4: one weightless per-head norm (`qk_norm`: x / rms(x) in fp32) for both q and k
    qk_norm_weightless: bool = False
    # Llama 4's chunked attention: a query sees the keys of its own chunk of `chunk` slots only
    chunk: int | None = None
    # Llama 4's temperature tuning on its NoPE layers: q × (log1p(floor((pos + 1) / floor_scale)) ·
    # attn_scale + 1), as (floor_scale, attn_scale)
    temperature: tuple[float, float] | None = None

    def local(self, num_heads: int, num_kv_heads: int) -> "GqaDims":
        return replace(self, num_heads=num_heads, num_kv_heads=num_kv_heads)

    def cache(self) -> dict:
        return {"kind": "gqa", "kv_heads": self.num_kv_heads, "head_dim": self.head_dim}


@dataclass(frozen=True)
class RouterDims:
    """A top-k token router, in the variants transformers' decoder families use.

    scoring: softmax (Mixtral, Qwen-MoE, OLMoE, DeepSeek-V2) or sigmoid (DeepSeek-V3, Kimi-K2).
    Selection is group-limited when num_groups > 1: keep the topk_groups groups with the best
    group score (`max` of the group's scores, DeepSeek-V2; sum of its best two, DeepSeek-V3),
    then the top_k experts among them. correction_bias: a per-expert bias added for the choice
    only (not to the weights). normalize: the k weights are renormalized to sum to one; scaling
    multiplies them. fp32_logits: the router GEMM runs on fp32 copies of the activation and
    weight (DeepSeek) rather than in the model dtype; weights_in_model_dtype: the k weights are
    rounded back to the model dtype before they scale the experts' outputs (Qwen-MoE, OLMoE,
    GraniteMoE, gpt-oss). module: the router's child of the MoE block (`gate`; GraniteMoE and
    gpt-oss name it `router`); bias: its logits GEMM has a bias (gpt-oss).
    """

    num_experts: int
    top_k: int
    scoring: str = "softmax"
    num_groups: int = 1
    topk_groups: int = 1
    group_score: str = "max"
    correction_bias: bool = False
    normalize: bool = False
    scaling: float = 1.0
    fp32_logits: bool = False
    weights_in_model_dtype: bool = False
    module: str = "gate"
    bias: bool = False


@dataclass(frozen=True)
class NormDims:
    eps: float
    offset: float = 0.0  # 1.0: the norm scales by 1 + weight, in fp32 (Gemma)


@dataclass(frozen=True)
class LinearDims:
    """y = x W^T (+ b): W is [out_features, in_features] (column-parallel splits out, row-parallel in)."""

    in_features: int
    out_features: int
    bias: bool


@dataclass(frozen=True)
class EmbeddingDims:
    vocab: int
    hidden: int
    scale: Any = None  # a planc.lift.glue.Scale the model applies to the embeddings (Granite's multiplier)


@dataclass(frozen=True)
class MlpDims:
    """The activation between an MLP's projections: act(gate) * up, or act(up) where the MLP has no
    gate (Arcee's ReLU² up/down MLP)."""

    intermediate: int
    act: str
    gated: bool = True
    limit: float | None = None  # the clamped GLU (act CLAMPED_GLU: MiniMax-M3's dense and shared MLPs)
    alpha: float = 1.0


@dataclass(frozen=True)
class ExpertsLayout:
    """How a MoE block's fused experts hold their weights, when not as most families do
    (gate_up_proj [E, 2I, D], gate rows then up rows; down_proj [E, D, I]; no biases; act(gate) · up).

    gpt-oss: transposed ([E, D, 2I] and [E, I, D], applied as x @ W), gate and up interleaved (the
    even columns of gate_up are the gate), biases (gate_up_proj_bias [E, 2I], down_proj_bias [E, D]),
    and a clamped GLU between them: gate ≤ limit, -limit ≤ up ≤ limit, (up + 1) · gate · σ(alpha · gate).
    """

    transposed: bool = False
    interleaved: bool = False
    bias: bool = False
    limit: float | None = None  # the clamped GLU (its `act` is CLAMPED_GLU)
    alpha: float = 1.0
    # Llama 4: every expert runs on every token, its input rows scaled by the router's weights (zero
    # where a token does not go), so a routed row computes expert(w · x) rather than w · expert(x)
    scaled_inputs: bool = False


CLAMPED_GLU = "clamped_glu"  # MoeDims.act of experts whose layout clamps (ExpertsLayout.limit)


@dataclass(frozen=True)
class MoeDims:
    router: RouterDims
    hidden: int
    intermediate: int  # per expert
    act: str
    layout: ExpertsLayout = ExpertsLayout()


@dataclass(frozen=True)
class CommDims:
    """A collective's payload per token: `width` elements of the model dtype, or `fixed_bytes`
    (e.g. one fp32 per token) when set; all-to-all sends a row to at most `fanout` other ranks."""

    width: int
    fixed_bytes: int = 0
    fanout: int = 0

"""TPLA (DESIGN 4.1): every "must hold" line, at block level in fp64 and end to end on gloo."""
from __future__ import annotations

import pytest
import torch

from planc.bind import bind
from planc.codegen.emit_program import _local_dims
from planc.codegen.partition import model_tensors, partition
from planc.driver import PASSES
from planc.errors import PlanError
from planc.ir import block_nodes, info
from planc.lift import lift
from planc.lift.check import block_weights, run_reference
from planc.ops import MlaCache, Ops, Step, apply_rope, masked_softmax, attention_mask, rope_cos_sin
from planc.models.registry import load_model
from planc.passmanager import PassContext, run_passes
from planc.plan import parse_plan_text
from planc.transforms import latent_transforms

LAYER = "model.layers.1.self_attn"


def plan_text(devices: int, g: int, transform: str = "pca", prefill: str = "tpla", rmsnorm: str = "sliced",
              dtype: str = "float64", scales: str = "none") -> str:
    return f"""version: 1
mesh: {{devices: {devices}}}
model: {{source: tiny-deepseek, dtype: {dtype}}}
rules:
  - match: "model.layers.*.self_attn"
    attention: {{strategy: tpla, latent_groups: {g}, transform: {transform}, prefill: {prefill}, rmsnorm: {rmsnorm}, scales: {scales}, calibration_tokens: 512}}
"""


@pytest.fixture(scope="module")
def model64():
    return load_model("tiny-deepseek", dtype=torch.float64)


@pytest.fixture(scope="module")
def lifted64(model64):
    return lift(model64, check=False).graph


def shards(model, lifted, text: str):
    plan = parse_plan_text(text, "plan.yaml")
    ctx = PassContext(plan, plan.mesh.devices)
    graph = run_passes(bind(lifted, plan), PASSES, ctx)
    transforms, _ = latent_transforms(graph, model, meta=False)
    node = next(n for n in block_nodes(graph, "tpla_latent") if info(n).fqn == LAYER)
    full = model_tensors(model)
    return info(node), transforms[LAYER], [partition(graph, full, r, transforms) for r in range(plan.mesh.devices)]


def scoped(tensors, fqn=LAYER):
    return {k[len(fqn) + 1:]: v for k, v in tensors.items() if k.startswith(fqn + ".")}


def run_ranks(meta, rank_weights, x, exact: bool, steps: int = 1):
    """Prefill on x[:, :-steps], then decode the last `steps` tokens; per-rank outputs summed."""
    d = _local_dims(meta)
    B, S, _ = x.shape
    caches = [MlaCache(x.new_zeros(B, S, d.latent), x.new_zeros(B, S, d.mla.rope_dim)) for _ in rank_weights]
    outs = []
    for start, stop in [(0, S - steps)] + [(S - steps + i, S - steps + i + 1) for i in range(steps)]:
        step = Step(start, torch.arange(start, stop).expand(B, -1), torch.ones(B, S, dtype=torch.bool))
        xs = x[:, start:stop]
        lats = [Ops().tpla_latent(xs, scoped(W), d) for W in rank_weights]
        sumsq = sum(l.sumsq_BS1 for l in lats) if exact else None
        outs.append(sum(Ops().tpla_attention(xs, l, sumsq, step, c, scoped(W), d)
                        for l, c, W in zip(lats, caches, rank_weights)))
    return torch.cat(outs, dim=1), caches


@pytest.mark.parametrize("transform", ["none", "hadamard", "pca"])
def test_unsliced_reparameterization_is_exactly_mla(model64, lifted64, transform):
    meta, _, ranks = shards(model64, lifted64, plan_text(1, 1, transform))
    x = torch.randn(2, 7, model64.config.hidden_size, dtype=torch.float64)
    want = run_reference(_block(model64), x, block_weights(model64, LAYER))
    got, _ = run_ranks(meta, ranks, x, exact=False, steps=3)
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-10


def _block(model):
    from planc.lift.recognize import recognize

    return next(b for b in recognize(model) if b.fqn == LAYER)


def tpla_formula(model, U, x, g: int, exact: bool, scales=None):
    """An independent statement of TPLA: all heads, sum over the g latent slices, causal prefill."""
    W = block_weights(model, LAYER)
    d = _block(model).dims
    B, S, _ = x.shape
    C, R, P, V, H = d.kv_lora_rank, d.rope_dim, d.nope_dim, d.v_dim, d.num_heads
    q = Ops().rmsnorm(x @ W["q_a_proj.weight"].T, W["q_a_layernorm.weight"], d.eps) @ W["q_b_proj.weight"].T
    q_nope, q_pe = q.view(B, S, H, P + R).split([P, R], dim=-1)
    kv = x @ W["kv_a_proj_with_mqa.weight"].T
    c = kv[..., :C] @ U  # c' = U^T c, per token
    cos, sin = rope_cos_sin(torch.arange(S).expand(B, S), W["rotary.inv_freq"], d.rope_scaling, x.dtype)
    q_pe = apply_rope(q_pe, cos, sin, d.rope_interleave)
    k_pe = apply_rope(kv[..., None, C:], cos, sin, d.rope_interleave)[:, :, 0]
    w_kv = (W["kv_b_proj.weight"] * W["kv_a_layernorm.weight"][None, :] @ U).view(H, P + V, C)
    mask = attention_mask(Step(0, None, torch.ones(B, S, dtype=torch.bool)), S)
    out = 0
    for j in range(g):
        sl = slice(j * C // g, (j + 1) * C // g)
        rms_over = c if exact else c[..., sl]
        cj = c[..., sl] * torch.rsqrt(rms_over.pow(2).mean(-1, keepdim=True) + d.eps)
        cj = cj * scales[j] if scales is not None else cj
        logits = torch.einsum("bshp,hpc,btc->bhst", q_nope, w_kv[:, :P, sl], cj) + torch.einsum("bshr,btr->bhst", q_pe, k_pe)
        o_lat = torch.einsum("bhst,btc->bshc", masked_softmax(logits * d.scale, mask).to(x.dtype), cj)
        out = out + torch.einsum("bshc,hvc->bshv", o_lat, w_kv[:, P:, sl])
    return out.reshape(B, S, H * V) @ W["o_proj.weight"].T


@pytest.mark.parametrize("devices,g", [(2, 2), (4, 2), (4, 4)])
@pytest.mark.parametrize("rmsnorm", ["sliced", "exact", "recompute"])
def test_ranks_sum_to_the_single_process_formula(model64, lifted64, devices, g, rmsnorm):
    """exact all-reduces the slices' sums of squares, recompute computes the whole latent's on
    every rank: the same formula, the RMS over the whole latent."""
    meta, fold, ranks = shards(model64, lifted64, plan_text(devices, g, "pca", "tpla", rmsnorm))
    x = torch.randn(2, 6, model64.config.hidden_size, dtype=torch.float64)
    got, caches = run_ranks(meta, ranks, x, exact=rmsnorm == "exact", steps=2)
    want = tpla_formula(model64, fold.U, x, g, exact=rmsnorm != "sliced")
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-10
    C = meta.dims.kv_lora_rank
    assert all(c.ckv_BTC.shape[-1] == C // g for c in caches)  # a rank holds its slice and nothing else


def test_calibrated_slice_scales(model64, lifted64):
    meta, fold, ranks = shards(model64, lifted64, plan_text(2, 2, "pca", "tpla", scales="calibrated"))
    # On the calibration latents each scale is its slice's mean RMS: with PCA the top slice holds
    # more energy, so its scale is the larger; squared slice RMSs of a unit-RMS latent add up to g.
    assert fold.scales[0] > fold.scales[1] > 0 and 1.6 < float(fold.scales.pow(2).sum()) < 2.4
    x = torch.randn(2, 6, model64.config.hidden_size, dtype=torch.float64)
    got, _ = run_ranks(meta, ranks, x, exact=False, steps=2)
    want = tpla_formula(model64, fold.U, x, 2, exact=False, scales=fold.scales)
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-10


def test_rank_weights_hold_only_their_latent_slice(model64, lifted64):
    meta, _, ranks = shards(model64, lifted64, plan_text(4, 2, prefill="tpla"))
    d = meta.dims
    for W in ranks:
        w = scoped(W)
        assert w["tpla.kv_a.weight"].shape[0] == d.kv_lora_rank // 2 + d.rope_dim
        assert w["kv_b_proj.weight"].shape[1] == d.kv_lora_rank // 2
        assert "kv_a_proj_with_mqa.weight" not in w  # no full latent projection without PD separation


def test_recompute_holds_the_whole_latent_projection_and_caches_only_its_slice(model64, lifted64):
    meta, _, ranks = shards(model64, lifted64, plan_text(2, 2, prefill="tpla", rmsnorm="recompute"))
    d = meta.dims
    for W in ranks:
        w = scoped(W)
        assert w["kv_a_proj_with_mqa.weight"].shape[0] == d.kv_lora_rank + d.rope_dim  # to recompute the RMS
        assert w["kv_b_proj.weight"].shape[1] == d.kv_lora_rank // 2
    x = torch.randn(2, 6, model64.config.hidden_size, dtype=torch.float64)
    _, caches = run_ranks(meta, ranks, x, exact=False, steps=2)
    assert all(c.ckv_BTC.shape[-1] == d.kv_lora_rank // 2 for c in caches)


@pytest.mark.parametrize("rmsnorm", ["exact", "recompute"])
def test_calibrated_scales_need_the_sliced_norm(model64, lifted64, rmsnorm):
    with pytest.raises(PlanError, match=f"with rmsnorm: {rmsnorm} there is nothing to correct"):
        shards(model64, lifted64, plan_text(2, 2, rmsnorm=rmsnorm, scales="calibrated"))


def test_invalid_groups_list_the_valid_ones(model64, lifted64):
    with pytest.raises(PlanError, match=r"valid latent_groups: 1, 2"):
        shards(model64, lifted64, plan_text(2, 4))
    with pytest.raises(PlanError, match=r"tpla cannot split .* 4 heads over 3 ranks"):
        shards(model64, lifted64, plan_text(3, 1, prefill="mla"))


def test_tpla_fields_need_strategy_tpla():
    text = plan_text(2, 2).replace("strategy: tpla", "strategy: mla_tp")
    with pytest.raises(PlanError, match="only apply to strategy 'tpla'"):
        parse_plan_text(text, "plan.yaml")

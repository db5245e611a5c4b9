"""TPLA: the rewrite, the folded weights, and the ranks' sum against independent statements in fp64."""
from __future__ import annotations

import json

import pytest
import torch

from planc.errors import CompileError, PlanError
from planc.ir import format_graph, info, nodes_of
from planc.lift.check import block_weights, run_reference
from planc.lift.recognize import recognize
from planc.ops import Ops, Step, apply_rope, attention_mask, masked_softmax, rope_cos_sin
from planc.plan import parse_plan_text
from planc.transforms import pca
from tests.passes.blocks import compiled, model, run_block

LAYER = "model.layers.1.self_attn"
F64 = torch.float64


def plan_text(devices: int, g: int, transform: str = "pca", prefill: str = "tpla", rmsnorm: str = "sliced",
              dtype: str = "float64", scales: str = "none", required: bool = False) -> str:
    return f"""version: 1
mesh: {{devices: {devices}}}
model: {{source: tiny-deepseek, dtype: {dtype}}}
rules:
  - match: "model.layers.*.self_attn"
    attention: {{strategy: tpla, latent_groups: {g}, transform: {transform}, prefill: {prefill}, rmsnorm: {rmsnorm}, scales: {scales}, calibration_tokens: 512, required: {str(required).lower()}}}
"""


def tpla_compile(text: str, strict: bool = True):
    graph, ctx, ranks = compiled("tiny-deepseek", text, F64, strict=strict)
    core = next(n for n in nodes_of(graph, "tpla_attention") if info(n).fqn == LAYER)
    return graph, ctx, ranks, info(core).shard


def _block():
    return next(b for b in recognize(model("tiny-deepseek", F64)) if b.fqn == LAYER)


def _rel(got, want) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def test_rewrite_golden():
    graph, _, _, _ = tpla_compile(plan_text(2, 2, rmsnorm="exact"))
    layer = [line.split(" = ")[1].split("(")[0] for line in format_graph(graph).splitlines()
             if "layers.1.self_attn" in line]
    assert layer == ["linear", "rmsnorm", "linear", "linear", "tpla_latent", "tpla_sumsq", "all_reduce",
                     "tpla_attention", "linear", "all_reduce"]


@pytest.mark.parametrize("transform", ["none", "hadamard", "pca"])
def test_unsliced_reparameterization_is_exactly_mla(transform):
    graph, _, ranks, _ = tpla_compile(plan_text(1, 1, transform))
    x = torch.randn(2, 7, model("tiny-deepseek", F64).config.hidden_size, dtype=F64)
    want = run_reference(_block(), x, block_weights(model("tiny-deepseek", F64), LAYER))
    got, _, _ = run_block(graph, ranks, LAYER, x, decode_steps=3)
    assert _rel(got, want) <= 1e-10


def tpla_formula(U, x, g: int, exact: bool, scales=None):
    """An independent statement of TPLA: all heads, sum over the g latent slices, causal prefill."""
    W = block_weights(model("tiny-deepseek", F64), LAYER)
    d = _block().dims
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
def test_ranks_sum_to_the_single_process_formula(devices, g, rmsnorm):
    """exact all-reduces the slices' sums of squares, recompute computes the whole latent's on
    every rank: the same formula, the RMS over the whole latent."""
    graph, _, ranks, shard = tpla_compile(plan_text(devices, g, "pca", "tpla", rmsnorm))
    x = torch.randn(2, 6, model("tiny-deepseek", F64).config.hidden_size, dtype=F64)
    got, caches, outs = run_block(graph, ranks, LAYER, x, decode_steps=2)
    assert _rel(got, tpla_formula(shard.U, x, g, exact=rmsnorm != "sliced")) <= 1e-10
    assert all(torch.equal(o, outs[0]) for o in outs)  # the all-reduce leaves every rank the same value
    C = _block().dims.kv_lora_rank
    assert all(c[LAYER].ckv_BTC.shape[-1] == C // g for c in caches)  # a rank holds its slice and nothing else


def test_pd_separation_prefill_is_exact_mla_and_decode_is_tpla():
    graph, _, ranks, shard = tpla_compile(plan_text(4, 2, "pca", "mla", "recompute"))
    x = torch.randn(2, 6, model("tiny-deepseek", F64).config.hidden_size, dtype=F64)
    got, _, _ = run_block(graph, ranks, LAYER, x, decode_steps=2)
    want_prefill = run_reference(_block(), x[:, :4], block_weights(model("tiny-deepseek", F64), LAYER))
    assert _rel(got[:, :4], want_prefill) <= 1e-10
    assert _rel(got[:, 4:], tpla_formula(shard.U, x, 2, exact=True)[:, 4:]) <= 1e-10


def test_calibrated_slice_scales():
    graph, _, ranks, shard = tpla_compile(plan_text(2, 2, "pca", "tpla", scales="calibrated"))
    # On the calibration latents each scale is its slice's mean RMS: with PCA the top slice holds
    # more energy, so its scale is the larger; squared slice RMSs of a unit-RMS latent add up to g.
    assert shard.scales[0] > shard.scales[1] > 0 and 1.6 < float(shard.scales.pow(2).sum()) < 2.4
    x = torch.randn(2, 6, model("tiny-deepseek", F64).config.hidden_size, dtype=F64)
    got, _, _ = run_block(graph, ranks, LAYER, x, decode_steps=2)
    assert _rel(got, tpla_formula(shard.U, x, 2, exact=False, scales=shard.scales)) <= 1e-10


def _scoped(tensors, fqn=LAYER):
    return {k[len(fqn) + 1:]: v for k, v in tensors.items() if k.startswith(fqn + ".")}


def test_rank_weights_hold_only_their_latent_slice():
    _, _, ranks, _ = tpla_compile(plan_text(4, 2, prefill="tpla"))
    d = _block().dims
    for W in map(_scoped, ranks):
        assert W["kv_a_proj_with_mqa.weight"].shape[0] == d.kv_lora_rank // 2 + d.rope_dim
        assert W["kv_b_proj.weight"].shape[1] == d.kv_lora_rank // 2
        assert "kv_a_layernorm.weight" not in W  # gamma is folded into kv_b_proj


def test_recompute_holds_the_whole_latent_projection_and_caches_only_its_slice():
    graph, _, ranks, _ = tpla_compile(plan_text(2, 2, prefill="tpla", rmsnorm="recompute"))
    d = _block().dims
    for W in map(_scoped, ranks):
        assert W["kv_a_proj_with_mqa.weight"].shape[0] == d.kv_lora_rank + d.rope_dim  # to recompute the RMS
        assert W["kv_b_proj.weight"].shape[1] == d.kv_lora_rank // 2
    x = torch.randn(2, 6, model("tiny-deepseek", F64).config.hidden_size, dtype=F64)
    _, caches, _ = run_block(graph, ranks, LAYER, x, decode_steps=2)
    assert all(c[LAYER].ckv_BTC.shape[-1] == d.kv_lora_rank // 2 for c in caches)


@pytest.mark.parametrize("rmsnorm", ["exact", "recompute"])
def test_calibrated_scales_need_the_sliced_norm(rmsnorm):
    with pytest.raises(PlanError, match=f"with rmsnorm: '{rmsnorm}' there is nothing to correct"):
        parse_plan_text(plan_text(2, 2, rmsnorm=rmsnorm, scales="calibrated"), "plan.yaml")


def test_groups_that_do_not_fit_are_declined_with_the_valid_ones():
    with pytest.raises(CompileError, match=r"plan.yaml:5:5: rules\[0\]: tpla declined on .* valid latent_groups: 1, 2"):
        tpla_compile(plan_text(2, 4))
    graph, ctx, _ = compiled("tiny-deepseek", plan_text(3, 1, prefill="mla"), F64, strict=False)
    assert [r.detail for r in ctx.records if r.action == "declined"][0].startswith("4 heads do not split over 3 ranks")
    assert not nodes_of(graph, "tpla_attention") and len(nodes_of(graph, "mla_attention")) == 4  # kept as they were


def test_tpla_fields_need_strategy_tpla():
    text = plan_text(2, 2).replace("strategy: tpla", "strategy: mla_tp")
    with pytest.raises(PlanError, match="unknown key 'latent_groups'"):
        parse_plan_text(text, "plan.yaml")


def test_rules_with_different_calibration_settings_each_get_their_own_profile():
    text = """version: 1
mesh: {devices: 2}
model: {source: tiny-deepseek, dtype: float64}
rules:
  - match: "model.layers.[01].self_attn"
    attention: {strategy: tpla, latent_groups: 2, transform: pca, calibration_tokens: 256}
  - match: "model.layers.*.self_attn"
    attention: {strategy: tpla, latent_groups: 2, transform: pca, rmsnorm: sliced, scales: calibrated, calibration_tokens: 1024}
"""
    graph, ctx, _ = compiled("tiny-deepseek", text, F64)
    shards = {info(n).fqn: info(n).shard for n in nodes_of(graph, "tpla_attention")}
    profiles = ctx.profiles
    for fqn, tokens in (("model.layers.0.self_attn", 256), ("model.layers.3.self_attn", 1024)):
        U, _ = pca(profiles.latents([fqn], tokens)[fqn])
        assert torch.equal(shards[fqn].U, U)
    assert shards["model.layers.0.self_attn"].scales is None and shards["model.layers.3.self_attn"].scales is not None
    a = profiles.latents(["model.layers.1.self_attn"], 256)["model.layers.1.self_attn"]
    b = profiles.latents(["model.layers.1.self_attn"], 1024)["model.layers.1.self_attn"]
    assert (a.shape[0], b.shape[0]) == (256, 1024)  # each rule's own number of calibration tokens
    assert set(ctx.notes["tpla"]) == {f"model.layers.{i}.self_attn" for i in range(4)}
    json.dumps(ctx.notes)  # notes go to report.json as they are


def _config_with_latent(tmp_path, width: int) -> str:
    from planc.models.registry import bundled_config

    config = bundled_config("tiny-deepseek").to_dict() | {"kv_lora_rank": width}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_hadamard_on_a_96_wide_latent_validates_and_folds_an_orthogonal_transform(tmp_path):
    from planc.driver import validate

    plan = tmp_path / "plan.yaml"
    plan.write_text(plan_text(2, 2, transform="hadamard", dtype="float32").replace("model: {source: tiny-deepseek, dtype: float32}\n", ""))
    out = validate(plan, _config_with_latent(tmp_path, 96), strict=True)
    assert "4 blocks rewritten, 0 declined" in out


def test_hadamard_on_a_width_without_a_construction_is_declined_at_validate(tmp_path):
    from planc.driver import validate

    plan = tmp_path / "plan.yaml"
    plan.write_text(plan_text(2, 2, transform="hadamard", required=True).replace(
        "model: {source: tiny-deepseek, dtype: float64}\n", ""))
    with pytest.raises(CompileError, match=r"plan.yaml:4:5: rules\[0\]: tpla declined on model.layers.0.self_attn "
                                           r"\(required: true\): transform hadamard: .*\b6\b"):
        validate(plan, _config_with_latent(tmp_path, 6), strict=False)

"""easyspec: placement of the draft's grouped attentions, the two graphs it derives, both combine
rules against a hand-written reference, and what it declines."""
from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from codegen.emit_program import emit_program
from planc.codegen.partition import model_tensors, partition
from planc.driver import parallelize
from planc.errors import CompileError, PlanError
from planc.ir import RuleRef, format_graph, info
from planc.ops import GqaCache, Ops, Step
from planc.passes import easyspec
from planc.passes.easyspec import EasySpecSection
from planc.plan import parse_plan_text
from planc.report.report import cache_specs
from planc.runtime.threads import run_threads
from planc.weights import Weights, scoped
from tests.passes.blocks import lifted, model

TP = '\n  - match: "model.layers.*.self_attn"\n    attention: {strategy: tp}'


def _graphs(devices: int, n: int, combine: str = "seq_mlp", rules: str = "", strict: bool = False):
    plan = parse_plan_text(f"version: 1\nmesh: {{devices: {devices}}}\nrules:{rules or ' []'}\n", "plan.yaml")
    graph, ctx = parallelize(lifted("tiny-draft"), plan, model("tiny-draft"), strict=strict)
    ctx.current, ctx.rule = "easyspec", RuleRef(-1, "draft.easyspec", "plan.yaml:9:3", section="easyspec")
    section = EasySpecSection(layer_parallel=n, combine=combine)
    return graph, easyspec.place(graph, section, ctx), easyspec.layer_parallel(graph, section, ctx), ctx


def test_groups_and_ranks_and_depth():
    before, exact, parallel, ctx = _graphs(4, 2)
    text = format_graph(before)
    found = easyspec.placement(parallel)
    assert found["groups"] == [[1, 2], [3, 4]] and found["depth"] == 4 and found["sequential_depth"] == 6
    assert [e["rank"] for e in found["layers"]] == [None, 0, 1, 2, 3, None]
    assert easyspec.placement(exact)["groups"] == [[1], [2], [3], [4]]  # exact: each gathered after it runs
    assert easyspec.placement(exact)["depth"] == 6
    assert format_graph(before) == text  # the pass does not touch its input
    assert [r.detail for r in ctx.records if r.pass_name == "easyspec"][:2] == [
        "attention on rank 0; drafting group 0 of 2", "attention on rank 1; drafting group 0 of 2"]
    assert "group1 = easyspec_gather(h_2, attn1_r0, attn2_r1)" in format_graph(parallel)
    assert easyspec.placement(_graphs(4, 4)[2])["depth"] == 3  # 2 + ceil(4 / 4)


def test_grouped_weights_and_caches_live_on_their_rank():
    _, exact, _, _ = _graphs(2, 2)
    ranks = partition(exact, model_tensors(model("tiny-draft")), 2)
    q1, q2 = "model.layers.1.self_attn.q_proj.weight", "model.layers.2.self_attn.q_proj.weight"
    assert q1 in ranks[0] and q1 not in ranks[1] and q2 in ranks[1] and q2 not in ranks[0]
    assert all("model.layers.0.self_attn.q_proj.weight" in r for r in ranks)  # the first layer: everywhere
    specs = cache_specs(exact)
    assert [specs[f"model.layers.{i}.self_attn"].get("rank") for i in range(6)] == [None, 0, 1, 0, 1, None]


def _reference(ids_BS: torch.Tensor, combine: str, groups: list[list[int]]) -> torch.Tensor:
    """The draft forward with the groups' attentions reading the group's input, by hand."""
    ops, m = Ops(), model("tiny-draft")
    W, d = dict(model_tensors(m)), info(next(n for n in lifted("tiny-draft").nodes
                                             if "planc" in n.meta and info(n).kind == "gqa_attention")).dims
    B, S, eps = *ids_BS.shape, m.config.rms_norm_eps
    step = Step(0, torch.arange(S).expand(B, S), torch.ones(B, S, dtype=torch.bool))

    def attn(i, h):
        L = f"model.layers.{i}"
        cache = GqaCache(torch.zeros(B, S, d.num_kv_heads, d.head_dim), torch.zeros(B, S, d.num_kv_heads, d.head_dim))
        x = ops.rmsnorm(h, W[f"{L}.input_layernorm.weight"], eps)
        attention = scoped(W, f"{L}.self_attn") | {"rotary.inv_freq": W["model.rotary_emb.inv_freq"]}
        return ops.gqa_attention(x, step, cache, attention, d)

    def mlp(i, h):
        L = f"model.layers.{i}"
        return ops.mlp(ops.rmsnorm(h, W[f"{L}.post_attention_layernorm.weight"], eps), scoped(W, f"{L}.mlp"), "silu")

    h = ops.embedding(ids_BS, W["model.embed_tokens.weight"])
    for group in [[0], *groups, [5]]:
        outs = [attn(i, h) for i in group]
        if combine == "sum":
            h = h + sum(outs)
        for i, a in zip(group, outs):
            h = h + a if combine == "seq_mlp" else h
            h = h + mlp(i, h)
    h = ops.rmsnorm(h, W["model.norm.weight"], eps)
    return ops.linear(h, W["lm_head.weight"])


@pytest.mark.parametrize("combine", ["seq_mlp", "sum"])
def test_layer_parallel_forward_computes_the_combine_rule(combine):
    _, exact, parallel, _ = _graphs(2, 2, combine)
    source = emit_program(exact, model="tiny-draft", world_size=2, plan_hash="0",
                          more={"forward_layer_parallel": (parallel, "test")})
    program: dict = {}
    exec(compile(source, "<draft>", "exec"), program)
    ranks = partition(exact, model_tensors(model("tiny-draft")), 2)
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(0))
    step = Step(0, torch.arange(5).expand(2, 5), torch.ones(2, 5, dtype=torch.bool))

    def rank(comm):
        kv = {fqn: GqaCache(torch.zeros(2, 5, s["kv_heads"], s["head_dim"]), torch.zeros(2, 5, s["kv_heads"], s["head_dim"]))
              for fqn, s in cache_specs(exact).items() if s.get("rank", comm.rank) == comm.rank}
        rt = SimpleNamespace(ops=Ops(), comm=comm, weights=Weights(ranks[comm.rank]), kv=kv, work=Counter())
        return program["forward_layer_parallel"](rt, ids, step), rt.work["grouped_attention"]

    outs = run_threads(rank, 2)
    want = _reference(ids, combine, [[1, 2], [3, 4]])
    for logits, grouped in outs:
        torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)  # fp32, other summation points
        assert grouped == 2  # one attention of each group on each of the 2 ranks
    assert torch.equal(outs[0][0], outs[1][0])
    other = _reference(ids, "sum" if combine == "seq_mlp" else "seq_mlp", [[1, 2], [3, 4]])
    assert (other - want).abs().max() > 1e-2  # the two rules differ by far more than the tolerance


def test_a_split_draft_attention_is_declined_and_stays_sequential():
    _, exact, parallel, ctx = _graphs(2, 2, rules=TP)
    declined = [r for r in ctx.records if r.pass_name == "easyspec" and r.action == "declined"]
    assert len(declined) == 4 and "q_proj is split by rules[0]" in declined[0].detail
    assert easyspec.placement(parallel)["groups"] == [] and easyspec.placement(parallel)["depth"] == 6
    with pytest.raises(CompileError, match="draft.easyspec: easyspec declined on model.layers.1.self_attn"):
        _graphs(2, 2, rules=TP, strict=True)


def test_a_degree_beyond_the_ranks_is_a_plan_error():
    with pytest.raises(PlanError, match=r"plan.yaml:9:3: draft.easyspec.layer_parallel: layer_parallel 3 needs 3 "
                                        r"ranks .* valid values: 1..2"):
        _graphs(2, 3)


def test_a_declined_member_keeps_its_group_sequential_in_both_forwards():
    one = '\n  - match: "model.layers.1.self_attn"\n    attention: {strategy: tp}'
    _, exact, parallel, _ = _graphs(4, 2, rules=one)
    ranks = [[e["rank"] for e in easyspec.placement(g)["layers"]] for g in (exact, parallel)]
    assert ranks[0] == ranks[1] == [None, None, None, 2, 3, None]  # caches and weights agree in both

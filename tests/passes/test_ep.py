"""ep: route, dispatch, experts, combine, gather; placements from the routing profile; token shuffling.

Exactness of the placed and shuffled programs is checked on whole programs run by thread ranks
(tests/passes/programs.py) against the contiguous baseline of the same world size.
"""
from __future__ import annotations

import functools
import hashlib

import pytest
import torch

from planc.errors import CompileError
from planc.ir import format_graph, info
from planc.lift.check import block_weights
from planc.lift.recognize import recognize
from planc.ops import Ops
from planc.passes import ep
from planc.passes.ep import route
from planc.placement import contiguous
from tests.passes.blocks import compiled, leaves_lifted_graph_alone, model, plan, ranks_reproduce
from tests.passes.programs import generate_on_threads

MOE = 'match: "model.layers.*.mlp"\n    moe: {strategy: ep, placement: contiguous}'
DENSE = 'match: "model.layers.0.mlp"\n    mlp: {strategy: replicated}'
ATTENTION = 'match: "model.layers.*.self_attn"\n    attention: {strategy: mla_tp}'
DENSE_TP = 'match: "model.layers.0.mlp"\n    mlp: {strategy: tp}'
MOE_LAYERS = ("model.layers.1.mlp", "model.layers.2.mlp", "model.layers.3.mlp")


def moe(placement: str, token_shuffle: bool = False) -> str:
    return (f'match: "model.layers.*.mlp"\n    moe: {{strategy: ep, placement: {placement}, '
            f'token_shuffle: {str(token_shuffle).lower()}, profile: {{tokens: 1024}}}}')


@functools.cache
def placed(devices: int, placement: str, token_shuffle: bool = False):
    """(graph, ctx, ranks) of tiny-deepseek with attention and the dense MLP split, MoE under ep."""
    return compiled("tiny-deepseek", plan(devices, ATTENTION, DENSE_TP, moe(placement, token_shuffle)))


def kinds_of(graph, block: str) -> list[str]:
    return [info(n).kind for n in graph.nodes if "planc" in n.meta and info(n).block == block]


def test_rewrite_golden():
    graph, _, _ = compiled("tiny-deepseek", plan(2, DENSE, MOE))
    kinds = [l.split(" = ")[1].split("(")[0] for l in format_graph(graph).splitlines() if "layers.1.mlp" in l]
    assert kinds == ["moe_route", "moe_dispatch", "moe_experts", "moe_return", "moe_combine", "moe_slice",
                     "linear", "linear", "mlp", "linear", "all_gather_varlen"]


def test_shuffled_rewrite_golden():
    graph, _, _ = placed(4, "semantic", True)
    text = format_graph(graph).splitlines()
    layer = text[next(i for i, l in enumerate(text) if "layers.2.self_attn.o_proj" in l):
                 next(i for i, l in enumerate(text) if "layers.3.input_layernorm" in l)]
    assert [l.split(" = ")[1].split("(")[0] for l in layer] == [
        "linear", "moe_shuffle", "shuffle_reduce_scatter", "shuffle_take", "add", "rmsnorm", "moe_route_rows",
        "route_all_gather", "moe_route_groups", "moe_dispatch", "moe_experts", "moe_return", "moe_combine",
        "linear", "linear", "mlp", "linear", "add", "add", "shuffle_all_gather"]
    # the 2-gram predicts from the previous MoE layer's routing; the first MoE layer has none
    assert "moe_shuffle(ids, None)" in "\n".join(text) and "moe_shuffle_1 = moe_shuffle(ids, moe_route_groups)" in text[
        next(i for i, l in enumerate(text) if l.startswith("moe_shuffle_1"))]
    assert not any(info(n).kind == "all_reduce" and "self_attn" in info(n).fqn and info(n).layer > 0
                   for n in graph.nodes if "planc" in n.meta)  # every MoE layer's all-reduce became a reduce-scatter


def test_pass_does_not_mutate_its_input():
    leaves_lifted_graph_alone("tiny-deepseek", lambda: placed(2, "semantic", True))


@pytest.mark.parametrize("devices", [2, 4])
def test_ranks_reproduce_the_moe_block(devices):
    graph, _, ranks = compiled("tiny-deepseek", plan(devices, DENSE, MOE))
    ranks_reproduce(graph, ranks, "tiny-deepseek", "model.layers.2.mlp")


def test_each_rank_holds_its_experts_only():
    _, _, ranks = compiled("tiny-deepseek", plan(4, DENSE, MOE))
    full = dict(model("tiny-deepseek").named_parameters())["model.layers.1.mlp.experts.down_proj"]
    for r, W in enumerate(ranks):
        assert torch.equal(W["model.layers.1.mlp.experts.down_proj"], full[2 * r:2 * r + 2])


@pytest.mark.parametrize("placement", ["eplb", "semantic"])
def test_placed_ranks_hold_exactly_their_owned_experts(placement):
    graph, _, ranks = placed(4, placement)
    params = dict(model("tiny-deepseek").named_parameters())
    for fqn in MOE_LAYERS:
        owner = next(info(n).shard.owner for n in graph.nodes if "planc" in n.meta and info(n).fqn == fqn
                     and info(n).kind == "moe_experts")
        assert sorted(owner) == sorted(list(range(4)) * 2)  # E/n = 2 experts on each rank
        for r, W in enumerate(ranks):
            mine = [e for e, o in enumerate(owner) if o == r]
            for name in ("gate_up_proj", "down_proj"):
                assert torch.equal(W[f"{fqn}.experts.{name}"], params[f"{fqn}.experts.{name}"][mine])


def test_route_sends_each_token_once_per_other_owner():
    idx = torch.tensor([[0, 1], [2, 3], [0, 3]])  # 3 tokens, top-2 of 4 experts
    w = torch.full((3, 2), 0.5)
    owner = contiguous(4, 2)  # experts 0,1 on rank 0; 2,3 on rank 1
    r0, r1 = route(idx, w, owner, 0, [1, 2]), route(idx, w, owner, 1, [1, 2])
    assert r0.local_rows.tolist() == [0] and r0.send_splits == [0, 0]  # token 0's experts are all local
    assert r1.local_rows.tolist() == [1, 2] and r1.send_splits == [1, 0]  # token 2 also needs rank 0, once
    assert r0.recv_splits == [0, 1] and r1.recv_splits == [0, 0]
    assert r0.weight_RE.tolist() == [[0.5, 0.5], [0.5, 0.0]]  # [local token 0; token 2 from rank 1] x experts 0, 1


def test_experts_that_do_not_place_evenly_are_declined():
    with pytest.raises(CompileError, match=r"8 experts do not place evenly on 3 devices; valid degrees: 1, 2, 4, 8"):
        compiled("tiny-deepseek", plan(3, DENSE, MOE))


def test_token_shuffle_without_a_split_attention_is_declined():
    with pytest.raises(CompileError, match=r"token_shuffle: no all-reduce feeds the block"):
        compiled("tiny-deepseek", plan(2, DENSE, moe("contiguous", True)))


def test_placement_notes_carry_the_heatmap():
    _, ctx, _ = placed(4, "semantic", True)
    note = ctx.notes["ep"]["model.layers.2.mlp"]
    heat = torch.tensor(note["heatmap"]["load"])
    assert heat.shape == (8, 4) and abs(float(heat.sum()) - 1) < 1e-9
    assert note["expected_local_rate"] > 0.4 and 0.0 <= note["predictor_precision"] <= 1.0


# -- whole programs on thread ranks ----------------------------------------------------------------

# One row (no padding), each byte once: a table per token id is a prediction per token.
PROMPT = list(dict.fromkeys(b"def fn(x, y):\n    return x.split(y)[0] + 1"))


@functools.cache
def baseline(devices: int):
    graph, _, ranks = placed(devices, "contiguous")
    return generate_on_threads(graph, ranks, [PROMPT], 6)[0]


def _same_as_baseline(gens, devices: int) -> None:
    base = baseline(devices)
    for g in gens:
        assert g.tokens == base.tokens
        # fp32: experts see other row batches and partial sums arrive in another order (~1e-6)
        assert max((a - b).abs().max().item() for a, b in zip(g.step_logits, base.step_logits)) <= 1e-4


@pytest.mark.parametrize("devices,placement,token_shuffle",
                         [(2, "semantic", True), (4, "eplb", False), (4, "semantic", False), (4, "semantic", True)])
def test_placed_and_shuffled_programs_match_the_contiguous_baseline(devices, placement, token_shuffle):
    graph, _, ranks = placed(devices, placement, token_shuffle)
    _same_as_baseline(generate_on_threads(graph, ranks, [PROMPT], 6), devices)


def _reference_routing() -> dict[str, torch.Tensor]:
    """The single-device model's experts [N, K] for every prompt token, per MoE layer."""
    m = model("tiny-deepseek")
    seen, hooks = {}, []

    def recorder(fqn: str, dims):
        gate = {k.removeprefix("gate."): v for k, v in block_weights(m, fqn).items() if k.startswith("gate.")}

        def record(_module, args, _out) -> None:
            seen[fqn] = Ops().moe_route(args[0].reshape(-1, args[0].shape[-1]), gate, dims)[0]
        return record

    for block in recognize(m):
        if block.kind == "moe":
            hooks.append(m.get_submodule(block.fqn).register_forward_hook(recorder(block.fqn, block.dims)))
    try:
        with torch.no_grad():
            m(torch.tensor([PROMPT]), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _adversarial(kind: str, owner_of: dict, reference: dict) -> dict[str, torch.Tensor]:
    """Score tables [vocab, n] for every MoE layer: every prompt token predicted onto a rank that holds none
    of its experts ("wrong"), every token onto rank 0 ("one"), or random shares ("random")."""
    gen = torch.Generator().manual_seed(0)
    tables = {}
    for fqn, owner in owner_of.items():
        table = torch.zeros(260, 4)
        if kind == "one":
            table[:, 0] = 1
        elif kind == "random":
            table = torch.rand(260, 4, generator=gen)
        else:
            for token, experts in zip(PROMPT, reference[fqn]):
                held = {owner[e] for e in experts.tolist()}
                table[token, min(set(range(4)) - held)] = 1
        tables[fqn] = table
    return tables


def _as_weights(tables: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each layer's predictor as token ids alone, with these scores (the longer contexts and the
    previous layer's rank made useless: no n-gram beyond the token, a zero prior)."""
    out = {}
    for fqn, table in tables.items():
        out |= {f"{fqn}.shuffle.prior": torch.zeros(1, 4), f"{fqn}.shuffle.ngram1.keys": torch.arange(260),
                f"{fqn}.shuffle.ngram1.cover": table, f"{fqn}.shuffle.ngram1.count": torch.ones(260)}
    return out


@pytest.mark.parametrize("kind", ["wrong", "one", "random"])
def test_any_prediction_table_gives_the_baseline_output(kind, monkeypatch):
    """Adversarial tables in every rank's weights (longer contexts and the 2-gram made useless too); also: the
    permutation is the same on every rank, the groups equal, and the placed model routes every
    token to the experts the single-device model picks."""
    graph, _, ranks = placed(4, "semantic", True)
    owner_of = {fqn: next(info(n).shard.owner for n in graph.nodes if "planc" in n.meta and info(n).fqn == fqn
                          and info(n).kind == "moe_experts") for fqn in MOE_LAYERS}
    reference = _reference_routing()
    tables = _adversarial(kind, owner_of, reference)
    ranks = [{k: v for k, v in W.items() if ".shuffle." not in k} | _as_weights(tables) for W in ranks]
    plans, routes = [], []
    real_plan, real_route = ep.shuffle_plan, ep.route_groups
    monkeypatch.setattr(ep, "shuffle_plan", lambda *a: plans.append((a[-1].rank, real_plan(*a))) or plans[-1][1])
    monkeypatch.setattr(ep, "route_groups", lambda *a: routes.append((a[-1].rank, a[0], a[-1])) or real_route(*a))
    _same_as_baseline(generate_on_threads(graph, ranks, [PROMPT], 6), 4)

    by_rank = [[p for r, p in plans if r == rank] for rank in range(4)]
    digests = [[hashlib.sha256(p.perm.numpy().tobytes()).hexdigest() for p in ps] for ps in by_rank]
    assert all(d == digests[0] for d in digests) and len(digests[0]) == 3 * 6  # 3 MoE layers x 6 steps
    assert all(max(p.sizes) - min(p.sizes) <= 1 for p in by_rank[0])
    prefill = [(packed, p) for rank, packed, p in routes if rank == 0][:3]  # the prompt, layers 1..3
    for fqn, (packed, p) in zip(MOE_LAYERS, prefill):
        experts = torch.empty(len(PROMPT), 2, dtype=torch.long).index_copy_(0, p.perm, packed[:, :2].long())
        assert torch.equal(experts.sort(1).values, reference[fqn].sort(1).values)  # the same logical experts
        if kind == "wrong":  # the adversarial table really was wrong for every token
            ranks_held = torch.tensor(owner_of[fqn])[experts]
            assert not bool((ranks_held == p.predicted[:, None]).any())


def test_semantic_under_token_shuffle_keeps_the_placement_with_fewest_held_back_rows():
    from planc import placement, shuffle

    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 12, (2048,), generator=gen)
    experts = torch.stack([ids % 8, (ids * 3 + 1) % 8], 1)  # each id's pair of experts, fixed
    experts[experts[:, 0] == experts[:, 1], 1] = (experts[experts[:, 0] == experts[:, 1], 1] + 1) % 8
    owner, how = ep._placement("semantic", (ids, experts), 8, 4, shuffled=True)
    counts = placement.counts(ids, experts, 12, 8)
    _, found = placement.semantic(counts, 4)
    rows = {name: shuffle.held_back_rows(ids, experts, o, None, 256, ep.STEP_WINDOWS)
            for name, o in {**found["placements"], "contiguous": contiguous(8, 4)}.items()}
    assert shuffle.held_back_rows(ids, experts, owner, None, 256, ep.STEP_WINDOWS) == min(rows.values())
    assert "rows per token on held-back calibration text" in how

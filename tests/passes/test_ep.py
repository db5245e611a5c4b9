"""ep: route, dispatch, experts, combine, gather; shared experts on the token slice; exact against the block."""
from __future__ import annotations

import pytest
import torch

from planc.errors import CompileError
from planc.ir import format_graph
from planc.lift.check import block_weights, run_reference
from planc.lift.recognize import recognize
from planc.passes.ep import contiguous_owner, route
from tests.passes.blocks import compiled, model, plan

MOE = 'match: "model.layers.*.mlp"\n    moe: {strategy: ep, placement: contiguous}'
DENSE = 'match: "model.layers.0.mlp"\n    mlp: {strategy: replicated}'


def test_rewrite_golden():
    graph, _, _ = compiled("tiny-deepseek", plan(2, DENSE, MOE))
    kinds = [l.split(" = ")[1].split("(")[0] for l in format_graph(graph).splitlines() if "layers.1.mlp" in l]
    assert kinds == ["moe_route", "moe_dispatch", "moe_experts", "moe_return", "moe_combine", "moe_slice",
                     "linear", "linear", "mlp", "linear", "all_gather_varlen"]


@pytest.mark.parametrize("devices", [2, 4])
def test_ranks_reproduce_the_moe_block(devices):
    from tests.passes.blocks import run_block

    graph, _, ranks = compiled("tiny-deepseek", plan(devices, DENSE, MOE))
    fqn = "model.layers.2.mlp"
    x = torch.randn(2, 5, model("tiny-deepseek").config.hidden_size)
    block = next(b for b in recognize(model("tiny-deepseek")) if b.fqn == fqn)
    got, _, outs = run_block(graph, ranks, fqn, x)
    torch.testing.assert_close(got, run_reference(block, x, block_weights(model("tiny-deepseek"), fqn)), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_each_rank_holds_its_experts_only():
    _, _, ranks = compiled("tiny-deepseek", plan(4, DENSE, MOE))
    full = dict(model("tiny-deepseek").named_parameters())["model.layers.1.mlp.experts.down_proj"]
    for r, W in enumerate(ranks):
        assert torch.equal(W["model.layers.1.mlp.experts.down_proj"], full[2 * r:2 * r + 2])


def test_route_sends_each_token_once_per_owner():
    idx = torch.tensor([[0, 1], [2, 3], [0, 3]])  # 3 tokens, top-2 of 4 experts
    w = torch.full((3, 2), 0.5)
    owner = contiguous_owner(4, 2)  # experts 0,1 on rank 0; 2,3 on rank 1
    r0, r1 = route(idx, w, owner, 0, 2), route(idx, w, owner, 1, 2)
    assert r0.send_splits == [1, 0] and r1.send_splits == [1, 2]  # token 2 goes to both ranks once each
    assert r0.recv_splits == [1, 1] and r1.recv_splits == [0, 2]


def test_experts_that_do_not_place_evenly_are_declined():
    with pytest.raises(CompileError, match=r"8 experts do not place evenly on 3 devices; valid degrees: 1, 2, 4, 8"):
        compiled("tiny-deepseek", plan(3, DENSE, MOE))

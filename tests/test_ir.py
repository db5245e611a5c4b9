"""block_members: every block's nodes from one walk, keyed by FQN relative to the block;
sum_partials_after: one all-reduce per row-parallel GEMM, one per parallel layer."""
from __future__ import annotations

import torch
import torch.fx as fx

import planc.semantic  # noqa: F401  (declares the base op kinds)
from planc.dims import LinearDims
from planc.ir import NodeInfo, add_node, block_members, format_graph, info, sum_partials_after
from planc.lift.glue import Scale


def _graph(fqns: list[str]) -> tuple[fx.Graph, list[fx.Node]]:
    graph = fx.Graph()
    x = graph.placeholder("x")
    nodes = [add_node(graph, "linear", (x,), NodeInfo(kind="linear", fqn=fqn)) for fqn in fqns]
    graph.output(nodes[-1])
    return graph, nodes


def test_each_block_gets_its_own_nodes_and_submodules_first_node_of_each_fqn():
    graph, n = _graph(["a.q", "a", "a.o", "a.o", "ab.q", "b.x.y", "a.q", "b"])
    found = block_members(graph, ["a", "b", "ab"])
    assert found == {"a": {"q": n[0], "": n[1], "o": n[2]}, "b": {"x.y": n[5], "": n[7]}, "ab": {"q": n[4]}}
    assert list(found["a"]) == ["q", "", "o"]  # graph order of each FQN's first node


def test_a_block_inside_another_is_a_member_of_both():
    graph, n = _graph(["a.mlp.up", "a.mlp", "a.norm"])
    found = block_members(graph, ["a", "a.mlp", "c"])
    assert found == {"a": {"mlp.up": n[0], "mlp": n[1], "norm": n[2]}, "a.mlp": {"up": n[0], "": n[1]}, "c": {}}


def _layer(parallel: bool, scales: tuple[Scale | None, Scale | None]) -> tuple[fx.Graph, fx.Node, fx.Node]:
    """h -> h + s1(o_proj(x)) -> + s2(down_proj(x or the first sum)), as the lift builds a residual pair."""
    graph = fx.Graph()
    h = graph.placeholder("h")
    o = add_node(graph, "linear", (h,), NodeInfo(kind="linear", fqn="l.attn.o_proj", layer=0, dims=LinearDims(8, 4, False)))
    h1 = add_node(graph, "add", (h, o), NodeInfo(kind="add", layer=0, dims=scales[0]))
    down = add_node(graph, "linear", (h if parallel else h1,),
                    NodeInfo(kind="linear", fqn="l.mlp.down_proj", layer=0, dims=LinearDims(8, 4, False)))
    graph.output(add_node(graph, "add", (h1, down), NodeInfo(kind="add", layer=0, dims=scales[1])))
    return graph, o, down


def _run(graph: fx.Graph, h: torch.Tensor, partials: dict[str, torch.Tensor], world: int) -> torch.Tensor:
    """The graph over `world` ranks in one process: each linear gives its rank's partial, each
    all_reduce sums every rank's copy of its input (the ranks run in lockstep)."""
    env: list[dict[fx.Node, torch.Tensor]] = [{} for _ in range(world)]
    for node in graph.nodes:
        for r in range(world):
            if node.op == "placeholder":
                env[r][node] = h
            elif node.op == "output":
                continue
            elif info(node).kind == "linear":
                env[r][node] = partials[info(node).fqn][r]
            elif info(node).kind == "add":
                b = env[r][node.args[1]]
                env[r][node] = env[r][node.args[0]] + (b if info(node).dims is None else info(node).dims.apply(b))
            elif info(node).kind == "scale":
                env[r][node] = info(node).dims.apply(env[r][node.args[0]])
        if "planc" in node.meta and info(node).kind == "all_reduce":
            total = sum(env[r][node.args[0]] for r in range(world))
            for r in range(world):
                env[r][node] = total
    out = next(n for n in graph.nodes if n.op == "output").args[0]
    return env[0][out]


def test_a_parallel_layer_sums_both_branches_partials_with_one_all_reduce_and_keeps_the_scales():
    scales = (Scale("mul", 0.5), Scale("div", 4.0))
    graph, o, down = _layer(True, scales)
    sum_partials_after(graph, o, "o")
    sum_partials_after(graph, down, "down")
    graph.lint()
    text = format_graph(graph)
    assert text.count("all_reduce(") == 1, text
    h = torch.randn(3, 4)
    partials = {fqn: torch.randn(2, 3, 4) for fqn in ("l.attn.o_proj", "l.mlp.down_proj")}
    want = h + partials["l.attn.o_proj"].sum(0) * 0.5 + partials["l.mlp.down_proj"].sum(0) / 4.0
    torch.testing.assert_close(_run(graph, h, partials, 2), want)


def test_a_sequential_layer_keeps_one_all_reduce_per_branch():
    graph, o, down = _layer(False, (None, None))
    sum_partials_after(graph, o, "o")
    sum_partials_after(graph, down, "down")
    assert format_graph(graph).count("all_reduce(") == 2


def test_a_partial_added_to_an_all_reduced_partial_joins_its_all_reduce():
    """all_reduce(r) + s(m) -> all_reduce(r + s(m)): a MoE block's routed and shared experts, both split."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    r = add_node(graph, "linear", (x,), NodeInfo(kind="linear", fqn="l.mlp.experts", layer=0, dims=LinearDims(8, 4, False)))
    m = add_node(graph, "linear", (x,), NodeInfo(kind="linear", fqn="l.mlp.shared.down_proj", layer=0,
                                                 dims=LinearDims(8, 4, False)))
    graph.output(add_node(graph, "add", (r, m), NodeInfo(kind="add", layer=0, dims=Scale("mul", 3.0))))
    sum_partials_after(graph, m, "m")
    sum_partials_after(graph, r, "r")
    graph.lint()
    assert format_graph(graph).count("all_reduce(") == 1
    h = torch.zeros(3, 4)
    partials = {fqn: torch.randn(4, 3, 4) for fqn in ("l.mlp.experts", "l.mlp.shared.down_proj")}
    want = partials["l.mlp.experts"].sum(0) + 3.0 * partials["l.mlp.shared.down_proj"].sum(0)
    torch.testing.assert_close(_run(graph, h, partials, 4), want)

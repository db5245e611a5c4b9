"""block_members: every block's nodes from one walk, keyed by FQN relative to the block."""
from __future__ import annotations

import torch.fx as fx

import planc.semantic  # noqa: F401  (declares the base op kinds)
from planc.ir import NodeInfo, add_node, block_members


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

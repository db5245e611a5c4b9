"""The semantic graph of a recognized decoder: blocks wired as a pre-norm residual stack."""
from __future__ import annotations

import torch.fx as fx

from planc.ir import NodeInfo, add_node
from planc.lift.recognize import Block


def _meta(b: Block) -> NodeInfo:
    return NodeInfo(kind=b.kind, fqn=b.fqn, cls=b.cls, layer=b.layer, dims=b.dims, attrs=dict(b.attrs))


def build_graph(blocks: list[Block]) -> fx.Graph:
    """Wire the blocks as a pre-norm residual decoder (the skeleton the check confirmed)."""
    g = fx.Graph()
    ids = g.placeholder("ids")
    it = iter(blocks)
    h = add_node(g, "embedding", (ids,), _meta(next(it)), "h")
    for b in it:
        if b.kind == "lm_head":
            g.output(add_node(g, "lm_head", (h,), _meta(b), "logits"))
        elif b.kind == "rmsnorm" and b.layer is None:
            h = add_node(g, "rmsnorm", (h,), _meta(b), "h")
        else:  # a norm, then its block, then the residual add
            x = add_node(g, "rmsnorm", (h,), _meta(b), "x")
            blk = next(it)
            y = add_node(g, blk.kind, (x,), _meta(blk), "a" if "attention" in blk.kind else "m")
            h = add_node(g, "add", (h, y), NodeInfo(kind="add", layer=blk.layer), "h")
    return g

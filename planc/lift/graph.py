"""The semantic graph of a recognized decoder, at GEMM level.

Blocks are wired as a residual stack, each branch h + post(block(pre(h))) with the norms the layer
has (planc.lift.recognize.LAYOUTS), and each block is expanded into the projections a
strategy splits — each a `linear` node with its own module FQN — around a semantic core:

    MLA   q = linear[q_a_proj] -> rmsnorm[q_a_layernorm] -> linear[q_b_proj]   (or linear[q_proj])
          kv = linear[kv_a_proj_with_mqa];  o = mla_attention(q, kv);  a = linear[o_proj](o)
    GQA   q, k, v = linear[q_proj], linear[k_proj], linear[v_proj]   (q, k -> rmsnorm[q_norm|k_norm]
          when those norms span the whole projection, as OLMoE's do)
          o = gqa_attention(q, k, v);  a = linear[o_proj](o)   (o -> sigmoid_scale(linear[gate_proj](x), o)
          where the attention gates its output, as AFMoE does)
    MLP   g, u = linear[gate_proj], linear[up_proj];  m = linear[down_proj](mlp(g, u))   (mlp(u) without a gate)
    MoE   r = moe(x)  (router + routed experts);  shared experts as an MLP, scaled by
          sigmoid_scale(linear[shared_expert_gate](x), .) where the block has that gate;  m = add(r, shared)
    any other feed-forward block:  m = captured(x)  (its exported graph, replicated)

so a collective inserted by a pass follows the GEMM that produces its input.
"""
from __future__ import annotations

import torch.fx as fx
from torch import nn

import planc.semantic  # noqa: F401  (declares the base op kinds)
from planc.dims import EmbeddingDims, LinearDims, MlpDims, MoeDims, NormDims
from planc.ir import NodeInfo, Run, add_node, set_runs
from planc.lift.glue import Glue
from planc.lift.recognize import CAPTURED, OUTPUT_GATE, Block, is_norm, rmsnorm_eps


class _Modules(dict):
    """FQN -> module, looked up as the graph asks (a folded graph asks for a run's first layer alone)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def __missing__(self, fqn: str) -> nn.Module:
        found = self[fqn] = self.model.get_submodule(fqn)
        return found


class _Builder:
    def __init__(self, graph: fx.Graph, model: nn.Module):
        self.g = graph
        self.modules = _Modules(model)

    def node(self, kind: str, args: tuple, name: str, **meta) -> fx.Node:
        return add_node(self.g, kind, args, NodeInfo(kind=kind, **meta), name)

    def linear(self, fqn: str, x: fx.Node, name: str, block: str, layer: int | None) -> fx.Node:
        m = self.modules[fqn]
        dims = LinearDims(m.in_features, m.out_features, m.bias is not None)
        return self.node("linear", (x,), name, fqn=fqn, block=block, cls=type(m).__name__, layer=layer, dims=dims)

    def norm(self, fqn: str, x: fx.Node, name: str, block: str, layer: int | None, offset: float = 0.0) -> fx.Node:
        m = self.modules[fqn]
        return self.node("rmsnorm", (x,), name, fqn=fqn, block=block, cls=type(m).__name__, layer=layer,
                         dims=NormDims(rmsnorm_eps(m), offset))

    def mla(self, b: Block, x: fx.Node) -> fx.Node:
        A, L = b.fqn, b.layer
        if b.dims.q_lora_rank:
            q = self.linear(f"{A}.q_a_proj", x, "q", A, L)
            q = self.norm(f"{A}.q_a_layernorm", q, "q", A, L)
            q = self.linear(f"{A}.q_b_proj", q, "q", A, L)
        else:
            q = self.linear(f"{A}.q_proj", x, "q", A, L)
        kv = self.linear(f"{A}.kv_a_proj_with_mqa", x, "kv_a", A, L)
        o = self.node("mla_attention", (q, kv), "o", fqn=A, block=A, cls=b.cls, layer=L, dims=b.dims)
        return self.linear(f"{A}.o_proj", o, "a", A, L)

    def gqa(self, b: Block, x: fx.Node) -> fx.Node:
        A, L = b.fqn, b.layer
        qkv = [self.linear(f"{A}.{p}_proj", x, p, A, L) for p in "qkv"]
        if b.dims.qk_norm == "full":  # OLMoE: q and k normalized over the whole projection
            qkv[:2] = [self.norm(f"{A}.{p}_norm", t, p, A, L) for p, t in zip("qk", qkv)]
        o = self.node("gqa_attention", tuple(qkv), "o", fqn=A, block=A, cls=b.cls, layer=L, dims=b.dims)
        if b.dims.output_gate:  # AFMoE: o · sigmoid(gate_proj(x)), head by head as q is split
            gate = self.linear(f"{A}.{OUTPUT_GATE}", x, "og", A, L)
            o = self.node("sigmoid_scale", (gate, o), "o", block=A, layer=L)
        return self.linear(f"{A}.o_proj", o, "a", A, L)

    def mlp(self, fqn: str, x: fx.Node, block: str, layer: int | None, act: str, cls: str, gated: bool = True,
            limit: float | None = None, alpha: float = 1.0) -> fx.Node:
        gate = self.linear(f"{fqn}.gate_proj", x, "g", block, layer) if gated else None
        up = self.linear(f"{fqn}.up_proj", x, "u", block, layer)
        dims = MlpDims(self.modules[f"{fqn}.up_proj"].out_features, act, gated, limit, alpha)
        ins = (gate, up) if gated else (up,)
        act_node = self.node("mlp", ins, "act", fqn=fqn, block=block, cls=cls, layer=layer, dims=dims)
        return self.linear(f"{fqn}.down_proj", act_node, "m", block, layer)

    def moe(self, b: Block, x: fx.Node) -> fx.Node:
        M, L = b.fqn, b.layer
        dims = MoeDims(b.dims, b.attrs["hidden"], b.attrs["intermediate"], b.attrs["act"], b.attrs["layout"])
        routed = self.node("moe", (x,), "r", fqn=M, block=M, cls=b.cls, layer=L, dims=dims)
        shared_name = b.attrs["shared"]
        if shared_name is None:
            return routed
        S = f"{M}.{shared_name}"
        layout = b.attrs["layout"]  # the shared expert applies the experts' clamp where they have one (MiniMax-M3)
        shared = self.mlp(S, x, M, L, b.attrs["act"], type(self.modules[S]).__name__, True, layout.limit, layout.alpha)
        if b.attrs["shared_gate"] is not None:  # Qwen2-MoE: sigmoid(shared_expert_gate(x)) * shared
            gate = self.linear(f"{M}.{b.attrs['shared_gate']}", x, "sg", M, L)
            shared = self.node("sigmoid_scale", (gate, shared), "s", block=M, layer=L)
        return self.node("add", (routed, shared), "m", block=M, layer=L)

    def captured(self, b: Block, x: fx.Node, name: str = "m") -> fx.Node:
        """A block no recognizer knows: one node, its exported graph as a function (b.dims)."""
        return self.node(CAPTURED, (x,), name, fqn=b.fqn, block=b.fqn, cls=b.cls, layer=b.layer, dims=b.dims)

    def slot_norm(self, b: Block, x: fx.Node, name: str) -> fx.Node:
        """A decoder norm: an RMSNorm node, or its captured graph when it is something else."""
        if b.kind == CAPTURED:
            return self.captured(b, x, name)
        return self.norm(b.fqn, x, name, "", b.layer, b.attrs.get("offset", 0.0))

    def block(self, b: Block, x: fx.Node) -> fx.Node:
        if b.kind == "mla_attention":
            return self.mla(b, x)
        if b.kind == "gqa_attention":
            return self.gqa(b, x)
        if b.kind == "moe":
            return self.moe(b, x)
        if b.kind == CAPTURED:
            return self.captured(b, x)
        return self.mlp(b.fqn, x, b.fqn, b.layer, b.attrs["act"], b.cls, b.attrs.get("gated", True),
                        b.attrs.get("limit"), b.attrs.get("alpha", 1.0))


def build_graph(blocks: list[Block], model: nn.Module, glue: Glue | None = None,
                representative: dict[int, int] | None = None, fold: bool = False) -> fx.Graph:
    """Wire the blocks as a residual decoder (the skeleton the lift check confirmed), with
    the scales the captured graph applies between them (`glue`, read on each layer's representative).

    fold: consecutive layers of one structure are built once, as their first layer, the graph
    recording the run (planc.ir.Run) that its nodes stand for."""
    glue, representative = glue or Glue(), representative or {}
    g = fx.Graph()
    found = layer_runs(blocks, representative) if fold else {}
    set_runs(g, found)
    skipped = {layer for run in found.values() for layer in run.layers[1:]}
    blocks = [b for b in blocks if b.layer not in skipped]
    build = _Builder(g, model)
    ids = g.placeholder("ids")
    emb, rest = blocks[0], blocks[1:]
    weight = build.modules[emb.fqn].weight
    h = build.node("embedding", (ids,), "h", fqn=emb.fqn, cls=emb.cls,
                   dims=EmbeddingDims(weight.shape[0], weight.shape[1], emb.attrs.get("scale") or glue.embedding))
    i, x = 0, None
    while i < len(rest):
        b = rest[i]
        if b.kind == "lm_head":
            if glue.head_input is not None:
                h = build.node("scale", (h,), "h", dims=glue.head_input)
            logits = build.linear(b.fqn, h, "logits", "", None)
            if glue.logits is not None:
                logits = build.node("scale", (logits,), "logits", dims=glue.logits)
            g.output(logits)
        elif b.layer is None:  # the final norm
            h = build.slot_norm(b, h, "h")
        else:  # a residual branch: its norm, its block, its post-norm, then the add (the branch scaled where the model scales it)
            if is_norm(b):
                x, i = build.slot_norm(b, h, "x"), i + 1
                b = rest[i]
            elif not b.parallel:  # a parallel block reads the input of the branch before it
                x = h
            out = build.block(b, x)
            if i + 1 < len(rest) and is_norm(rest[i + 1]) and rest[i + 1].post:
                out, i = build.slot_norm(rest[i + 1], out, "p"), i + 1
            rep = representative.get(b.layer, b.layer)
            scale = glue.attention_branch(rep) if b.kind in ("mla_attention", "gqa_attention") else glue.mlp_branch(rep)
            h = build.node("add", (h, out), "h", layer=b.layer, dims=scale)
        i += 1
    return g


def layer_runs(blocks: list[Block], representative: dict[int, int]) -> dict[int, Run]:
    """First layer -> the run of consecutive layers of its structure (one representative) that
    starts there, for runs of two layers or more; each layer's prefix is its blocks' parent FQN."""
    prefixes: dict[int, str] = {}
    for b in blocks:
        if b.layer is not None:
            prefixes.setdefault(b.layer, b.fqn.rsplit(".", 1)[0])
    found: dict[int, Run] = {}
    run: list[int] = []
    for layer in sorted(prefixes):
        if run and (layer != run[-1] + 1 or representative.get(layer, layer) != representative.get(run[0], run[0])):
            run = []
        run.append(layer)
        if len(run) > 1:
            found[run[0]] = Run(tuple(run), tuple(prefixes[i] for i in run))
    return found

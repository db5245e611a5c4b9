"""Run one block of a parallel graph on every rank, through the code codegen emits for it.

The block's nodes (those whose `block` is the FQN, collectives included) are emitted with the same
OpSpec emitters the program uses, exec'd, and run on N thread-ranks whose collectives meet in memory
(planc.runtime.threads): what the ranks compute together, checked against a reference.
"""
from __future__ import annotations

import functools

import torch
import torch.fx as fx

from codegen.emit_program import _Emitter
from planc.codegen.partition import model_tensors, partition
from planc.driver import parallelize
from planc.ir import format_graph, info
from planc.lift import lift
from planc.lift.check import block_weights, run_reference
from planc.lift.recognize import recognize
from planc.models.registry import load_model
from planc.ops import GqaCache, MlaCache, Ops, Step
from planc.plan import parse_plan_text
from planc.report.report import cache_specs
from planc.runtime.threads import run_threads
from planc.weights import Weights


@functools.cache
def model(name: str, dtype: torch.dtype = torch.float32):
    return load_model(name, dtype=dtype)


@functools.cache
def lifted(name: str, dtype: torch.dtype = torch.float32) -> fx.Graph:
    m = model(name, dtype)
    return lift(m, check=False).graph


def compiled(name: str, plan_text: str, dtype: torch.dtype = torch.float32, strict: bool = True):
    """(parallel graph, pass context, per-rank tensors) of a bundled model under a plan."""
    plan = parse_plan_text(plan_text, "plan.yaml")
    graph, ctx = parallelize(lifted(name, dtype), plan, model(name, dtype), strict=strict)
    full = model_tensors(model(name, dtype))
    return graph, ctx, partition(graph, full, plan.mesh.devices)


def block_source(graph: fx.Graph, block: str) -> tuple[str, str]:
    """(python source of `def block(x, ops, comm, W, caches, step)`, name of its input node)."""
    nodes = [n for n in graph.nodes if "planc" in n.meta and info(n).block == block]
    inside = set(nodes)
    entering = next(a for n in nodes for a in n.all_input_nodes if a not in inside)
    leaving = next(n for n in nodes if any(u not in inside for u in n.users))
    em = _Emitter()
    body = [em.line(n) for n in nodes]
    src = "\n".join(sorted(em.imports) + list(em.consts.values())
                    + [f"def block({entering.name}, ops, comm, W, caches, step):"] + body + [f"    return {leaving.name}"])
    return src, entering.name


def _caches(graph: fx.Graph, block: str, B: int, T: int, dtype: torch.dtype) -> dict:
    caches = {}
    for fqn, spec in cache_specs(graph).items():
        if fqn.startswith(block):
            if spec["kind"] == "mla":
                caches[fqn] = MlaCache(torch.zeros(B, T, spec["ckv"], dtype=dtype), torch.zeros(B, T, spec["kpe"], dtype=dtype))
            else:
                shape = (B, T, spec["kv_heads"], spec["head_dim"])
                caches[fqn] = GqaCache(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
    return caches


def run_block(graph: fx.Graph, ranks: list[dict], block: str, x: torch.Tensor, decode_steps: int = 0):
    """Prefill x[:, :-decode_steps] then decode the rest one token at a time, on every rank.
    Returns (rank 0's output over all positions, every rank's caches, every rank's output)."""
    src, _ = block_source(graph, block)
    namespace: dict = {}
    exec(compile(src, f"<block {block}>", "exec"), namespace)
    B, S, _ = x.shape
    spans = [(0, S - decode_steps)] + [(S - decode_steps + i, S - decode_steps + i + 1) for i in range(decode_steps)]

    def rank_fn(comm):
        W, caches = Weights(ranks[comm.rank]), _caches(graph, block, B, S, x.dtype)
        outs = []
        for start, stop in spans:
            step = Step(start, torch.arange(start, stop).expand(B, -1), torch.ones(B, S, dtype=torch.bool))
            outs.append(namespace["block"](x[:, start:stop], Ops(), comm, W, caches, step))
        return torch.cat(outs, dim=1), caches

    results = run_threads(rank_fn, len(ranks))
    return results[0][0], [c for _, c in results], [o for o, _ in results]


def leaves_lifted_graph_alone(name: str, run) -> None:
    """`run()` (compiles of bundled model `name`) leaves its cached lifted graph as it was: passes
    copy before they rewrite."""
    before = format_graph(lifted(name))
    run()
    assert format_graph(lifted(name)) == before


def reference(name: str, fqn: str, x: torch.Tensor) -> torch.Tensor:
    """Block `fqn` of bundled model `name` on x, by its semantic reference (the lift check's)."""
    block = next(b for b in recognize(model(name)) if b.fqn == fqn)
    return run_reference(block, x, block_weights(model(name), fqn))


def ranks_reproduce(graph: fx.Graph, ranks: list[dict], name: str, fqn: str) -> None:
    """Block `fqn` run on every rank gives its reference's output on a random prompt (fp32: the ranks
    sum partials in another order), and every rank the same."""
    x = torch.randn(2, 5, model(name).config.hidden_size)
    got, _, outs = run_block(graph, ranks, fqn, x)
    torch.testing.assert_close(got, reference(name, fqn, x), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(o, outs[0]) for o in outs)


def plan(devices: int, *rules: str, dtype: str = "float32", source: str = "tiny-deepseek") -> str:
    body = "".join(f"\n  - {r}" for r in rules)
    return f"version: 1\nmesh: {{devices: {devices}}}\nmodel: {{source: {source}, dtype: {dtype}}}\nrules:{body}\n"


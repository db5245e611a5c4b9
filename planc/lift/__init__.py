"""Lift: captured aten graph -> semantic graph (one node per recognized block).

    captured: embedding, aten.mm, aten.rsqrt, ... (~700 nodes for a 4-layer model)
    lifted:   h = embedding(ids); x = rmsnorm(h); a = mla_attention(x); h_1 = add(h, a); ...

Recognition is structural (planc.lift.recognize) and each block is confirmed numerically against
the captured subgraph (planc.lift.check) unless the model lives on the meta device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from planc.capture import Captured, module_fqns
from planc.errors import CompileError
from planc.lift.check import Check, check_blocks
from planc.lift.graph import build_graph
from planc.lift.recognize import Block, recognize


@dataclass
class Lifted:
    graph: fx.Graph
    blocks: list[Block]
    checks: list[Check]  # empty when the model is on meta (nothing to run)


def lift(model: nn.Module, captured: Captured, *, check: bool = True) -> Lifted:
    blocks = recognize(model)
    missing = [b.fqn for b in blocks if b.kind != "lm_head" and b.fqn not in module_fqns(captured.program)]
    if missing:
        raise CompileError(f"recognized blocks never ran in the captured graph: {', '.join(missing[:4])}")
    checks = check_blocks(model, captured.module, blocks, captured.args, captured.kwargs) if check else []
    failed = [c for c in checks if not c.ok]
    if failed:
        lines = "\n".join(f"  {c.fqn}: {c.reason}" for c in failed)
        raise CompileError(f"lift declined for {len(failed)} block(s); the semantic op does not reproduce "
                           f"the captured graph:\n{lines}")
    return Lifted(build_graph(blocks, model), blocks, checks)

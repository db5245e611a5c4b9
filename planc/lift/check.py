"""Check each lifted block against the captured graph, on random token ids.

The captured (exported) graph is interpreted once; for every block we record the activation
entering it and the value leaving it — found from `nn_module_stack`, not assumed — and run the
block's semantic reference on the recorded input (for a block run as captured, the function the
program will run). A block whose reference disagrees is declined with the numbers. Residual
wiring is checked the same way: a layer's input plus its attention branch's output (after a
post-norm where the layer has one) must equal what enters the feed-forward branch; and so are the
junctions between blocks (embedding -> first layer, each norm -> its block, each block -> its
post-norm, layer -> next layer, final norm -> lm_head -> logits), with the constants
planc.lift.glue read there.

Only one layer per structure is captured (planc.lift.structure): its blocks are checked as above,
on their own weights ("numeric"); every other layer's blocks are recorded as "structural" checks
against that representative, whose structure they equal.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from planc import progress
from planc.ops import GqaCache, MlaCache, Ops, Step
from planc.lift.glue import Glue, Junctions, Scale
from planc.lift.recognize import CAPTURED, Block, Branch, layer_branches
from planc.weights import ROTARY_TENSORS, named_tensors, scoped

# fp64 is loose because transformers computes RMSNorm in fp32 whatever the model dtype.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@dataclass(frozen=True)
class Check:
    fqn: str
    ok: bool
    rel_err: float | None  # None for a structural check: nothing was run
    reason: str = ""
    method: str = "numeric"  # or "structural"
    against: str | None = None  # the representative's check a structural one stands on


def _stack_fqns(node: fx.Node) -> set[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return {fqn.removeprefix("L['self'].") for fqn, _cls in stack.values()}


def _boundary(graph: fx.Graph, fqn: str, stacks: dict[fx.Node, set[str]] | None = None
              ) -> tuple[fx.Node | None, fx.Node | None]:
    """(activation entering the block, value leaving it) in the captured graph."""
    stacks = stacks if stacks is not None else _stacks(graph)
    inside = [n for n, fqns in stacks.items() if fqn in fqns]
    members = set(inside)
    entering = [a for n in inside for a in n.all_input_nodes if a not in members and a.op != "get_attr"]
    leaving = [n for n in inside if any(u not in members for u in n.users)]
    return (_pick_activation(entering), _pick_activation(leaving, last=True))


def _stacks(graph: fx.Graph) -> dict[fx.Node, set[str]]:
    """The module FQNs each compute node of the captured graph runs inside."""
    return {n: _stack_fqns(n) for n in graph.nodes if n.op in ("call_function", "call_method")}


def junctions(graph: fx.Graph, blocks: list[Block]) -> Junctions:
    """Where the captured blocks meet in `graph`: each block's boundary values, and each layer's
    following block (the next held layer's input norm, or the final norm) with its boundary too."""
    stacks = _stacks(graph)
    bounds = {b.fqn: _boundary(graph, b.fqn, stacks) for b in blocks}
    layers = [(b.layer, b.fqn.rsplit(".", 1)[0]) for b in blocks if b.kind in ("mla_attention", "gqa_attention")]
    norm = next((b.fqn for b in blocks if b.layer is None and b.kind not in ("embedding", "lm_head")), "")
    branches = layer_branches(blocks)
    following = _following(stacks, layers, norm, branches)
    for fqn in following.values():
        bounds.setdefault(fqn, _boundary(graph, fqn, stacks))
    embedding = next((b.fqn for b in blocks if b.kind == "embedding"), "")
    head = next((b.fqn for b in blocks if b.kind == "lm_head"), "")
    return Junctions(bounds, layers, following, embedding, norm, head, branches)


def _pick_activation(nodes: list[fx.Node], last: bool = False) -> fx.Node | None:
    """The [B, S, ...] token tensor among a block's boundary values (cos/sin and masks are not)."""
    seen = list(dict.fromkeys(nodes))
    cands = [n for n in seen if _is_token_tensor(n)]
    if not cands:
        return None
    return cands[-1] if last else cands[0]


def _is_token_tensor(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dim() in (2, 3) and not (val.dim() == 3 and val.shape[0] == 1 and val.dtype == torch.bool)


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: set[fx.Node]):
        super().__init__(gm)
        self.wanted, self.values = wanted, {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n in self.wanted:
            self.values[n] = out
        return out


def block_weights(model: nn.Module, fqn: str) -> dict[str, torch.Tensor]:
    named = named_tensors(model)
    weights = scoped(named, fqn)
    return weights | {short: named[name] for name, short in ROTARY_TENSORS.items() if name in named}


def run_reference(block: Block, x: torch.Tensor, W: dict[str, torch.Tensor], ops: Ops | None = None) -> torch.Tensor:
    """Run `block`'s semantic op on a whole prompt from position 0 (no prior cache)."""
    ops = ops or Ops()
    if block.kind == "embedding":
        scale = block.attrs.get("scale")
        return ops.embedding(x, W["weight"]) if scale is None else scale.apply(ops.embedding(x, W["weight"]))
    if block.kind == "rmsnorm":
        return ops.rmsnorm(x, W["weight"], block.attrs["eps"], block.attrs.get("offset", 0.0))
    if block.kind == "lm_head":
        return ops.linear(x, W["weight"], W.get("bias"))
    if block.kind == "mlp":
        return ops.mlp(x, W, block.attrs["act"], block.attrs.get("limit"), block.attrs.get("alpha", 1.0))
    if block.kind == "moe":
        return ops.moe(x, W, block.dims, block.attrs["act"], block.attrs["shared"], block.attrs["shared_gate"],
                       block.attrs["layout"])
    if block.kind == CAPTURED:  # the function program.py will run (planc.lift.captured)
        return block.dims.run(x, W)
    B, S, _ = x.shape
    step = Step(0, torch.arange(S).expand(B, S), torch.ones(B, S, dtype=torch.bool))
    d = block.dims
    if block.kind == "mla_attention":
        cache = MlaCache(x.new_zeros(B, S, d.kv_lora_rank), x.new_zeros(B, S, d.rope_dim))
        return ops.mla_attention(x, step, cache, W, d)
    cache = GqaCache(x.new_zeros(B, S, d.num_kv_heads, d.head_dim), x.new_zeros(B, S, d.num_kv_heads, d.head_dim))
    return ops.gqa_attention(x, step, cache, W, d)


def unflattened(out: object, x: object) -> object:
    """A block's output [B S, D] as its input's shape [B, S, D], as the decoder layer views it back."""
    if isinstance(out, torch.Tensor) and isinstance(x, torch.Tensor) and out.dim() == 2 and x.dim() == 3 \
            and out.shape == (x.shape[0] * x.shape[1], x.shape[2]):
        return out.view(x.shape)
    return out


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().max().item() + 1e-6
    return (got.double() - want.double()).abs().max().item() / scale


def check_blocks(model: nn.Module, gm: fx.GraphModule, blocks: list[Block], example_args: tuple, example_kwargs: dict,
                 glue: Glue | None = None, found: Junctions | None = None) -> list[Check]:
    """Every block against the captured graph, then the residual wiring and the junctions between
    blocks, with the scales `glue` read at them (planc.lift.glue); `found`: junctions(gm.graph,
    blocks), where the caller has them already."""
    glue, found = glue or Glue(), found or junctions(gm.graph, blocks)
    bounds = found.bounds
    wanted = {n for pair in bounds.values() for n in pair if n is not None}
    rec = _Recorder(gm, wanted)
    with torch.no_grad():
        out = rec.run(*example_args, *example_kwargs.values())
        for entering, leaving in bounds.values():  # a block returning its tokens flattened (Llama 4's MoE)
            if entering is not None and leaving is not None:
                rec.values[leaving] = unflattened(rec.values[leaving], rec.values[entering])
        checked = [_check_one(model, b, bounds[b.fqn], rec.values) for b in progress.track(blocks, "lift checks", "blocks")]
        return (checked + _check_residuals(blocks, found, rec.values, glue)
                + _check_glue(found, rec.values, out, glue))


def _check_one(model: nn.Module, block: Block, bound, values) -> Check:
    entering, leaving = bound
    if entering is None or leaving is None:
        return Check(block.fqn, False, float("nan"), "no block boundary found in the captured graph (module not called?)")
    x, want = values[entering], values[leaving]
    try:
        got = run_reference(block, x, block_weights(model, block.fqn))
    except Exception as exc:  # the block is laid out in a way its semantic op does not cover
        return Check(block.fqn, False, float("nan"), f"reference cannot run on the captured input: "
                     f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    if got.shape != want.shape:
        return Check(block.fqn, False, float("nan"), f"reference shape {tuple(got.shape)} != captured {tuple(want.shape)}")
    err = _rel_err(got, want)
    tol = TOLERANCE.get(want.dtype, 1e-4)
    return Check(block.fqn, err <= tol, err, "" if err <= tol else f"reference differs from the captured subgraph: rel err {err:.2e} > {tol:.0e}")


def _check_residuals(blocks: list[Block], j: Junctions, values, glue: Glue) -> list[Check]:
    """h_in + the attention branch's output (scaled as glue says) == what enters the feed-forward
    branch, for every layer; for parallel branches, h_in + both outputs == what enters the next
    layer (the block after it)."""
    checks, bounds = [], j.bounds
    for b in blocks:
        if b.kind not in ("mla_attention", "gqa_attention"):
            continue
        lp = b.fqn.rsplit(".", 1)[0]
        attention, mlp = j.branches[lp]
        h_in = bounds[attention.first][0]
        attn_out = bounds[attention.last][1]
        mlp_out = bounds[mlp.last][1] if mlp.parallel else None
        post_in = bounds.get(j.following.get(lp, ""), (None, None))[0] if mlp.parallel else bounds[mlp.first][0]
        if None in (h_in, attn_out, post_in) or (mlp.parallel and mlp_out is None):
            checks.append(Check(f"{lp} (residual)", False, float("nan"), "layer boundary values not found"))
            continue
        branch = glue.attention_branch(b.layer)
        out = values[attn_out] if branch is None else branch.apply(values[attn_out])
        if mlp.parallel:
            mlp_branch = glue.mlp_branch(b.layer)
            out = out + (values[mlp_out] if mlp_branch is None else mlp_branch.apply(values[mlp_out]))
        err = _rel_err(values[h_in] + out, values[post_in])
        checks.append(Check(f"{lp} (residual)", err <= 1e-6, err, "" if err <= 1e-6 else f"residual wiring differs: {err:.2e}"))
    return checks


def _following(stacks: dict[fx.Node, set[str]], layers: list[tuple[int, str]], final: str,
               branches: dict[str, tuple[Branch, ...]]) -> dict[str, str]:
    """Each checked layer -> the block its output enters in the captured graph: the first block of
    the next layer the graph holds (its input norm, or its attention where it has none; one layer
    per structure under torch.export, all under Dynamo), or the final norm after the last."""
    if not layers:
        return {}
    prefix = layers[0][1].rsplit(".", 1)[0]  # model.layers
    present = sorted({int(fqn[len(prefix) + 1:].split(".", 1)[0]) for fqns in stacks.values() for fqn in fqns
                      if fqn.startswith(f"{prefix}.") and fqn[len(prefix) + 1:].split(".", 1)[0].isdigit()})
    out = {}
    for index, fqn in layers:
        later = [j for j in present if j > index]
        name = branches[fqn][0].first.rsplit(".", 1)[1]  # the same in every layer
        out[fqn] = f"{prefix}.{later[0]}.{name}" if later else final
    return out


def _check_glue(j: Junctions, values, out, glue: Glue) -> list[Check]:
    """What flows between blocks: the embedding's output is the first layer's input, each norm's
    output its block's input, each layer's h + mlp_out the next one's (or the final norm's), the
    final norm's output lm_head's input, and lm_head's output the logits, each as is or
    scaled by the constant `glue` read there. Anything else a model does between its blocks fails here."""
    if not j.layers or "" in (j.embedding, j.norm, j.head):
        return [Check("model (glue)", False, float("nan"), "embedding, layers, final norm or lm_head not found")]

    def value(fqn: str, side: int, scale: Scale | None = None):
        node = j.value_node(fqn, side)
        found = None if node is None else values.get(node)
        return found if found is None or scale is None else scale.apply(found)

    def compare(name: str, got, want, what: str) -> Check:
        if got is None or want is None:
            return Check(name, False, float("nan"), f"{what}: boundary values not found")
        if got.shape != want.shape:
            return Check(name, False, float("nan"), f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}")
        err = _rel_err(got, want)
        return Check(name, err <= 1e-6, err, "" if err <= 1e-6 else f"{what} differs: {err:.2e} (the model transforms it "
                     "between blocks in a way planc does not reproduce)")

    checks = [compare(f"{j.embedding} (glue)", value(j.embedding, 1, glue.embedding),
                      value(j.branches[j.layers[0][1]][0].first, 0), "the embedding's output as the first layer's input")]
    for index, lp in j.layers:
        attention, mlp = j.branches[lp]
        for b in (attention, mlp):
            if b.pre:
                checks.append(compare(f"{b.block} (glue)", value(b.pre, 1), value(b.block, 0),
                                      f"{b.pre}'s output as {b.block}'s input"))
            if b.post:
                checks.append(compare(f"{b.post} (glue)", value(b.block, 1), value(b.post, 0),
                                      f"{b.block}'s output as {b.post}'s input"))
        if mlp.parallel:  # h + both branches' outputs as the next block's input: the layer's residual check
            continue
        after = j.following[lp]
        mid, branch_out = value(mlp.first, 0), value(mlp.last, 1, glue.mlp_branch(index))
        summed = None if mid is None or branch_out is None or mid.shape != branch_out.shape else mid + branch_out
        checks.append(compare(f"{lp} (glue)", summed, value(after, 0),
                              f"h + the feed-forward branch's output as {after}'s input"))
    checks.append(compare(f"{j.norm} (glue)", value(j.norm, 1, glue.head_input), value(j.head, 0),
                          "the final norm's output as lm_head's input"))
    logits = next((t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.dim() == 3), None)
    checks.append(compare(f"{j.head} (glue)", value(j.head, 1, glue.logits), logits, "lm_head's output as the logits"))
    return checks


def structural_checks(blocks: list[Block], representative: dict[int, int]) -> list[Check]:
    """One check per block (and one residual check per layer) of each layer that was not
    captured, against the same check of its representative layer."""
    checks = []
    for b in blocks:
        rep = representative.get(b.layer, b.layer)
        if rep == b.layer:
            continue
        layer, name = b.fqn.rsplit(".", 1)  # model.layers.5, self_attn
        theirs = f"{layer.rsplit('.', 1)[0]}.{rep}"
        checks.append(Check(b.fqn, True, None, method="structural", against=f"{theirs}.{name}"))
        if b.kind in ("mla_attention", "gqa_attention"):
            checks.append(Check(f"{layer} (residual)", True, None, method="structural", against=f"{theirs} (residual)"))
    return checks

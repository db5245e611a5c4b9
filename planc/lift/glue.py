"""What a decoder does between its blocks, read from the captured graph.

Most decoders hand each block's output on unchanged: the embedding's output is the first layer's
input, h + attention output enters the post-attention norm, h + MLP output the next layer, and
lm_head's output is the logits. Some scale these by constants outside their modules (Granite:
`embedding_multiplier`, `residual_multiplier`, `logits_scaling` after lm_head; MiniCPM3 divides
the final norm's output by `logits_scaling` before it): the captured graph then has one `mul` or
`div` by a number at the junction, and the lifted graph reproduces it (the embedding node's scale,
the residual adds' scale on their branch, a `scale` node before or after lm_head). Gemma 2 caps
its logits (`final_logit_softcapping` c: div by c, tanh, mul by c), read the same way.

Anything else at a junction is left for the lift's glue checks to refuse with the numbers.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.fx as fx

from planc.ops import softcap

if TYPE_CHECKING:  # recognize imports this module
    from planc.lift.recognize import Branch

Bounds = dict[str, tuple[fx.Node | None, fx.Node | None]]  # block FQN -> (entering, leaving)

# export's aten ops, Dynamo's Python operators and torch functions, and Tensor methods
MUL = (torch.ops.aten.mul.Tensor, torch.ops.aten.mul.Scalar, operator.mul, torch.mul, "mul")
DIV = (torch.ops.aten.div.Tensor, torch.ops.aten.div.Scalar, operator.truediv, torch.div, "div")
ADD = (torch.ops.aten.add.Tensor, operator.add, torch.add, "add")
TANH = (torch.ops.aten.tanh.default, torch.tanh, "tanh")
COMPUTE = ("call_function", "call_method")


@dataclass(frozen=True)
class Junctions:
    """Where a captured decoder's blocks meet (planc.lift.check.junctions builds it): each block's
    boundary values, the layers the graph holds as (index, FQN), what each layer's output enters
    (the next held layer's first block, or the final norm), the embedding, final norm and lm_head
    FQNs ("" where the blocks have none), and each layer's two residual branches."""

    bounds: Bounds
    layers: list[tuple[int, str]]
    following: dict[str, str]
    embedding: str
    norm: str
    head: str
    branches: dict[str, tuple[Branch, ...]]  # layer FQN -> its branches' FQNs (the attention's, the feed-forward's)

    def value_node(self, fqn: str, side: int) -> fx.Node | None:
        """The node entering (side 0) or leaving (side 1) block `fqn`, None where there is none."""
        return self.bounds.get(fqn, (None, None))[side]


@dataclass(frozen=True)
class Scale:
    """x * by, or x / by: how the program scales a value (the captured graph's own operation, so
    the result is bitwise the model's)."""

    op: Literal["mul", "div"]
    by: float

    def emit(self, x: str) -> str:
        return f"{x} {'*' if self.op == 'mul' else '/'} {self.by!r}"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.by if self.op == "mul" else x / self.by

    def __str__(self) -> str:
        return f"{'×' if self.op == 'mul' else '÷'}{self.by:g}"


@dataclass(frozen=True)
class Softcap:
    """cap · tanh(x / cap) (Gemma 2's final logits), as the captured graph computes it."""

    cap: float

    def emit(self, x: str) -> str:
        return f"ops.softcap({x}, {self.cap!r})"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return softcap(x, self.cap)

    def __str__(self) -> str:
        return f"softcap {self.cap:g}"


@dataclass(frozen=True)
class Glue:
    """The scales at a decoder's junctions (None: passed on unchanged). residual: per layer,
    (attention branch, MLP branch); head_input: between the final norm and lm_head; logits: after
    lm_head."""

    embedding: Scale | None = None
    residual: dict[int, tuple[Scale | None, Scale | None]] | None = None
    logits: Scale | Softcap | None = None
    head_input: Scale | None = None

    def attention_branch(self, layer: int) -> Scale | None:
        return (self.residual or {}).get(layer, (None, None))[0]

    def mlp_branch(self, layer: int) -> Scale | None:
        return (self.residual or {}).get(layer, (None, None))[1]


def _whole(node: fx.Node) -> fx.Node:
    """`node` without the no-op views above it: export's alias, and indexing by whole slices
    (what `hidden[:, slice(0, None), :]` before lm_head becomes)."""
    while node.op in COMPUTE and node.args and isinstance(node.args[0], fx.Node) and (
            node.target is torch.ops.aten.alias.default
            or (node.target is operator.getitem and isinstance(node.args[1], tuple)
                and all(i == slice(None) or i == slice(0, None) for i in node.args[1]))):
        node = node.args[0]
    return node


def scaled(node: fx.Node | None, source: fx.Node | None) -> Scale | None | bool:
    """How `node` is `source`: True when it is the same node (through no-op views), a Scale when it
    is source * c or source / c for a number c, False otherwise."""
    if node is None or source is None:
        return False
    node = _whole(node)
    if node is source:
        return True
    if node.op not in COMPUTE or len(node.args) != 2 or node.args[0] is not source or node.kwargs:
        return False
    by = node.args[1]
    if not isinstance(by, (int, float)) or isinstance(by, bool):
        return False
    if node.target in MUL:
        return Scale("mul", float(by))
    if node.target in DIV:
        return Scale("div", float(by))
    return False


def softcapped(node: fx.Node, source: fx.Node) -> Softcap | None:
    """Softcap(c) when `node` starts source / c -> tanh -> * c (each the only user of the one
    before), else None."""
    divided = scaled(node, source)
    if not isinstance(divided, Scale) or divided.op != "div" or len(node.users) != 1:
        return None
    tanh = next(iter(node.users))
    if tanh.op not in COMPUTE or tanh.target not in TANH or tanh.args[:1] != (node,) or len(tanh.users) != 1:
        return None
    times = scaled(next(iter(tanh.users)), tanh)
    return Softcap(divided.by) if isinstance(times, Scale) and times.op == "mul" and times.by == divided.by else None


def branch(summed: fx.Node | None, out: fx.Node | None) -> Scale | None | bool:
    """How `summed` adds a block's output to the residual stream: stream + out (True), stream +
    out * c (a Scale), or something else (False). The stream's side is the residual check's to
    confirm, numerically (the captured graph may cast it first)."""
    if summed is None or summed.op not in COMPUTE or summed.target not in ADD or len(summed.args) != 2 or summed.kwargs:
        return False
    found = [scaled(arg, out) for arg in summed.args if isinstance(arg, fx.Node)]
    return next((f for f in found if f is not False), False)


def read_glue(j: Junctions) -> Glue:
    """The scales at each junction that is one mul / div by a number in the captured graph (the
    others stay None and the glue checks judge them)."""
    def only_scale(found: Scale | None | bool) -> Scale | None:
        return found if isinstance(found, Scale) else None

    first = j.branches[j.layers[0][1]][0].first if j.layers else ""
    emb = only_scale(scaled(j.value_node(first, 0), j.value_node(j.embedding, 1)))
    residual = {}
    for index, lp in j.layers:
        attention, mlp = j.branches[lp]
        mid, after = j.value_node(mlp.first, 0), j.value_node(j.following.get(lp, ""), 0)
        attn_out, mlp_out = j.value_node(attention.last, 1), j.value_node(mlp.last, 1)
        if mlp.parallel:  # (h + attention output) + feed-forward output: the first sum is the second's other term
            mid = next((a for a in (after.args if after is not None and after.op in COMPUTE else ())
                        if isinstance(a, fx.Node) and a is not mlp_out), None)
        residual[index] = (only_scale(branch(mid, attn_out)), only_scale(branch(after, mlp_out)))
    head_input = only_scale(scaled(j.value_node(j.head, 0), j.value_node(j.norm, 1)))
    logits = None
    head_out = j.value_node(j.head, 1)
    if head_out is not None:
        users = [u for u in head_out.users if u.op != "output"]
        if len(users) == 1:
            logits = softcapped(users[0], head_out) or only_scale(scaled(users[0], head_out))
    return Glue(emb, residual if any(s != (None, None) for s in residual.values()) else None, logits, head_input)

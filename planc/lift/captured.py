"""Run as captured: a block planc does not recognize runs, replicated, as its own exported graph.

    model.layers.0.mlp (GeluMLP) --torch.export, batch and sequence dims dynamic--> aten graph
    --> program.py, once per layer structure:
            def captured_L0_mlp(x, W):
                fc1_weight = W['fc1.weight'];  fc1_bias = W['fc1.bias'] ...
                linear = torch.ops.aten.linear.default(x, fc1_weight, fc1_bias) ...
                return mul
        and once per layer:  m = captured_L0_mlp(x, W.scope('model.layers.3.mlp'))

The function is fx's own code for a rebuilt graph whose inputs are the activation `x` and the
block's tensors `W` (read by name, names only as literals). Only aten ops and arithmetic on sizes
may appear, so the program needs nothing but torch; a device the export baked in becomes
`x.device`. The program runs a block on a whole prompt, then one token at a time, so a block that
mixes tokens along the sequence (a convolution over time, a cumulative sum) cannot run this way:
that is checked on the block's own weights, every token alone against the whole sequence.

Legend: B batch, S tokens, D hidden.
"""
from __future__ import annotations

import ast
import builtins
import contextlib
import functools
import math
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
import torch.fx as fx
from torch import nn
from torch.export import Dim

from planc.capture import EXAMPLE_SHAPE
from planc.errors import ModelError
from planc.ir import Definition, info
from planc.lift.check import TOLERANCE, _rel_err
from planc.lift.recognize import CAPTURED, Block

OP_NAMESPACES = frozenset(("aten",))  # ops every rank process has without importing anything
SIZE_FUNCTIONS = frozenset(getattr(torch, name) for name in ("sym_float", "sym_int", "sym_max", "sym_min", "sym_not",
                                                              "sym_ite", "sym_sum") if hasattr(torch, name))
IMPORTS = {"torch": "import torch", "inf": "from math import inf", "nan": "from math import nan"}


@dataclass(frozen=True)
class CapturedDims:
    """A run-as-captured block's node: its function, why it was not lifted, and the node kinds
    planc lifts in its slot (the plan sections that would shard it)."""

    fn: Definition
    why: str
    lifts: tuple[str, ...]

    def run(self, x_BSD: torch.Tensor, W: dict[str, torch.Tensor]) -> torch.Tensor:
        return load(self.fn)(x_BSD, W)


def is_captured(block: Block) -> bool:
    return block.kind == CAPTURED


def captured_lines(blocks: list[Block]) -> list[str]:
    """The run-as-captured blocks, one line per class and reason (the compile log)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for b in blocks:
        if is_captured(b):
            groups.setdefault((b.cls, b.attrs["why"]), []).append(b.fqn)
    return [f"{', '.join(fqns[:3])}{f' and {len(fqns) - 3} more' if len(fqns) > 3 else ''} ({cls}): run as captured, "
            f"whole on every rank; {why}" for (cls, why), fqns in groups.items()]


def captured_nodes(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if "planc" in n.meta and isinstance(info(n).dims, CapturedDims)]


def with_code(model: nn.Module, blocks: list[Block], representative: dict[int, int]) -> list[Block]:
    """Every run-as-captured block with its function: exported for the first layer of each
    structure (and checked token by token when the model has weights), shared by the others."""
    emb = model.get_input_embeddings().weight
    gen = torch.Generator().manual_seed(0)
    x_BSD = torch.randn(*EXAMPLE_SHAPE, emb.shape[1], generator=gen).to(emb.device, emb.dtype)
    codes: dict[tuple, CapturedDims] = {}
    out = []
    for b in blocks:
        if is_captured(b):
            key = (representative.get(b.layer, b.layer), b.fqn.rsplit(".", 1)[-1])
            if key not in codes:
                codes[key] = CapturedDims(export_block(model.get_submodule(b.fqn), b.fqn, x_BSD), b.attrs["why"],
                                          b.attrs["lifts"])
            b = replace(b, dims=codes[key])
        out.append(b)
    return out


@contextlib.contextmanager
def _aten_experts(module: nn.Module) -> Iterator[None]:
    """Experts inside `module` computed with aten ops while it is exported: transformers' grouped_mm
    path (pinned for capture, planc.models.registry) calls a torch.ops.transformers kernel that a
    rank process could not import, its batched_mm path gathers each token's experts and runs bmm.
    The config is the model's own, so it is set back after."""
    configs = {id(c): c for m in module.modules() if (c := getattr(m, "config", None)) is not None
               and getattr(c, "_experts_implementation", None) == "grouped_mm"}
    for config in configs.values():
        config._experts_implementation = "batched_mm"
    try:
        yield
    finally:
        for config in configs.values():
            config._experts_implementation = "grouped_mm"


def export_block(module: nn.Module, fqn: str, x_BSD: torch.Tensor) -> Definition:
    """`module` as a function `(x, W) -> y` of readable source, for any batch and sequence length."""
    cls = type(module).__name__
    name = function_name(fqn)
    with _aten_experts(module):
        program = _export(module, fqn, x_BSD)
    graph = _rebuild(program, f"{fqn} ({cls})")
    fn = _definition(graph, name, [f"# {fqn!r} ({cls!r}) as torch.export captured it: planc did not lift it,",
                                   "# so every rank runs it whole on every token."])
    if x_BSD.device.type != "meta":
        weights = dict(module.named_parameters()) | dict(module.named_buffers())
        check_token_wise(load(fn), weights, x_BSD, f"{fqn} ({cls})")
    return fn


def function_name(fqn: str) -> str:
    """'model.layers.0.mlp' -> 'captured_L0_mlp' (an identifier whatever the FQN holds)."""
    where = fqn.replace("model.layers.", "L")
    return "captured_" + "".join(ch if ch.isascii() and ch.isalnum() else "_" for ch in where)


def _export(module: nn.Module, fqn: str, x_BSD: torch.Tensor) -> torch.export.ExportedProgram:
    dynamic = ({0: Dim.DYNAMIC, 1: Dim.DYNAMIC},)  # batch and sequence: prefill and decode (S = 1)
    try:
        with torch.no_grad():
            return torch.export.export(module, (x_BSD,), dynamic_shapes=dynamic, strict=False)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else ""
        raise ModelError(f"{fqn} ({type(module).__name__}): cannot run as captured: torch.export (non-strict) of it on "
                         f"an activation [B, S, D] with batch and sequence dynamic failed: {type(exc).__name__}: "
                         f"{first}. Its forward must take the hidden states alone and work for any B and S") from exc


def _rebuild(program: torch.export.ExportedProgram, where: str) -> fx.Graph:
    """The exported graph as `(x, W) -> y`: parameters and buffers become `W['<name>']`."""
    sig = program.graph_signature
    if sig.buffers_to_mutate or getattr(sig, "user_inputs_to_mutate", None):
        raise ModelError(f"{where}: cannot run as captured: its forward writes to a buffer or its input, "
                         "and a captured block must be a pure function of the hidden states")
    tensors = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    g = fx.Graph()
    x, W = (g.create_node("placeholder", name, name=name) for name in ("x", "W"))
    env: dict[fx.Node, fx.Node] = {}
    device: list[fx.Node] = []  # `x.device`, made when first needed

    def arg(a: object) -> object:
        if isinstance(a, fx.Node):
            return env[a]
        if isinstance(a, torch.device):
            if not device:
                device.append(g.create_node("call_function", getattr, (x, "device"), name="x_device"))
            return device[0]
        return a

    for node in program.graph.nodes:
        if node.op == "call_function":
            _check_target(node, where)
    for node in program.graph.nodes:
        if node.op == "placeholder":
            env[node] = _input(g, node, tensors, sig.user_inputs, x, W, where)
        elif node.op == "call_function":
            args, kwargs = fx.node.map_aggregate((node.args, node.kwargs), arg)
            env[node] = g.create_node("call_function", node.target, args, kwargs, name=node.name)
        elif node.op == "output":
            g.output(_hidden_output(node, program, where, env, x))
        else:
            raise ModelError(f"{where}: cannot run as captured: its graph has a {node.op} node ({node.target}); "
                             "planc emits graphs of aten calls only")
    return g


def _input(g: fx.Graph, node: fx.Node, tensors: dict[str, str], user_inputs, x: fx.Node, W: fx.Node, where: str) -> fx.Node:
    if node.name in tensors:
        name = tensors[node.name]
        return g.create_node("call_function", operator.getitem, (W, name), name=name.replace(".", "_"))
    if node.name == user_inputs[0]:
        return x
    raise ModelError(f"{where}: cannot run as captured: its forward makes a tensor constant ({node.name}) that is "
                     "neither a parameter nor a buffer; register it as a buffer so it travels with the weights")


def _hidden_output(node: fx.Node, program: torch.export.ExportedProgram, where: str,
                   env: dict[fx.Node, fx.Node], x: fx.Node) -> fx.Node:
    """The block's output: its only one, or the first of several when that one has the input's
    shape (gpt-oss's MLP also returns its router's logits, which the layer drops; the lift's
    residual and junction checks confirm the first is what the layer adds), or its tokens
    flattened (Llama 4's MoE), viewed back to the input's shape as the layer views it."""
    outs, sig = node.args[0], program.graph_signature
    first = outs[0] if outs and isinstance(outs[0], fx.Node) else None
    shape = None if first is None else _shape_of_input(first, program)
    if first is None or len(sig.user_outputs) < 1 or (len(outs) > 1 and shape is None):
        raise ModelError(f"{where}: cannot run as captured: its forward returns {len(sig.user_outputs)} values and "
                         "the first is not the hidden states; a block in a decoder layer's slot must return them "
                         "(alone, or first)")
    if shape == "flat":  # [B S, D] (Llama 4's MoE; the layer views it back): the input's shape again
        g = x.graph
        size = g.create_node("call_function", getattr, (x, "shape"), name="x_shape")
        return g.create_node("call_function", torch.ops.aten.reshape.default, (env[first], size), name="unflat")
    return env[first]


def _shape_of_input(node: fx.Node, program: torch.export.ExportedProgram) -> str | None:
    """"same" when `node` has the block input's shape [B, S, D], "flat" when it has its tokens
    flattened, [B S, D]; None otherwise."""
    x = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == program.graph_signature.user_inputs[0])
    want, got = x.meta.get("val"), node.meta.get("val")
    if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor):
        return None
    if [str(d) for d in got.shape] == [str(d) for d in want.shape]:
        return "same"
    if want.dim() == 3 and got.dim() == 2 and str(got.shape[1]) == str(want.shape[2]) and \
            str(got.shape[0]) == str(want.shape[0] * want.shape[1]):
        return "flat"
    return None


def _check_target(node: fx.Node, where: str) -> None:
    target = node.target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        if target.namespace in OP_NAMESPACES:
            return
        raise ModelError(f"{where}: cannot run as captured: it calls torch.ops.{target.namespace} "
                         f"({target}), which the rank processes would have to import; planc runs captured "
                         f"blocks made of {', '.join(sorted(OP_NAMESPACES))} ops")
    if getattr(target, "__module__", None) in ("_operator", "math") or target in SIZE_FUNCTIONS:
        return  # arithmetic on sizes and indexing of an op's outputs
    raise ModelError(f"{where}: cannot run as captured: node {node.name} calls {getattr(target, '__name__', target)!s} "
                     f"(a {type(target).__name__}), not an aten op; planc emits aten ops and size arithmetic only")


class _FunctionCode(fx.graph.CodeGen):
    """fx's code generation for a free function `name(x, W)`, without the `v = None` frees."""

    def __init__(self, name: str):
        super().__init__()
        self._func_name = name
        self._body_transformer = lambda body: ["\n" if part.startswith(";") else part for part in body]

    def gen_fn_def(self, free_vars: list[str], maybe_return_annotation: str, *, expanded_def: bool = False) -> str:
        return f"def {self._func_name}({', '.join(free_vars)}):"


def _definition(graph: fx.Graph, name: str, comments: list[str]) -> Definition:
    graph.set_codegen(_FunctionCode(name))
    code = graph.python_code(root_module="self")
    head, _, body = code.src.strip("\n").partition("\n")
    source = "\n".join([head, *(f"    {c}" for c in comments), body.rstrip()]) + "\n"
    return Definition(name, source, _imports(source, code.globals, name))


def _imports(source: str, names: dict, fn: str) -> tuple[str, ...]:
    """The import lines of the names `source` reads from outside the function."""
    tree = ast.parse(source).body[0]
    local = {a.arg for a in tree.args.args} | {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)
                                               and isinstance(n.ctx, ast.Store)}
    free = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} - local - set(dir(builtins))
    lines = []
    for name in sorted(free):
        obj = names.get(name)
        if name in IMPORTS:
            lines.append(IMPORTS[name])
        elif getattr(obj, "__module__", None) in ("_operator", "math"):
            module = "operator" if obj.__module__ == "_operator" else "math"
            lines.append(f"from {module} import {obj.__name__}" + (f" as {name}" if name != obj.__name__ else ""))
        else:
            raise AssertionError(f"{fn}: generated code reads {name!r}, which planc does not import")
    return tuple(lines)


@functools.lru_cache(maxsize=None)
def load(fn: Definition) -> Callable[..., torch.Tensor]:
    """The function `fn` defines, as program.py will run it."""
    namespace: dict = {}
    exec("\n".join(fn.imports), namespace)  # noqa: S102  (planc's own generated code)
    exec(compile(fn.source, f"<planc {fn.name}>", "exec"), namespace)  # noqa: S102
    return namespace[fn.name]


def check_token_wise(run: Callable, W: dict[str, torch.Tensor], x_BSD: torch.Tensor, where: str) -> None:
    """The program runs a block on a whole prompt, then one token at a time (decode, S = 1), and
    a batch of any size: every token alone, and the first sequence alone, must give what the
    whole batch gives."""
    with torch.no_grad():
        whole = run(x_BSD, W)
        alone = torch.cat([run(x_BSD[:, t:t + 1], W) for t in range(x_BSD.shape[1])], dim=1)
        first = run(x_BSD[:1], W)
    tol = TOLERANCE.get(whole.dtype, 1e-4)
    for label, got, want in (("each token alone", alone, whole), ("one sequence alone", first, whole[:1])):
        err = _rel_err(got, want) if got.shape == want.shape else math.inf
        if not err <= tol:
            raise ModelError(f"{where}: cannot run as captured: it mixes tokens ({label} gives a different result "
                             f"than the whole batch: rel err {err:.2e} > {tol:.0e}). planc runs an unrecognized block "
                             "on a whole prompt and then one token at a time, so it must act on each token alone; "
                             "a block that mixes tokens needs a recognizer in planc.lift.recognize")

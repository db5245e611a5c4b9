"""Run-as-captured blocks: the exported graph as readable code that reproduces the module at any
batch and length; what cannot run that way is refused by name; lift, bind and the attention slot."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from planc.bind import bind
from planc.errors import ModelError, PlanError
from planc.ir import info
from planc.lift import lift
from planc.lift.captured import captured_nodes, export_block, load
from planc.lift.recognize import recognize
from planc.plan import parse_plan_text
from tests.e2e.test_unrecognized_block import gelu_llama

FQN = "model.layers.0.mlp"
HIDDEN = 16


class NormedSwiGLU(nn.Module):
    """A SwiGLU whose gate and up share one projection, with a LayerNorm before the down projection."""

    def __init__(self, inner: int = 24):
        super().__init__()
        self.w_in = nn.Linear(HIDDEN, 2 * inner, bias=False)
        self.norm = nn.LayerNorm(inner)
        self.w_out = nn.Linear(inner, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(self.norm(nn.functional.silu(gate) * up))


class ShortConv(nn.Module):
    """A causal depthwise convolution over time (as in Mamba-style blocks): it mixes tokens."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(HIDDEN, HIDDEN, 3, groups=HIDDEN, padding=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)


class Branchy(nn.Module):
    """Data-dependent control flow: export keeps it as torch.cond, a higher-order op."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cond(x.sum() > 0, lambda t: t * 2, lambda t: t - 1, (self.fc(x),))


@torch.library.custom_op("planc_test::twice", mutates_args=())
def twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@twice.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class OwnKernel(nn.Module):
    """Calls a custom op of its own library: the rank processes would not have it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return twice(self.fc(x))


class PaddedOnDevice(nn.Module):
    """Makes a tensor on the input's device: the export bakes that device in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.zeros(x.shape[0], x.shape[1], 1, dtype=x.dtype, device=x.device)


def _x(B: int, S: int) -> torch.Tensor:
    return torch.randn(B, S, HIDDEN, generator=torch.Generator().manual_seed(B * 100 + S))


def _weights(m: nn.Module) -> dict[str, torch.Tensor]:
    return dict(m.named_parameters()) | dict(m.named_buffers())


def test_source_is_readable_and_reproduces_the_module_at_any_batch_and_length():
    torch.manual_seed(0)
    module = NormedSwiGLU().eval()
    fn = export_block(module, FQN, _x(2, 8))
    lines = fn.source.splitlines()
    assert lines[0] == "def captured_L0_mlp(x, W):" and fn.imports == ("import torch",)
    assert "    w_in_weight = W['w_in.weight']" in lines and "    norm_bias = W['norm.bias']" in lines
    assert any(line.startswith("    layer_norm = torch.ops.aten.layer_norm.default(") for line in lines)
    assert lines[-1].startswith("    return ")
    assert "self" not in fn.source and "= None" not in fn.source and "File" not in fn.source
    run = load(fn)
    for B, S in [(1, 1), (3, 1), (1, 8), (3, 8)]:
        x = _x(B, S)
        with torch.no_grad():
            # the same aten calls in the same order as the module's own forward: bitwise equal
            assert torch.equal(run(x, _weights(module)), module(x)), (B, S)


def test_a_device_the_export_baked_in_becomes_the_inputs():
    fn = export_block(PaddedOnDevice(), FQN, _x(2, 8))
    assert "x_device = x.device" in fn.source and "device(type=" not in fn.source
    assert load(fn)(_x(3, 1), {}).shape == (3, 1, HIDDEN)


def test_a_block_that_mixes_tokens_is_refused():
    with pytest.raises(ModelError, match=r"model.layers.0.mlp \(ShortConv\): cannot run as captured: it mixes tokens "
                                         r"\(each token alone gives a different result than the whole batch"):
        export_block(ShortConv(), FQN, _x(2, 8))


@pytest.mark.parametrize("module, says", [
    (Branchy, r"node cond calls cond \(a CondOp\), not an aten op"),
    (OwnKernel, r"it calls torch.ops.planc_test \(planc_test.twice.default\), which the rank processes would have to import"),
])
def test_a_call_that_is_not_an_aten_op_is_refused(module, says):
    with pytest.raises(ModelError, match=rf"model.layers.0.mlp \({module.__name__}\): cannot run as captured: {says}"):
        export_block(module(), FQN, _x(2, 8))


@functools.cache
def _lifted():
    return lift(gelu_llama(), check=True)


def test_lift_runs_each_unrecognized_mlp_as_one_node_checked_against_the_captured_graph():
    lifted = _lifted()
    nodes = [n for n in captured_nodes(lifted.graph) if info(n).cls == "GeluMLP"]
    assert [info(n).fqn for n in nodes] == ["model.layers.1.mlp", "model.layers.2.mlp"]
    assert info(nodes[0]).dims is info(nodes[1]).dims  # one function for the layer structure
    assert info(nodes[0]).dims.lifts == ("mlp", "moe")
    checks = {c.fqn: c for c in lifted.checks}
    assert checks["model.layers.1.mlp"].ok and checks["model.layers.1.mlp"].rel_err <= 1e-6
    assert checks["model.layers.2.mlp"].against == "model.layers.1.mlp"


def _plan(*rules: str) -> str:
    body = "".join(f"\n  - {r}" for r in rules)
    return f"version: 1\nmesh: {{devices: 2}}\nrules:{body}\n"


def test_a_replicated_rule_takes_a_captured_block_and_a_moe_rule_cannot_shard_it():
    graph = _lifted().graph
    bound = bind(graph, parse_plan_text(_plan('match: "model.layers.2.mlp"\n    mlp: {strategy: replicated}'), "p.yaml"))
    assert [info(n).rule.index if info(n).rule else None for n in captured_nodes(bound)] == [None, 0, None]
    text = _plan('match: "model.layers.2.mlp"\n    mlp: {strategy: replicated}', 'match: "*.mlp"\n    moe: {strategy: ep}')
    with pytest.raises(PlanError, match=r"p.yaml:7:11: rules\[1\].moe.strategy 'ep' \(match '\*.mlp'\) asks to shard "
                                        r"model.layers.1.mlp \(GeluMLP\), which planc runs as captured"):
        bind(graph, parse_plan_text(text, "p.yaml"))


def test_an_unrecognized_attention_block_says_why_it_cannot_run_as_captured():
    model = gelu_llama()
    model.model.layers[0].self_attn = nn.Linear(32, 32)
    with pytest.raises(ModelError, match=r"model.layers.0.self_attn \(Linear\): not a recognized attention block; .*"
                                         r"It cannot run as captured either: attention keeps a KV cache"):
        recognize(model)

"""Capture: torch.export of plain modules and of causal LMs keeps module FQN and class per node;
a causal LM captured with some of its layers computes what a model of only those layers does."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, Qwen3Config

from planc.capture import capture, capture_module, example_ids, module_fqns
from planc.errors import ModelError


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


def test_plain_module_nodes_carry_their_module():
    model = nn.Sequential(Block(), Block())
    captured = capture_module(model, (torch.randn(3, 8),))
    assert {"0.up", "0.down", "1.up", "1.down"} <= module_fqns(captured.program)
    linears = [n for n in captured.program.graph.nodes if n.op == "call_function" and "linear" in str(n.target)]
    classes = {list(n.meta["nn_module_stack"].values())[-1][1] for n in linears}
    assert classes == {"torch.nn.modules.linear.Linear"}
    torch.testing.assert_close(captured.module(torch.ones(3, 8)), model(torch.ones(3, 8)))


def test_capture_needs_a_causal_lm():
    with pytest.raises(ModelError, match="not a causal LM"):
        capture(nn.Linear(2, 2))


def test_export_failure_is_a_model_error():
    class Bad(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x  # data-dependent control flow

    with pytest.raises(ModelError, match="torch.export"):
        capture_module(Bad(), (torch.randn(2),))


def _qwen3(layer_types: list[str]) -> nn.Module:
    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=len(layer_types),
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, layer_types=layer_types,
                         sliding_window=3, use_sliding_window=True)  # a window shorter than the example prompt
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_some_layers_of_a_causal_lm_compute_a_model_of_those_layers():
    types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    model = _qwen3(types)
    captured = capture(model, layers=[1, 2])
    assert {f for f in module_fqns(captured.program) if f.count(".") == 2} == {"model.layers.1", "model.layers.2"}
    # Qwen3 picks each layer's mask by position in config.layer_types: the copy's list is cut too.
    alone = _qwen3([types[1], types[2]])
    renumber = {"model.layers.1.": "model.layers.0.", "model.layers.2.": "model.layers.1."}
    alone.load_state_dict({_renamed(k, renumber): v for k, v in model.state_dict().items()
                           if not k.startswith(("model.layers.0.", "model.layers.3."))})
    with torch.no_grad():
        want = alone(example_ids(model), use_cache=False).logits
        got = captured.module(*captured.args, **captured.kwargs)["logits"]
    assert torch.equal(got, want)  # the same ops on the same weights
    assert model.config.num_hidden_layers == len(model.model.layers) == 4 and model.config.layer_types == types


def _renamed(key: str, renumber: dict[str, str]) -> str:
    return next((new + key.removeprefix(old) for old, new in renumber.items() if key.startswith(old)), key)

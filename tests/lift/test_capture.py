"""Capture: torch.export of plain modules and of causal LMs keeps module FQN and class per node."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from planc.capture import capture, capture_module, module_fqns
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

"""A model the caller passes to compile comes back as it came: what the lift attaches to it (a
fused projection's parts, projections under planc's names, longrope's second frequencies, one rope
per layer, a router's correction bias on its gate) is gone after, and its forward is unchanged."""
from __future__ import annotations

import pytest
import torch
import transformers as T

from planc.driver import compile
from planc.lift.restore import restored, touch
from planc.plan import parse_plan_text
from tests.lift.test_layouts import COMMON, PLAN, build

MOE_PLAN = PLAN + """  - match: "model.layers.*.mlp"
    moe: {strategy: ep}
"""


def _state(model: torch.nn.Module) -> dict:
    """Every module's children, tensors (by identity) and attribute names, by FQN."""
    return {fqn: (list(m._modules), {k: id(v) for k, v in m._parameters.items()},
                  {k: id(v) for k, v in m._buffers.items()}, sorted(m._non_persistent_buffers_set), sorted(vars(m)))
            for fqn, m in model.named_modules()}


def _compile_leaves_it_as_it_came(model, plan, out, meta):
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38]])  # past phi3_longrope's original context
    with torch.no_grad():
        before_logits = model(ids, use_cache=False).logits
    before, keys = _state(model), list(model.state_dict())
    compile(model, parse_plan_text(plan, "plan.yaml"), out, meta=meta)
    assert _state(model) == before
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(ids, use_cache=False).logits, before_logits)


def test_a_fused_longrope_model_compiled_on_real_weights_comes_back_as_it_came(tmp_path):
    model = build("phi3_longrope")
    _compile_leaves_it_as_it_came(model, PLAN, tmp_path / "out", meta=False)


@pytest.mark.parametrize("name", ["mellum_rope_per_layer_type", "phi", "minimax_m2"])
def test_what_the_lift_attaches_is_taken_off_again(tmp_path, name):
    if name == "phi":  # its attention's dense and MLP's fc1 / fc2, attached as o_proj, up_proj, down_proj
        model, plan = build("", config=T.PhiConfig(**COMMON)), PLAN
    elif name == "minimax_m2":  # the MoE block's correction bias, attached to its gate
        model, plan = build("", config=T.MiniMaxM2Config(**COMMON, head_dim=16, num_local_experts=4,
                                                         num_experts_per_tok=2)), MOE_PLAN
    else:
        model, plan = build(name), PLAN
    _compile_leaves_it_as_it_came(model, plan, tmp_path / "out", meta=True)


def test_a_compile_that_raises_still_gives_the_model_back():
    model = build("phi3_longrope")
    before = _state(model)
    with pytest.raises(RuntimeError, match="stop"), restored(model):  # each change after a touch, as the lift's
        touch(model.model.layers[0].self_attn).register_module("extra", torch.nn.Linear(2, 2))
        touch(model.model.layers[0].mlp).register_buffer("b", torch.zeros(1), persistent=False)
        touch(model.model).note = 1
        del touch(model.model.layers[0].self_attn).head_dim  # touched twice: noted once, before the first change
        raise RuntimeError("stop")
    assert _state(model) == before
    assert model.model.layers[0].self_attn.head_dim == 16 and not hasattr(model.model, "note")

"""Lift: structural recognition, one capture per layer structure, and the numeric check against
the captured graph."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from planc.capture import module_fqns
from planc.errors import CompileError, ModelError
from planc.lift import lift
from planc.lift.recognize import recognize
from planc.lift.structure import representatives
from planc.models.registry import load_model


@pytest.fixture(scope="module")
def deepseek():
    return load_model("tiny-deepseek")


def _captured_layers(lifted) -> set[int]:
    fqns = module_fqns(lifted.captured.program)
    return {int(f.split(".")[2]) for f in fqns if f.startswith("model.layers.")}


def _methods(lifted) -> dict[str, tuple[str, str | None]]:
    return {c.fqn: (c.method, c.against) for c in lifted.checks}


def test_deepseek_blocks_in_order(deepseek):
    kinds = [b.kind for b in recognize(deepseek)]
    assert kinds[:5] == ["embedding", "rmsnorm", "mla_attention", "rmsnorm", "mlp"]  # first layer dense
    assert kinds[5:9] == ["rmsnorm", "mla_attention", "rmsnorm", "moe"]
    assert kinds[-2:] == ["rmsnorm", "lm_head"]


def test_every_block_checked_numerically_once_per_structure(deepseek):
    lifted = lift(deepseek, check=True)
    assert _captured_layers(lifted) == {0, 1}  # the dense layer, then the first MoE layer
    checked = _methods(lifted)
    assert {b.fqn for b in lifted.blocks} <= set(checked)
    numeric = [c for c in lifted.checks if c.method == "numeric"]
    assert all(c.ok and c.rel_err < 1e-5 for c in numeric)
    assert {c.fqn for c in numeric} >= {"model.layers.0.self_attn", "model.layers.1.mlp", "lm_head", "model.norm"}
    assert checked["model.layers.3.mlp"] == ("structural", "model.layers.1.mlp")
    assert checked["model.layers.2 (residual)"] == ("structural", "model.layers.1 (residual)")
    assert sum("residual" in c.fqn for c in lifted.checks) == 4


def test_graph_text_is_one_node_per_block(deepseek):
    text = str(lift(deepseek, check=False).graph)
    assert text.count("planc.ir.mla_attention") == 4 and text.count("planc.ir.moe") == 3
    assert text.count("planc.ir.mlp") == 1 + 3 and "aten" not in text  # the dense MLP, three shared experts
    # GEMM level: q_a, q_b, kv_a, o_proj per MLA layer; gate, up, down per MLP; lm_head
    assert text.count("planc.ir.linear") == 4 * 4 + 4 * 3 + 1


def test_layers_of_one_structure_are_exported_once():
    model = load_model("tiny-draft")  # six Llama layers alike
    lifted = lift(model, check=True)
    assert _captured_layers(lifted) == {0}
    assert {b.layer for b in lifted.blocks} == {None, *range(6)}
    assert str(lifted.graph).count("planc.ir.gqa_attention") == 6
    assert {c.against for c in lifted.checks if c.fqn.startswith("model.layers.5.")} == {
        "model.layers.0.input_layernorm", "model.layers.0.self_attn", "model.layers.0.post_attention_layernorm",
        "model.layers.0.mlp"}


class WiderNorm(LlamaRMSNorm):
    """An RMSNorm by another class: the same math, a structure of its own."""


def test_a_layer_of_another_shape_or_class_gets_its_own_capture():
    model = load_model("tiny-draft")
    config = copy.copy(model.config)
    config.intermediate_size = 128  # the others have 256
    model.model.layers[3].mlp = LlamaMLP(config)
    model.model.layers[4].input_layernorm = WiderNorm(config.hidden_size, config.rms_norm_eps)
    lifted = lift(model, check=True)
    assert _captured_layers(lifted) == {0, 3, 4}
    checked = _methods(lifted)
    assert checked["model.layers.3.mlp"] == checked["model.layers.4.input_layernorm"] == ("numeric", None)
    assert checked["model.layers.5.mlp"] == ("structural", "model.layers.0.mlp")
    assert all(c.ok for c in lifted.checks)


@pytest.mark.parametrize("change", ["dtype", "shape", "class", "hook"])
def test_a_layer_differing_from_the_first_is_its_own_representative(change):
    model = load_model("tiny-draft", meta=True)
    layer = model.model.layers[2]
    if change == "dtype":
        layer.mlp.down_proj.to(torch.float64)
    elif change == "shape":
        layer.self_attn.o_proj.weight = torch.nn.Parameter(torch.empty(96, 64, device="meta"))
    elif change == "class":
        layer.post_attention_layernorm.__class__ = WiderNorm
    else:
        layer.mlp.register_forward_hook(lambda module, args, out: out)
    assert representatives(model.model.layers, recognize(model)) == {0: 0, 1: 0, 2: 2, 3: 0, 4: 0, 5: 0}


def test_a_block_that_does_not_match_its_reference_is_declined():
    model = load_model("tiny-draft")
    mlp = model.model.layers[2].mlp
    original = mlp.forward
    mlp.forward = lambda x: 2.0 * original(x)  # a gated MLP's children, but not a gated MLP
    with pytest.raises(CompileError, match=r"model\.layers\.2\.mlp: reference differs"):
        lift(model, check=True)


def test_a_norm_shaped_module_that_is_no_rmsnorm_runs_as_captured():
    model = load_model("tiny-draft")
    norm = model.model.layers[2].post_attention_layernorm
    original = norm.forward
    norm.forward = lambda x: 2.0 * original(x)  # RMSNorm-shaped, but asked, it answers otherwise
    lifted = lift(model, check=True)
    kinds = {b.fqn: b.kind for b in lifted.blocks}
    assert kinds["model.layers.2.post_attention_layernorm"] == "captured"
    assert kinds["model.layers.1.post_attention_layernorm"] == "rmsnorm"
    assert all(c.ok for c in lifted.checks)


def test_non_decoder_module_is_a_clear_error():
    with pytest.raises(ModelError, match="not a decoder LM"):
        recognize(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_full_size_config_lifts_on_meta():
    model = load_model("kimi-k2", meta=True)
    lifted = lift(model, check=False)
    assert _captured_layers(lifted) == {0, 1} and not lifted.checks  # dense, then MoE; no numerics on meta
    attn = next(b for b in lifted.blocks if b.kind == "mla_attention")
    moe = next(b for b in lifted.blocks if b.kind == "moe")
    assert (attn.dims.num_heads, attn.dims.kv_lora_rank, attn.dims.rope_dim) == (64, 512, 64)
    assert moe.dims.num_experts == 384 and len([b for b in lifted.blocks if b.kind == "moe"]) == 60

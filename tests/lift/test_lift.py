"""Lift: structural recognition and the numeric check against the captured graph."""
from __future__ import annotations

import pytest
import torch

from planc.capture import capture
from planc.errors import CompileError, ModelError
from planc.lift import lift
from planc.lift.recognize import recognize
from planc.models.registry import load_model


@pytest.fixture(scope="module")
def deepseek():
    return load_model("tiny-deepseek")


def test_deepseek_blocks_in_order(deepseek):
    kinds = [b.kind for b in recognize(deepseek)]
    assert kinds[:5] == ["embedding", "rmsnorm", "mla_attention", "rmsnorm", "mlp"]  # first layer dense
    assert kinds[5:9] == ["rmsnorm", "mla_attention", "rmsnorm", "moe"]
    assert kinds[-2:] == ["rmsnorm", "lm_head"]


def test_every_block_checked_against_captured_graph(deepseek):
    lifted = lift(deepseek, capture(deepseek))
    checked = {c.fqn for c in lifted.checks}
    assert {b.fqn for b in lifted.blocks} <= checked
    assert all(c.ok and c.rel_err < 1e-5 for c in lifted.checks)
    assert sum("residual" in c.fqn for c in lifted.checks) == 4


def test_graph_text_is_one_node_per_block(deepseek):
    text = str(lift(deepseek, capture(deepseek), check=False).graph)
    assert text.count("planc.ir.mla_attention") == 4 and text.count("planc.ir.moe") == 3
    assert text.count("planc.ir.mlp") == 1 and "aten" not in text


def test_a_block_that_does_not_match_its_reference_is_declined():
    model = load_model("tiny-draft")
    norm = model.model.layers[2].post_attention_layernorm
    original = norm.forward
    norm.forward = lambda x: 2.0 * original(x)  # RMSNorm-shaped, but not an RMSNorm
    with pytest.raises(CompileError, match=r"model\.layers\.2\.post_attention_layernorm: reference differs"):
        lift(model, capture(model))


def test_non_decoder_module_is_a_clear_error():
    with pytest.raises(ModelError, match="not a decoder LM"):
        recognize(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_full_size_config_lifts_on_meta():
    model = load_model("kimi-k2", meta=True)
    blocks = recognize(model)
    attn = next(b for b in blocks if b.kind == "mla_attention")
    moe = next(b for b in blocks if b.kind == "moe")
    assert (attn.dims.num_heads, attn.dims.kv_lora_rank, attn.dims.rope_dim) == (64, 512, 64)
    assert moe.dims.num_experts == 384

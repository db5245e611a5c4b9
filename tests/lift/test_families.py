"""Every decoder family planc lifts: each block recognized (none run as captured), the variant read
from the module, and every block's semantic op confirmed against the captured graph in fp32 and bf16."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from planc.dims import RouterDims
from planc.lift import lift
from planc.lift.check import TOLERANCE, check_blocks
from planc.lift.recognize import recognize
from planc.capture import capture
from tests.families.configs import FAMILIES, build


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_block_lifts_and_matches_the_captured_graph(family, dtype):
    lifted = lift(build(family, dtype), check=True)
    assert {b.kind for b in lifted.blocks} <= {"embedding", "rmsnorm", "mla_attention", "gqa_attention", "mlp", "moe",
                                               "lm_head"}
    numeric = [c for c in lifted.checks if c.method == "numeric"]
    assert numeric and all(c.ok and c.rel_err <= TOLERANCE[dtype] for c in numeric)


def _blocks(family: str) -> dict[str, object]:
    return {b.fqn.rsplit(".", 1)[-1]: b for b in recognize(build(family)) if b.layer == 1}


@pytest.mark.parametrize(("family", "router"), [
    ("mixtral", RouterDims(4, 2, normalize=True)),
    ("qwen2_moe", RouterDims(4, 2, weights_in_model_dtype=True)),
    ("qwen3_moe", RouterDims(4, 2, normalize=True, weights_in_model_dtype=True)),
    ("olmoe", RouterDims(4, 2, weights_in_model_dtype=True)),
    ("deepseek_v2", RouterDims(4, 2, num_groups=2, topk_groups=1, group_score="max", scaling=1.5, fp32_logits=True)),
    ("deepseek_v3", RouterDims(4, 2, scoring="sigmoid", num_groups=2, topk_groups=1, group_score="top2_sum",
                               correction_bias=True, normalize=True, scaling=2.5, fp32_logits=True)),
])
def test_the_router_variant_is_read_from_the_gate(family, router):
    assert _blocks(family)["mlp"].dims == router


def test_attention_variants():
    assert _blocks("qwen3")["self_attn"].dims.qk_norm == "head"
    assert _blocks("olmoe")["self_attn"].dims.qk_norm == "full"
    assert _blocks("llama")["self_attn"].dims.qk_norm == "none"
    v2 = _blocks("deepseek_v2")["self_attn"].dims
    assert v2.q_lora_rank == 0 and v2.rope_interleave  # complex-pair rope = interleaved rotation
    qwen2_moe = _blocks("qwen2_moe")["mlp"]
    assert (qwen2_moe.attrs["shared"], qwen2_moe.attrs["shared_gate"]) == ("shared_expert", "shared_expert_gate")


@pytest.mark.parametrize(("family", "wrong"), [
    ("qwen2_moe", {"normalize": True}),  # renormalizing a router that does not
    ("mixtral", {"normalize": False}),
    ("deepseek_v2", {"group_score": "top2_sum", "topk_groups": 1, "num_groups": 4}),
])
def test_a_misread_router_fails_its_lift_check(family, wrong):
    model = build(family)
    blocks = recognize(model)
    moe = next(i for i, b in enumerate(blocks) if b.kind == "moe")
    blocks[moe] = dataclasses.replace(blocks[moe], dims=dataclasses.replace(blocks[moe].dims, **wrong))
    captured = capture(model)
    checks = {c.fqn: c for c in check_blocks(model, captured.module, blocks, captured.args, captured.kwargs)}
    assert not checks[blocks[moe].fqn].ok, checks[blocks[moe].fqn]


def test_a_misread_rope_fails_its_lift_check():
    model = build("deepseek_v2")
    blocks = recognize(model)
    attn = next(i for i, b in enumerate(blocks) if b.kind == "mla_attention")
    blocks[attn] = dataclasses.replace(blocks[attn], dims=dataclasses.replace(blocks[attn].dims, rope_interleave=False))
    captured = capture(model)
    checks = {c.fqn: c for c in check_blocks(model, captured.module, blocks, captured.args, captured.kwargs)}
    assert not checks[blocks[attn].fqn].ok

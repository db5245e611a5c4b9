"""attention tp (GQA): q/k/v column-parallel with KV heads replicated past Hkv ranks, o_proj row-parallel."""
from __future__ import annotations

import pytest
import torch

from planc.errors import CompileError
from planc.ir import info, nodes_of
from planc.passes.attention_tp import kv_head_range, valid_degrees
from tests.passes.blocks import compiled, model, plan, reference, run_block

ATTN = 'match: "model.layers.*.self_attn"\n    attention: {strategy: tp}'


@pytest.mark.parametrize("devices", [2, 4])
def test_shards_sum_to_the_block(devices):
    text = plan(devices, ATTN, source="tiny-draft")
    graph, _, ranks = compiled("tiny-draft", text)
    fqn = "model.layers.1.self_attn"
    x = torch.randn(2, 5, model("tiny-draft").config.hidden_size)
    got, caches, _ = run_block(graph, ranks, fqn, x, decode_steps=2)
    torch.testing.assert_close(got, reference("tiny-draft", fqn, x), rtol=1e-5, atol=1e-5)
    core = next(n for n in nodes_of(graph, "gqa_attention") if info(n).fqn == fqn)
    assert caches[0][fqn].k_BTHD.shape[2] == info(core).local_dims().num_kv_heads


def test_valid_degrees_and_kv_heads_shared_past_hkv_ranks():
    assert valid_degrees(4, 2) == [1, 2, 4]
    assert valid_degrees(8, 4) == [1, 2, 4, 8]
    assert valid_degrees(6, 3) == [1, 3, 6]
    # 8 query heads, 2 KV heads, 4 ranks: ranks 0-1 read KV head 0, ranks 2-3 KV head 1.
    assert [kv_head_range(8, 2, 2, r) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]


def test_degree_that_does_not_fit_is_declined():
    heads = model("tiny-draft").config.num_attention_heads
    with pytest.raises(CompileError, match=rf"{heads} query / .* KV heads do not split over 3 devices"):
        compiled("tiny-draft", plan(3, ATTN, source="tiny-draft"))

"""The CLI's happy paths that need no processes."""
from __future__ import annotations

import json

from hypothesis import given, strategies as st

from planc.cli import main
from planc.passes.attention_tp import kv_head_range
from planc.passes.ep import token_slices
from tests.conftest import PLANS


def test_schema_is_json_schema(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "mla_tp" in json.dumps(schema) and schema["title"]


def test_validate_plan_alone_and_against_model(capsys):
    plan = str(PLANS / "deepseek_mla_tp_ep.yaml")
    assert main(["validate", plan]) == 0
    assert main(["validate", plan, "--model", "tiny-deepseek"]) == 0
    out = capsys.readouterr().out
    assert "valid for tiny-deepseek" in out and "8 blocks rewritten" in out


@given(st.integers(0, 500), st.integers(1, 16))
def test_token_slices_cover_every_token_once(num_tokens, world):
    sizes = token_slices(num_tokens, world)
    assert len(sizes) == world and sum(sizes) == num_tokens and min(sizes) >= 0
    assert max(sizes) - min(sizes) <= 1


@given(st.sampled_from([(4, 2), (8, 2), (8, 8), (16, 4), (32, 8)]), st.sampled_from([1, 2, 4, 8, 16]))
def test_kv_heads_cover_the_query_heads_of_each_rank(heads, world):
    num_heads, num_kv = heads
    if num_heads % world or not (num_kv % world == 0 or world % num_kv == 0):
        return
    per_rank = num_heads // world
    group = num_heads // num_kv
    for rank in range(world):
        lo, hi = kv_head_range(num_heads, num_kv, per_rank, rank)
        needed = {h // group for h in range(rank * per_rank, (rank + 1) * per_rank)}
        assert set(range(lo, hi)) == needed

"""Llama 4's text decoder: rope on three layers of four and none on the fourth, the rope layers'
chunked attention (a query sees its own chunk of positions only), one weightless L2 norm of q and
k after rope, the NoPE layers' query temperature tuning, complex rotations over interleaved pairs,
the feed-forward block named feed_forward, and its MoE block (whose router weights scale the
experts' inputs: every expert runs on every token, w · x, and it returns its tokens flattened),
split by expert or by intermediate width. Against transformers at 2 ranks on prompts crossing
several chunks, left-padded rows included."""
from __future__ import annotations

import pytest
import torch
import transformers as T

from planc.driver import compile
from planc.lift.recognize import recognize
from planc.ops import Step, attention_mask, decode_key_mask
from planc.plan import parse_plan_text
from planc.runtime.decode import generate
from planc.runtime.model import Model
from planc.runtime.threads import run_threads

CHUNK = 8
PLAN = """version: 1
mesh: {devices: 2}
rules:
  - match: "model.layers.*.self_attn"
    attention: {strategy: tp}
  - match: "model.layers.0.feed_forward"
    mlp: {strategy: tp}
  - match: "model.layers.2.feed_forward"
    mlp: {strategy: tp}
"""


def llama4() -> torch.nn.Module:
    config = T.Llama4TextConfig(
        vocab_size=260, hidden_size=64, intermediate_size=128, intermediate_size_mlp=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
        interleave_moe_layer_step=2, no_rope_layer_interval=4, attention_chunk_size=CHUNK,
        floor_scale=4, attn_scale=0.5,  # the temperature changes every 4 positions (8192 in the published models)
        max_position_embeddings=256, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    torch.manual_seed(0)
    return T.Llama4ForCausalLM(config).eval()


def test_what_planc_reads_of_llama4_attention():
    dims = [b.dims for b in recognize(llama4()) if b.kind == "gqa_attention"]
    assert [d.chunk for d in dims] == [CHUNK, CHUNK, CHUNK, None]
    assert [d.rope_dim for d in dims] == [None, None, None, 0]  # the fourth layer turns no rope
    assert [d.temperature for d in dims] == [None, None, None, (4.0, 0.5)]
    assert [(d.qk_norm, d.qk_norm_weightless, d.qk_norm_after_rope) for d in dims[:3]] == [("head", True, True)] * 3
    assert dims[3].qk_norm == "none" and all(d.rope_interleave for d in dims)
    ffn = [b for b in recognize(llama4()) if b.fqn.endswith("feed_forward")]
    assert [b.kind for b in ffn] == ["mlp", "moe", "mlp", "moe"]
    router, layout = ffn[1].dims, ffn[1].attrs["layout"]
    assert (router.scoring, router.normalize, router.top_k, router.module) == ("sigmoid", False, 1, "router")
    assert (layout.transposed, layout.interleaved, layout.scaled_inputs) == (True, False, True)  # gate | up halves
    assert ffn[1].attrs["shared"] == "shared_expert"


def test_chunked_masks_count_positions_from_each_rows_left_padding():
    pad = 3  # row 1 starts 3 slots late: its chunks start 3 slots later too
    key_mask = torch.ones(2, 20, dtype=torch.bool)
    key_mask[1, :pad] = False
    pos = torch.stack([torch.arange(20), (torch.arange(20) - pad).clamp(min=0)])
    prefill = attention_mask(Step(0, pos, key_mask), 20, chunk=CHUNK)[:, 0]
    assert prefill[0, 9].nonzero().flatten().tolist() == [8, 9]
    assert prefill[1, 12].nonzero().flatten().tolist() == [11, 12]  # position 9: positions 8-9, slots 11-12
    decode = decode_key_mask(Step(19, pos[:, 19:], key_mask), chunk=CHUNK)
    assert decode[0].nonzero().flatten().tolist() == [16, 17, 18, 19]
    assert decode[1].nonzero().flatten().tolist() == [19]  # position 16 opens a chunk


@pytest.mark.parametrize("moe", ["ep", "tp"])
def test_llama4_text_at_two_ranks_gives_transformers_logits_across_chunks(tmp_path, moe):
    """Its MoE layers split by expert (each rank computes its experts on the rows the router sends
    it, scaled there) or by intermediate width (the scaled rows on every rank, the partial outputs
    all-reduced)."""
    model = llama4()
    plan = PLAN + f"""  - match: "model.layers.*.feed_forward"
    moe: {{strategy: {moe}}}
"""
    art = compile(model, parse_plan_text(plan, "plan.yaml"), tmp_path / "out")
    assert {r["pass_name"] for r in art.report["declines"]} == set()
    artifact = art.path
    prompts, steps = [list(range(30, 49)), list(range(60, 73))], 6  # 19 and 13 tokens: chunks of 8 crossed
    got = run_threads(lambda comm: generate(Model(str(artifact), comm=comm), prompts, steps, keep_logits=True), 2)[0]
    for row, prompt in enumerate(prompts):  # each row against transformers on that row alone (no padding)
        ids = torch.tensor([prompt + got.tokens[row]])
        with torch.no_grad():
            want = model(ids, use_cache=False).logits[0, len(prompt) - 1:-1]
        diff = max((g[row] - w).abs().max().item() for g, w in zip(got.step_logits, want))
        assert diff <= 1e-4, (row, diff)  # fp32

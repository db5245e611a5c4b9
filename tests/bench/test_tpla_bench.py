"""The tpla bench case's parts on small settings (the full case is a benchmark, not a test)."""
from __future__ import annotations

import math

import pytest
import torch

from planc import cost
from planc.bench import tpla as tpla_case
from planc.ops import Step
from planc.runtime.comm import Comm
from planc.zoo import eval as zoo_eval


@pytest.mark.parametrize("model", ["deepseek-v3", "kimi-k2"])
def test_kv_width_per_rank_comes_from_the_compiler(model):
    assert tpla_case.kv_widths(model) == {"mla_tp": 576, "tpla_g2": 320, "tpla_g4": 192}


def test_bpb_plans_cover_every_transform_with_and_without_pd():
    assert set(tpla_case.BPB_PLANS) == {"mla_tp"} | {f"tpla_{t}_{pd}" for t in ("none", "hadamard", "pca")
                                                      for pd in ("pd", "nopd")}
    assert "prefill: mla" in tpla_case.BPB_PLANS["tpla_pca_pd"]
    assert "prefill: tpla" in tpla_case.BPB_PLANS["tpla_pca_nopd"]


def test_attention_timer_returns_positive_times_per_variant_probe_and_step():
    shapes = tpla_case.attention_shapes(heads=4, latent=64)
    assert shapes == {"mla_tp": (2, 64), "tpla_g2": (4, 32)}
    times = tpla_case.time_decode_attention(Comm.single(), shapes, batch=2, context=32, rope=16, repeats=3, warmup=1)
    assert set(times) == set(shapes)
    for probes in times.values():
        assert set(probes) == {"fused_cpu", "torch_reference", "logits", "softmax", "value", "cache_read"}
        assert all(len(s) == 3 and min(s) > 0 for s in probes.values())


def test_step_time_is_the_slower_rank_then_the_median_over_steps():
    ranks = [{"times": {"v": {"p": [1.0, 5.0, 2.0]}}}, {"times": {"v": {"p": [3.0, 1.0, 2.5]}}}]
    assert tpla_case.step_stat(ranks) == {"v": {"p": 3.0}}  # median of [3, 5, 2.5]
    assert tpla_case.step_stat(ranks, min) == {"v": {"p": 2.5}}


def test_step_ratio_quartiles_pair_each_steps_slower_ranks():
    times = lambda mla, tpla: {"times": {"mla_tp": {"p": mla}, "tpla_g2": {"p": tpla}}}  # noqa: E731
    ranks = [times([2.0, 4.0, 6.0, 8.0, 10.0], [1.0, 1.0, 1.0, 1.0, 1.0]),
             times([1.0, 1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0, 2.0])]
    assert tpla_case.step_ratio_quartiles(ranks, "p") == pytest.approx([1.5, 3.0, 4.5])  # of 1, 2, 3, 4, 5


def test_attention_batch_puts_the_smaller_cache_past_twice_the_llc():
    llc, context, latent, rope = 32 << 20, 16384, 64, 16
    batch = tpla_case.attention_batch(context, latent, rope, llc)
    per_seq = context * (latent // 2 + rope) * 4
    assert batch % 8 == 0 and batch * per_seq >= 2 * llc > (batch - 8) * per_seq


def test_fused_roofline_reaches_the_width_ceiling_when_bandwidth_bound():
    cpu = cost.Hardware("bandwidth only", math.inf, 1e10, 0.0, math.inf, 0.0)
    shapes = tpla_case.attention_shapes(4, 64)
    times = {n: cost.op_time(cost.attention(24, h, c, 16, 16384, 4), cpu) for n, (h, c) in shapes.items()}
    assert times["mla_tp"] / times["tpla_g2"] == pytest.approx((64 + 16) / (32 + 16), rel=1e-3)


def test_decode_scoring_equals_the_full_forward_on_exact_mla(compiled):
    from planc.runtime.model import Model

    rank = Model(compiled("deepseek_mla_tp_ep.yaml", 1), comm=Comm.single())
    ids_NS, prefix = zoo_eval.eval_ids("heldout", max_bytes=2 * 255)[:, :40], 16
    got = tpla_case.decode_bits(rank, ids_NS, prefix)
    N, S = ids_NS.shape
    rank.allocate(N, S)
    with torch.no_grad():
        logits = rank.forward(ids_NS, Step(0, torch.arange(S).expand(N, S), torch.ones(N, S, dtype=torch.bool)))
    bits, count = zoo_eval.scored_bits(logits[:, prefix - 1:].float(), ids_NS[:, prefix - 1:])
    assert got["bytes"] == count == N * (S - prefix) - int((ids_NS[:, prefix:] >= 256).sum())
    assert got["bits"] == pytest.approx(bits, rel=1e-4)  # fp32: decode and prefill sum in different orders
    assert tpla_case.full_window_bits(rank, ids_NS)["bytes"] == N * (S - 1) - int((ids_NS[:, 1:] >= 256).sum())

"""The t3 bench case's parts on thread ranks and small shapes (the full case is a benchmark, not a test)."""
from __future__ import annotations

import pytest

from planc.bench import t3 as t3_case
from planc.runtime.threads import run_threads


def _shape(**changes) -> dict:
    shape = {"gemm": "toy", "step": "prefill", "tokens": 8, "in_features_per_rank": 16, "out_features": 32,
             "world": 2, "chunks": 2, "samples": 2, "index": 0}
    return shape | changes


def test_every_probe_is_timed_once_per_sample_on_every_rank():
    times = run_threads(lambda comm: t3_case.measure(comm, _shape(), warmup=1), 2)
    for rank in times:
        assert set(rank) == {"gemm", "pieces", "all_reduce", "sequential", "fused"}
        assert all(len(samples) == 2 and min(samples) > 0 for samples in rank.values())


def test_link_gives_a_latency_and_a_bandwidth():
    latency, bandwidth = run_threads(lambda comm: t3_case.link(comm, large=1 << 12, rounds=3), 2)[0]
    assert latency > 0 and bandwidth > 0


def test_summary_takes_the_slowest_rank_per_sample_then_the_median():
    def rank(scale: float) -> dict:
        return {"flops": 1e11, "latency": 1e-4, "bandwidth": 1e9, "times": [{
            "gemm": [4.0 * scale, 4.0, 4.0], "pieces": [4.5, 4.5, 4.5], "all_reduce": [2.0, 2.0, 2.0 * scale],
            "sequential": [6.0, 6.0 * scale, 6.0], "fused": [5.5, 5.5, 5.5 * scale]}]}

    row = t3_case.summarize(_shape(), [rank(1.0), rank(1.5)])
    # per sample the slower rank: gemm [6, 4, 4] -> 4; sequential [6, 9, 6] -> 6; fused [5.5, 5.5, 8.25] -> 5.5
    assert (row["gemm_s"], row["sequential_s"], row["fused_s"], row["all_reduce_s"]) == (4.0, 6.0, 5.5, 2.0)
    assert row["ratio"] == pytest.approx(6 / 5.5) and row["ratio_ceiling"] == pytest.approx(1.5)
    assert row["exposed_comm_fraction"] == pytest.approx(0.5)  # 1 s beyond its pieces' 4.5 s, of a 2 s all-reduce
    assert set(row["predicted_ratio"]) == {"H100", "H200", "H800", "cpu"} and "index" not in row


def test_the_pass_fuses_deepseek_v3s_prefill_and_declines_the_tiny_gemms():
    rows = {(s["gemm"], s["step"]): s for s in t3_case.shapes(2)}
    v3 = rows["deepseek-v3 o_proj", "prefill"]
    tiny = rows["tiny-deepseek o_proj", "prefill"]
    assert (v3["in_features_per_rank"], v3["out_features"], v3["tokens"]) == (8192, 7168, 512)
    assert tiny["samples"] == t3_case.SMALL_SAMPLES and v3["samples"] == t3_case.SAMPLES
    probes = ("gemm", "pieces", "all_reduce", "sequential", "fused")
    fake = [{"flops": 1e11, "latency": 1e-4, "bandwidth": 1e9, "times": [{p: [1.0] for p in probes}]}]
    assert t3_case.summarize(v3 | {"index": 0}, fake)["fused_by_pass"]
    assert not t3_case.summarize(tiny | {"index": 0}, fake)["fused_by_pass"]


def test_goals():
    rows = [{"step": "prefill", "world": 2, "ratio": 1.2, "fused_by_pass": True},
            {"step": "decode", "world": 2, "ratio": 0.5, "fused_by_pass": False}]
    assert t3_case.goals(rows) == {"prefill_ratio_at_2_ranks_at_least_1.15": True, "fused_shapes_never_below_0.97": True}
    rows[1]["fused_by_pass"] = True
    assert not t3_case.goals(rows)["fused_shapes_never_below_0.97"]

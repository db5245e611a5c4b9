"""planc.cost: the roofline, the byte and FLOP formulas, max batch, and the paper-setting speedup."""
from __future__ import annotations

from pathlib import Path

import pytest

from planc import cost
from planc.passes import mla_tp, tpla
from planc.runtime.comm import ring_all_reduce_bytes

V3 = cost.mla_model("deepseek-v3")
H800 = cost.PROFILES["H800"]


def test_roofline_takes_the_binding_bound():
    hw = cost.Hardware("toy", flops=100.0, mem_bw=10.0, mem_bytes=0.0, link_bw=1.0, latency=0.5)
    heavy, streaming = cost.Op("gemm", flops=1000, bytes=10), cost.Op("read", flops=100, bytes=1000)
    assert (cost.op_time(heavy, hw), cost.bound(heavy, hw)) == (10.0, "compute")
    assert (cost.op_time(streaming, hw), cost.bound(streaming, hw)) == (100.0, "memory")
    assert cost.op_time(cost.Collective("all_reduce", 8), hw) == 0.5 + 8.0


def test_kv_bytes_per_sequence_is_layers_tokens_width_elem():
    splits = [(mla_tp.cost_split(V3, 2), 512 + 64), (tpla.cost_split(V3, 2, 2), 256 + 64), (tpla.cost_split(V3, 4, 4), 128 + 64)]
    for split, width in splits:
        assert cost.kv_bytes_per_seq(V3, split, 1000, 2) == 61 * 1000 * width * 2


def test_attention_op_reads_the_rank_cache_once_and_counts_absorbed_flops():
    b, heads, latent, rope, context, e = 3, 128, 256, 64, 32768, 2
    op = cost.attention(b, heads, latent, rope, context, e)
    assert op.flops == b * heads * context * (2 * (latent + rope) + 2 * latent)
    kv = b * context * (latent + rope) * e
    assert kv <= op.bytes < 1.01 * kv  # the queries and outputs are a rounding error beside the cache


def test_layer_has_one_all_reduce_of_the_hidden_state():
    ops = cost.mla_layer(V3, tpla.cost_split(V3, 2, 2), b=8, context=10, e=2)
    collectives = [op for op in ops if isinstance(op, cost.Collective)]
    assert collectives == [cost.Collective("all_reduce", ring_all_reduce_bytes(8 * V3.D * 2, 2))]


def test_tpla_at_g_equal_tp_holds_every_head_and_more_weights():
    base, ours = mla_tp.cost_split(V3, 2), tpla.cost_split(V3, 2, 2)
    assert (base.heads, base.latent, ours.heads, ours.latent) == (64, 512, 128, 256)
    assert cost.weights_per_rank(V3, ours, 2) > cost.weights_per_rank(V3, base, 2)  # q_b, o_proj not split


def test_max_batch_fills_usable_memory_and_grows_as_kv_shrinks():
    hw = cost.Hardware("toy", 1.0, 1.0, mem_bytes=1000.0, link_bw=1.0, latency=0.0)
    assert cost.max_batch(hw, 100.0, 80.0, usable=1.0) == 11  # floor(900 / 80)
    assert cost.max_batch(hw, 2000.0, 80.0, usable=1.0) == 0
    batches = [cost.max_batch(H800, 15e9, kv) for kv in (2.3e9, 1.6e9, 1.28e9)]
    assert batches == sorted(batches) and batches[0] < batches[-1]


@pytest.mark.parametrize("model", ["deepseek-v3", "kimi-k2"])
def test_predicted_speedup_lies_between_one_and_kv_streaming_limit(model):
    detail = cost.compare(model, lambda m: mla_tp.cost_split(m, 2), lambda m: tpla.cost_split(m, 2, 2))
    m = cost.mla_model(model)
    # TPLA's step reads at least its batch's KV, so its tokens/s <= bandwidth / (KV bytes per sequence).
    limit = H800.mem_bw / cost.kv_bytes_per_seq(m, tpla.cost_split(m, 2, 2), 32768, 2) / detail["base"]["tokens_per_s"]
    assert 1.0 < detail["speedup"] < limit
    assert detail["ours"]["batch"] > detail["base"]["batch"]
    # The speedup is the product of the batch ratio and the step-time ratio, both measured by the model.
    step_ratio = detail["base"]["step_ms"] / detail["ours"]["step_ms"]
    assert detail["speedup"] == pytest.approx(detail["batch_ratio"] * step_ratio, rel=1e-12)
    assert detail["kv_width_ratio"] == (512 + 64) / (256 + 64)


def test_cpu_profile_is_measured_once_per_process():
    profile = cost.cpu_profile()
    assert profile.flops > 0 and profile.mem_bw > 0 and profile.mem_bytes > 0
    assert cost.cpu_profile() is profile


@pytest.mark.skipif(not Path("/sys/devices/system/cpu/cpu0/cache").is_dir(), reason="no sysfs cache info")
def test_last_level_cache_size_is_read_from_sysfs():
    size = cost.last_level_cache_bytes()
    assert size >= 256 << 10 and size % 1024 == 0  # sysfs sizes are whole KiB


def _op(node: str, weights: list[int], kv: list[int], collectives: list[dict] = ()) -> dict:
    return {"node": node, "kind": "linear", "fqn": node, "layer": 0, "strategy": "replicated",
            "weight_bytes": weights, "kv_bytes_per_token": kv, "collectives": list(collectives)}


def test_artifact_step_from_report_figures():
    """Weights + batch x context cached tokens at HBM bandwidth, collectives at latency + bytes /
    link per call; the slower rank sets the step; max batch fits every rank."""
    hw = cost.Hardware("toy", flops=1.0, mem_bw=100.0, mem_bytes=10_000.0, link_bw=10.0, latency=0.5)
    report = {"per_rank": [{"rank": 0, "weight_bytes": 1000, "kv_bytes_per_token": 2},
                           {"rank": 1, "weight_bytes": 2000, "kv_bytes_per_token": 2}],
              "decode_ops": [_op("a", [1000, 2000], [2, 2]),
                             _op("ar", [0, 0], [0, 0], [{"op": "all_reduce", "calls": 2, "bytes_per_token": 5}]),
                             _op("a2a", [0, 0], [0, 0], [{"op": "all_to_all", "calls": 1, "bytes_per_token_max": 10}])]}
    step = cost.artifact_step(report, hw, batch=3, context=50)
    assert step["slowest"]["rank"] == 1
    assert step["slowest"]["weights_s"] == pytest.approx(20.0) and step["slowest"]["kv_s"] == pytest.approx(3.0)
    # 3 calls of 0.5 s; bytes_per_token is what all the op's calls move per token, not each call
    assert step["slowest"]["collectives_s"] == pytest.approx(3 * 0.5 + (5 * 3 + 10 * 3) / 10.0)
    assert step["ranks"][0]["waiting_s"] == pytest.approx(10.0) and step["slowest"]["waiting_s"] == 0
    assert step["step_s"] == pytest.approx(20.0 + 3.0 + 6.0)
    assert step["tokens_per_s"] == pytest.approx(3 / step["step_s"])
    # (0.9 x 10,000 - 2,000) / (2 x 50) = 70 sequences on rank 1, 80 on rank 0
    assert cost.artifact_max_batch(report, hw, context=50) == 70


def test_ranks_meet_at_every_collective():
    """Rank 0 is slow before the all-reduce, rank 1 after: the step is both slow stretches plus the
    collective, longer than either rank's own reads plus the collective."""
    hw = cost.Hardware("toy", flops=1.0, mem_bw=100.0, mem_bytes=10_000.0, link_bw=10.0, latency=1.0)
    report = {"per_rank": [{"rank": r, "weight_bytes": 500, "kv_bytes_per_token": 0} for r in range(2)],
              "decode_ops": [_op("first", [400, 100], [0, 0]),
                             _op("ar", [0, 0], [0, 0], [{"op": "all_reduce", "calls": 1, "bytes_per_token": 20}]),
                             _op("second", [100, 400], [0, 0])]}
    step = cost.artifact_step(report, hw, batch=1, context=0)
    assert step["step_s"] == pytest.approx(4.0 + (1.0 + 2.0) + 4.0)
    timeline = cost.artifact_timeline(report, hw, batch=1, context=0)
    assert [(s.what, s.start, s.seconds) for s in timeline[1]] == [
        ("compute", 0.0, 1.0), ("wait", 1.0, 3.0), ("collective", 4.0, 3.0), ("compute", 7.0, 4.0)]
    assert [r["waiting_s"] for r in step["ranks"]] == [0.0, 3.0]
    assert step["slowest"]["rank"] == 1 and [r["end_s"] for r in step["ranks"]] == [8.0, 11.0]


def test_moe_layer_bytes_follow_the_collectives_and_remote_rows():
    m = cost.moe_model("deepseek-v3")
    assert (m.D, m.E, m.K, m.I, m.shared_I) == (7168, 256, 8, 2048, 2048)
    plain = {op.name: op for op in cost.moe_layer(m, 8, 100, 3.5, 1.0, shuffled=False, e=2)}
    ours = cost.moe_layer(m, 8, 100, 2.0, 1.0, shuffled=True, e=2)
    N, row = 800, 7168 * 2
    assert plain["all_reduce"].ring_bytes == ring_all_reduce_bytes(N * row, 8)
    assert plain["all_to_all"].ring_bytes == 100 * 3.5 * row
    assert plain["router"].flops == 2 * N * 7168 * 256  # every rank routes every token without shuffling
    names = [op.name for op in ours]
    assert names[:3] == ["reduce_scatter", "router", "all_gather"] and ours[1].flops == 2 * 100 * 7168 * 256
    assert ours[0].ring_bytes * 2 == plain["all_reduce"].ring_bytes  # the reduce-scatter moves half
    assert plain["experts"].weight_bytes == 32 * 3 * 7168 * 2048 * 2  # E/n experts of three projections

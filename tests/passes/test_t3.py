"""t3: a row-parallel GEMM fused with its all-reduce — the rewrite, every candidate in the report, the
ring's values, order and counters on thread ranks, declines and the cost model."""
from __future__ import annotations

import json
import re

import pytest
import torch

import planc.report.inspect as inspect
from planc import cost
from planc.bind import rule_refs
from planc.driver import compile
from planc.errors import CompileError, PlanError
from planc.ir import add_node, format_graph, info, nodes_of
from planc.kernels.t3_gemm import Pieces, tiles_per_piece
from planc.ops import Ops
from planc.passes import t3
from planc.passmanager import PassContext
from planc.plan import parse_plan_text
from planc.ring import ring_piece_order
from planc.runtime.threads import ThreadComm, _Exchange, run_threads
from tests.passes.blocks import compiled, model, plan, reference, run_block

ATTN = 'match: "model.layers.*.self_attn"\n    attention: {strategy: mla_tp}'
DENSE = 'match: "model.layers.0.mlp"\n    mlp: {strategy: tp}'
O_PROJ = 'match: "model.layers.*.self_attn.o_proj"\n    overlap: {kind: t3, min_tokens: 16%s}'


# -- the rewrite --------------------------------------------------------------------------------


def test_rewrite_golden_and_pure():
    graph, _, _ = compiled("tiny-deepseek", plan(2, ATTN))
    before = format_graph(graph)
    fused, ctx, _ = compiled("tiny-deepseek", plan(2, ATTN, O_PROJ % ""))
    assert format_graph(graph) == before  # the pass copied before rewriting
    lines = [l for l in format_graph(fused).splitlines() if "layers.2.self_attn" in l]
    assert [l.split(" = ")[1].split("(")[0] for l in lines] == [
        "linear", "rmsnorm", "linear", "linear", "mla_attention", "t3_linear_all_reduce"]
    assert lines[-1].startswith("a_2_t3 = t3_linear_all_reduce(o_2)  # model.layers.2.self_attn.o_proj  t3 rules[1]  "
                                "layout=row  width_per_rank=64  chunks=2  min_tokens=16")
    assert "h_5 = add(h_4, a_2_t3)" in format_graph(fused)
    assert not nodes_of(fused, "all_reduce") and len(nodes_of(fused, "t3_linear_all_reduce")) == 4
    assert [r.target for r in ctx.records if r.pass_name == "t3"] == [f"model.layers.{i}.self_attn.o_proj" for i in range(4)]


def test_the_overlap_rule_binds_o_proj_beside_the_attention_rule():
    graph, _, _ = compiled("tiny-deepseek", plan(2, ATTN, O_PROJ % ""))
    node = nodes_of(graph, "t3_linear_all_reduce")[0]
    assert info(node).rule.index == 1 and [r.section for r in info(node).bindings] == ["overlap"]
    assert info(node).shard.segments == (((0, 64),), ((64, 128),))  # mla_tp's row split, kept


@pytest.mark.parametrize("devices", [2, 4])
def test_fused_block_equals_the_block(devices):
    """20 prefill tokens run the ring (>= min_tokens 16); the two decode steps of 2 tokens run in sequence."""
    graph, _, ranks = compiled("tiny-deepseek", plan(devices, ATTN, O_PROJ % ""))
    fqn = "model.layers.1.self_attn"
    x = torch.randn(2, 12, model("tiny-deepseek").config.hidden_size)
    got, _, every = run_block(graph, ranks, fqn, x, decode_steps=2)
    # fp32: the ring sums 2-4 partials of O(1) in another order than one GEMM over all heads.
    torch.testing.assert_close(got, reference("tiny-deepseek", fqn, x), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(o, every[0]) for o in every)  # every rank holds the whole sum


def test_program_line_names_the_call_and_its_decision(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text(plan(2, ATTN, DENSE, O_PROJ % "", 'match: "model.layers.0.mlp.down_proj"\n'
                                                          '    overlap: {kind: t3, min_tokens: 16, chunks: 4}'))
    lines: list[str] = []
    art = compile("tiny-deepseek", path, tmp_path / "art", log=lines.append)
    call = next(l for l in art.program.splitlines() if "model.layers.0.mlp.down_proj" in l)
    assert ("t3.linear_all_reduce(ops, comm, act, W['model.layers.0.mlp.down_proj.weight'], "
            "W.get('model.layers.0.mlp.down_proj.bias'), chunks=4, min_tokens=16)  # rules[3] t3: layout=row") in call
    assert "from planc.passes import t3" in art.program
    fused = [l for l in lines if l.startswith("t3 ")]  # a run of the same decision is one line
    assert all(": fused: " in l and "serialized collectives after the GEMM 1 -> 0" in l for l in fused)
    named = [t for l in fused for t in re.findall(r"model\.layers\.\d+\.[a-z_]+\.[a-z_]+", l.split(": fused: ")[0] +
                                                   (l.split("(the same for ")[1] if "(the same for " in l else ""))]
    assert sorted(named) == sorted([f"model.layers.{i}.self_attn.o_proj" for i in range(4)] + ["model.layers.0.mlp.down_proj"])
    assert "steps of >= 16 tokens fused (prefill fused, decode sequential below 16 sequences)" in fused[0]
    assert any(l.startswith("note     t3 rules[2]: min_tokens 16 fuses steps the cost model predicts slower") for l in lines)


# -- every candidate, in report.json, the compile log and the inspect page ------------------------


def test_serialized_collectives_after_each_gemm_go_from_one_to_zero(tmp_path):
    reports = {}
    for name, rules in {"plain": (ATTN, DENSE), "t3": (ATTN, DENSE, O_PROJ % "")}.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(plan(2, *rules))
        art = compile("tiny-deepseek", path, tmp_path / name)
        reports[name] = json.loads((art.path / "report.json").read_text())
    plain, fused = (reports[k]["candidates"]["t3"] for k in ("plain", "t3"))
    targets = [f"model.layers.{i}.self_attn.o_proj" for i in range(4)] + ["model.layers.0.mlp.down_proj"]
    assert sorted(c["target"] for c in plain) == sorted(c["target"] for c in fused) == sorted(targets)
    assert {c["status"] for c in plain} == {"no rule"} and all(c["serialized_collectives_after"] == 1 for c in plain)
    by = {c["target"]: c for c in fused}
    for target in targets[:4]:
        assert by[target]["status"] == "fused" and by[target]["serialized_collectives_after"] == 0
        assert by[target]["steps"] == {"decode": "sequential", "prefill": "fused"} and by[target]["rule"] == 2
    down = by["model.layers.0.mlp.down_proj"]
    assert down["status"] == "no rule" and down["serialized_collectives_after"] == 1
    assert "no overlap rule matches model.layers.0.mlp.down_proj" in down["detail"]
    # a decode step below min_tokens runs the all-reduce; a prefill sends the ring's pieces and all-gathers
    decode, prefill = reports["t3"]["collectives_per_decode_step"], reports["t3"]["collectives_per_prefill"]
    assert decode["all_reduce"]["calls"] == 5 and reports["plain"]["collectives_per_prefill"]["all_reduce"]["calls"] == 5
    assert prefill["all_reduce"]["calls"] == 1 and prefill["send"]["calls"] == prefill["recv"]["calls"] == 4
    assert prefill["all_gather"]["calls"] == 4 and prefill["send"]["bytes_per_token"] == 4 * 128 * 4 // 2
    page = inspect.render(tmp_path / "t3")
    assert "t3: 4 fused, 1 no rule" in page and "no overlap rule matches model.layers.0.mlp.down_proj" in page
    assert "mla_tp <small>rules[0] rules[2]</small>" in page  # the attention cell keeps its strategy


def test_required_decline_is_a_located_error_and_without_required_a_reported_decline(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text(plan(2, ATTN, O_PROJ % ", chunks: 6, required: true"))
    with pytest.raises(CompileError, match=rf"{path}:7:5: rules\[1\]: t3 declined on model.layers.0.self_attn.o_proj "
                                           r"\(required: true\): the 128 output rows of model.layers.0.self_attn.o_proj do "
                                           r"not split into chunks: 6 \(a multiple of the 2 ranks dividing 128 is needed\); "
                                           r"valid chunks: 2, 4, 8, 16, 32, 64, 128"):
        compile("tiny-deepseek", path, tmp_path / "art")
    assert not (tmp_path / "art").exists()
    path.write_text(plan(2, ATTN, O_PROJ % ", chunks: 6"))
    lines: list[str] = []
    art = compile("tiny-deepseek", path, tmp_path / "art", log=lines.append)
    report = json.loads((art.path / "report.json").read_text())
    assert [d["target"] for d in report["declines"]] == [f"model.layers.{i}.self_attn.o_proj" for i in range(4)]
    entries = report["candidates"]["t3"]
    assert all(c["status"] == "declined" and c["rule"] == 1 and "valid chunks: 2, 4" in c["detail"] for c in entries)
    assert any(l.startswith("declined t3 on model.layers.3.self_attn.o_proj (rules[1]): the 128 output rows") for l in lines)
    declined = [l for l in lines if l.startswith("t3       model.layers.0.self_attn.o_proj: declined: the 128 output rows")]
    assert len(declined) == 1 and declined[0].endswith("(the same for 3 more: model.layers.1.self_attn.o_proj, "
                                                       "model.layers.2.self_attn.o_proj, model.layers.3.self_attn.o_proj)")
    assert report["collectives_per_prefill"]["all_reduce"]["calls"] == 4  # nothing was downgraded silently


def test_a_gemm_with_no_collective_after_it_is_declined_with_its_layout():
    rule = 'match: "model.layers.*.self_attn.q_b_proj"\n    overlap: {kind: t3, required: true}'
    with pytest.raises(CompileError, match=r"t3 declined on model.layers.0.self_attn.q_b_proj \(required: true\): "
                                           r"model.layers.0.self_attn.q_b_proj is column-parallel: no all-reduce or "
                                           r"reduce-scatter follows it, so there is nothing to overlap"):
        compiled("tiny-deepseek", plan(2, ATTN, rule))
    _, ctx, _ = compiled("tiny-deepseek", plan(2, rule.replace("required: true", "required: false")), strict=False)
    assert "q_b_proj is replicated: no all-reduce" in ctx.records[0].detail


def test_output_consumed_before_the_collective_is_declined():
    graph, _, _ = compiled("tiny-deepseek", plan(2, ATTN))
    o_proj = next(n for n in nodes_of(graph, "linear") if info(n).fqn == "model.layers.1.self_attn.o_proj")
    with graph.inserting_after(o_proj):  # a partial sum read before it is summed
        add_node(graph, "add", (o_proj, o_proj), info(o_proj).with_(kind="add", rule=None))
    ref, _, section = rule_refs(parse_plan_text(plan(2, ATTN, O_PROJ % ""), "plan.yaml"))[1]
    for node in nodes_of(graph, "linear"):
        if info(node).fqn.endswith("o_proj"):
            node.meta["planc"] = info(node).with_(bindings=(ref,))
    ctx = PassContext(2)
    ctx.current, ctx.rule = "t3", ref
    out = t3.t3(graph, section, ctx)
    declined = [r for r in ctx.records if r.action == "declined"]
    assert [r.target for r in declined] == ["model.layers.1.self_attn.o_proj"]
    assert declined[0].detail.startswith("its output is consumed before the collective (by add")
    assert len(nodes_of(out, "t3_linear_all_reduce")) == 3


def test_kind_is_the_section_discriminator():
    text = plan(2, ATTN, 'match: "model.layers.*.self_attn.o_proj"\n    overlap: {kind: t4}')
    with pytest.raises(PlanError, match=r"plan.yaml:8:15: rules\[1\].overlap.kind: Input should be 't3' \(got 't4'\)"):
        parse_plan_text(text, "plan.yaml")
    with pytest.raises(PlanError, match=r"rules\[1\].overlap.chunks"):
        parse_plan_text(text.replace("kind: t4", "kind: t3, chunks: many"), "plan.yaml")


# -- the ring, on thread ranks -----------------------------------------------------------------


def _rank_inputs(world: int, pieces: int, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(3, 5, 24, generator=gen).to(dtype) for _ in range(world)]
    ws = [torch.randn(8 * pieces, 24, generator=gen).to(dtype) for _ in range(world)]
    bs = [torch.randn(8 * pieces, generator=gen).to(dtype) if r == 0 else torch.zeros(8 * pieces, dtype=dtype)
          for r in range(world)]  # a row-parallel bias lives on rank 0
    return xs, ws, bs


@pytest.mark.parametrize("world, per_rank", [(2, 1), (2, 3), (3, 1), (3, 2), (4, 1), (4, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ring_equals_the_ring_order_reference_bitwise(world, per_rank, dtype):
    pieces = world * per_rank
    xs, ws, bs = _rank_inputs(world, pieces, dtype, seed=world * 10 + per_rank)

    def body(comm):
        r = comm.rank
        x_MK = xs[r].reshape(-1, 24)
        mine = t3.ring_reduce_scatter(comm, t3.TorchPieces(Ops(), x_MK, ws[r], bs[r], pieces))
        return mine, t3.linear_all_reduce(Ops(), comm, xs[r], ws[r], bs[r], chunks=pieces, min_tokens=15)

    got = run_threads(body, world)
    want = t3.ring_reference(Ops(), [x.reshape(-1, 24) for x in xs], ws, bs, pieces)
    for (mine, whole), chunk in zip(got, want):
        assert torch.equal(mine, chunk)  # same GEMM per piece, same summation order: bitwise
        assert torch.equal(whole, torch.cat(want, -1).view(3, 5, -1))
    plain = sum(torch.nn.functional.linear(xs[r].float(), ws[r].float(), bs[r].float()) for r in range(world))
    # fp32: 2-4 partial sums of 24-term dots of O(1) values; bf16 rounds each partial and each sum.
    tol = 1e-5 if dtype == torch.float32 else 6e-2
    torch.testing.assert_close(got[0][1].float(), plain, rtol=tol, atol=tol * 10)


def test_reference_order_matters_so_the_bitwise_check_can_fail():
    xs, ws, bs = _rank_inputs(4, 4, seed=7)
    ring = torch.cat(t3.ring_reference(Ops(), [x.reshape(-1, 24) for x in xs], ws, bs, 4), -1)
    rank_order = sum(torch.nn.functional.linear(x.reshape(-1, 24), w, b) for x, w, b in zip(xs, ws, bs))
    assert not torch.equal(ring, rank_order)  # another association of the same four sums


def test_below_min_tokens_the_step_runs_gemm_then_all_reduce():
    xs, ws, bs = _rank_inputs(2, 2)

    def body(comm):
        y = t3.linear_all_reduce(Ops(), comm, xs[comm.rank], ws[comm.rank], bs[comm.rank], chunks=2, min_tokens=16)
        return y, comm.all_reduce(torch.nn.functional.linear(xs[comm.rank], ws[comm.rank], bs[comm.rank]))

    for fused, sequential in run_threads(body, 2):
        assert torch.equal(fused, sequential)  # 15 tokens < 16: the same calls as without T3


class _Watched(ThreadComm):
    """A thread rank that notes, at every send, which pieces' counters are complete."""

    def __init__(self, rank: int, world: int, exchange: _Exchange, made: Pieces):
        super().__init__(rank, world, exchange)
        self.made, self.at_send = made, []

    def isend(self, x, dst):
        self.at_send.append((dst, [p for p in range(self.made.num) if self.made.ready(p)],
                             [int(c) for c in self.made.counters]))
        return super().isend(x, dst)


@pytest.mark.parametrize("world, per_rank", [(2, 2), (3, 1), (4, 1)])
def test_kernel_pieces_go_out_in_ring_order_once_complete(world, per_rank):
    pieces = world * per_rank
    xs, ws, bs = _rank_inputs(world, pieces, seed=3)
    exchange = _Exchange(world)
    made = [Pieces(xs[r].reshape(-1, 24), ws[r], bs[r], r, world, pieces) for r in range(world)]
    comms = [_Watched(r, world, exchange, made[r]) for r in range(world)]
    got = run_threads(lambda comm: t3.ring_reduce_scatter(comms[comm.rank], made[comm.rank]), world)
    tiles = tiles_per_piece(15, 8 * pieces, 24, pieces, xs[0].element_size())
    for rank, comm in enumerate(comms):
        order = ring_piece_order(rank, world, pieces)
        assert order[:per_rank] == [(rank + 1) % world * per_rank + j for j in range(per_rank)]
        assert len(comm.at_send) == (world - 1) * per_rank
        for i, (dst, complete, counters) in enumerate(comm.at_send):
            # the i-th send leaves as soon as piece order[i] is complete, before later pieces start
            assert dst == (rank - 1) % world and complete == sorted(order[:i + 1])
            assert [counters[p] for p in order] == [tiles] * (i + 1) + [0] * (pieces - i - 1)
        assert [int(c) for c in made[rank].counters] == [tiles] * pieces
    want = t3.ring_reference(Ops(), [x.reshape(-1, 24) for x in xs], ws, bs, pieces)
    for mine, chunk in zip(got, want):
        # the kernel's tiles against ops.linear's pieces: fp32 sums of 24 terms, ~1e-6.
        torch.testing.assert_close(mine, chunk, rtol=1e-5, atol=1e-5)


# -- the cost model ----------------------------------------------------------------------------


def test_prediction_on_round_numbers():
    """2 ranks, a compute-bound GEMM of 2 ms, 2 MB of output, 1 GB/s links, no latency:
    sequential = 2 ms + all-reduce 2 MB = 4 ms; fused: piece 0 (1 ms) is sent (1 ms) while piece 1
    is made (ready at 2 ms), then the all-gather of 1 MB (1 ms) = 3 ms."""
    hw = cost.Hardware("toy", flops=1e12, mem_bw=1e30, mem_bytes=0, link_bw=1e9, latency=0.0)
    sequential, fused = t3.predict(hw, 1000, 1000, 1000, world=2, pieces=2, e=2)
    assert sequential == pytest.approx(4e-3) and fused == pytest.approx(3e-3)
    slow_link = cost.Hardware("toy", flops=1e12, mem_bw=1e30, mem_bytes=0, link_bw=1e8, latency=0.0)
    sequential, fused = t3.predict(slow_link, 1000, 1000, 1000, world=2, pieces=2, e=2)
    assert sequential - fused == pytest.approx(2e-3 / 2)  # only half the GEMM is left to hide under


def test_prediction_loses_on_decode_and_pays_on_long_prefills_at_eight_ranks():
    """DeepSeek-V3's o_proj at TP 8: the per-message latency sinks a decode step; a long prefill wins."""
    for name in t3.PROFILES:
        hw = cost.PROFILES[name]
        decode = t3.predict(hw, 8, 16384 // 8, 7168, world=8, pieces=8)
        prefill = t3.predict(hw, 16384, 16384 // 8, 7168, world=8, pieces=8)
        assert decode[1] > decode[0] and prefill[1] < prefill[0]
        pays = t3.pays_from(hw, 16384 // 8, 7168, world=8, pieces=8)
        assert 8 < pays <= 16384 and t3.predict(hw, pays, 2048, 7168, 8, 8)[1] < t3.predict(hw, pays, 2048, 7168, 8, 8)[0]


def test_auto_chunks_pick_the_predicted_fastest_valid_count():
    assert t3.valid_chunks(128, 2) == [2, 4, 8, 16]  # multiples of the ranks, up to 8 per rank, dividing 128
    assert t3.valid_chunks(7168, 8) == [8, 16, 32, 56, 64]
    _, ctx, _ = compiled("tiny-deepseek", plan(4, ATTN, O_PROJ % ""))
    # a GEMM this small is latency-bound on every profile: each extra message only adds latency
    assert {r.detail.split(":")[1].split(",")[0] for r in ctx.records if r.pass_name == "t3"} == {" 4 pieces"}


def test_auto_min_tokens_is_where_the_model_predicts_a_gain_on_every_profile():
    graph, ctx, _ = compiled("tiny-deepseek", plan(2, ATTN, 'match: "model.layers.*.self_attn.o_proj"\n'
                                                           '    overlap: {kind: t3}'))
    node = nodes_of(graph, "t3_linear_all_reduce")[0]
    pays = [t3.pays_from(cost.PROFILES[h], 64, 128, world=2, pieces=2) for h in t3.PROFILES]
    assert info(node).shard.min_tokens == max(pays) > 4096  # a 64 x 128 GEMM is latency-bound up to long prefills
    assert "(auto: where the cost model predicts T3 faster on every profile)" in ctx.records[-1].detail
    assert not any(line.startswith("t3 ") for line in ctx.advice)  # auto needs no advice
    v3 = [t3.pays_from(cost.PROFILES[h], 16384 // 2, 7168, world=2, pieces=2) for h in t3.PROFILES]
    assert max(v3) <= 8  # DeepSeek-V3's o_proj at TP 2: the ring pays from a decode batch on

"""The moe bench case's parts: the instrumented program, the figures on thread ranks, the goals and
the cost model (the full case is a benchmark, not a test)."""
from __future__ import annotations

import json

import pytest

from planc.bench import moe as moe_case
from planc.codegen.artifact import program_file
from planc.runtime.threads import run_threads

SHUFFLED, PLAIN = "deepseek_moe_semantic.yaml", "deepseek_mla_tp_ep.yaml"


def _nodes(artifact) -> list[dict]:
    return list(json.loads((artifact / "report.json").read_text())["graph_nodes"].values())[-1]


@pytest.mark.parametrize("plan,first,last", [(PLAIN, "all_reduce", "add"),
                                             (SHUFFLED, "moe_shuffle", "shuffle_all_gather")])
def test_each_moe_layer_is_timed_from_the_attention_sum_to_the_restored_output(compiled, plan, first, last):
    artifact = compiled(plan, 2)
    nodes = _nodes(artifact)
    kinds = {n["name"]: n["kind"] for n in nodes}
    spans = moe_case.moe_spans(nodes)
    assert list(spans) == ["model.layers.1.mlp", "model.layers.2.mlp", "model.layers.3.mlp"]
    assert all((kinds[a], kinds[b]) == (first, last) for a, b in spans.values())
    lines = moe_case.instrument((artifact / program_file("target")).read_text(), nodes).splitlines()
    for fqn, (a, b) in spans.items():
        begin, end = lines.index(f"    PROBE.begin({fqn!r})"), lines.index(f"    PROBE.end({fqn!r})")
        assert lines[begin + 1].startswith(f"    {a} = ") and lines[end - 1].startswith(f"    {b} = ")
        assert sum(l.startswith(f"    PROBE.route({fqn!r}") for l in lines[begin:end]) == 1


def test_figures_on_thread_ranks(compiled):
    artifacts = {"contiguous": str(compiled(PLAIN, 2)), "semantic+token_shuffle": str(compiled(SHUFFLED, 2))}
    args = {"artifacts": artifacts, "windows": 8, "per_step": 4}  # a warm-up step and one measured
    ranks = run_threads(lambda comm: moe_case.measure(comm, args), 2)
    seen = [{name: {k: v for k, v in p.items() if k != "seconds"} for name, p in r["probes"].items()} for r in ranks]
    assert all(s == seen[0] for s in seen)  # every rank sees every token's route
    rows = moe_case.summarize(2, ranks, moe_layers=3, hidden_bytes=128 * 4)
    plain, ours = rows["contiguous"], rows["semantic+token_shuffle"]
    assert ranks[0]["tokens"] == 4 * 256 and all(len(r["times"]["contiguous"]) == 1 for r in ranks)
    assert 0.4 < plain["local_activation_rate"] < 0.6  # token slices: about half the activations local at 2 ranks
    assert ours["local_activation_rate"] > plain["local_activation_rate"] + 0.15
    assert ours["a2a_rows_per_token"] < plain["a2a_rows_per_token"] and ours["load_imbalance"] >= 1
    assert ours["a2a_rows_per_token_floor"] <= ours["a2a_rows_per_token"]
    assert 0.5 < ours["predictor_precision"] <= 1 and "predictor_precision" not in plain
    assert plain["moe_time_vs_contiguous"] == 1.0


def _row(rows: float, lar: float, imbalance: float = 1.1) -> dict:
    return {"a2a_rows_per_token": rows, "a2a_bytes_per_token": rows * 1024, "local_activation_rate": lar,
            "load_imbalance": imbalance}


def test_goals_and_the_cost_model_follow_the_measured_locality():
    ep4 = {"contiguous": _row(1.3, 0.25), "eplb": _row(1.4, 0.25, 1.05), "semantic": _row(1.3, 0.25),
           "semantic+token_shuffle": _row(0.7, 0.55, 1.2)}
    assert all(moe_case.goals(ep4).values())
    assert not moe_case.goals(ep4 | {"semantic+token_shuffle": _row(0.9, 0.55)})["a2a_bytes_cut_by_40_percent"]
    cost = moe_case.predicted(ep4)
    assert set(cost) == {f"8x{hw} {step} ({t} tokens/GPU)" for hw in ("H100", "H200")
                         for step, t in moe_case.TOKENS_PER_GPU.items()}
    for figures in cost.values():
        assert figures["contiguous"]["vs_contiguous"] == 1.0
        assert figures["contiguous"]["remote_rows_per_token"] == pytest.approx(moe_case.V3_REMOTE_CONTIGUOUS)
        assert figures["semantic+token_shuffle"]["vs_contiguous"] < 1.0  # fewer rows and a halved first collective

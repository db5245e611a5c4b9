"""plans/deepseek_moe_semantic.yaml end to end: planc verify at 2 and 4 gloo ranks, report.json's
collectives against what the Comm wrapper counted, and re-planning from the stored profile."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from planc import shuffle
from planc.driver import parallelize
from planc.ir import info
from planc.lift import lift
from planc.models.registry import load_model
from planc.plan import parse_plan_text
from planc.codegen.artifact import weights_file
from planc.ops import Ops
from planc.runtime.artifact import ArtifactDir
from planc.runtime.kernel_ops import make_ops
from planc.weights import Weights
from planc.verify import verify
from tests.conftest import PLANS

PLAN = "deepseek_moe_semantic.yaml"


@pytest.mark.parametrize("devices", [2, 4])
def test_planc_verify_agrees_with_the_single_device_model(compiled, devices):
    report = verify(compiled(PLAN, devices), max_new_tokens=12, timeout_s=300)
    assert report["passed"] and report["token_agreement"] == 1.0 and report["max_logit_diff"] <= 1e-4, report


def test_report_counts_what_a_gloo_run_moves(compiled):
    from planc.run import run

    artifact = compiled(PLAN, 4)
    report = json.loads((artifact / "report.json").read_text())
    result = run(artifact, max_new_tokens=5, timeout_s=300)
    measured, predicted = result["collectives_per_decode_step"], report["collectives_per_decode_step"]
    assert {op: c["calls"] for op, c in measured.items()} == {op: c["calls"] for op, c in predicted.items()}
    assert predicted["reduce_scatter"]["calls"] == 3 and predicted["all_reduce"]["calls"] == 4 + 1 - 3
    batch = len(result["tokens"])
    for op in ("reduce_scatter", "all_reduce", "all_gather_varlen"):  # exact: they do not depend on the routing
        assert measured[op]["bytes"] == predicted[op]["bytes_per_token"] * batch
    assert measured["all_to_all"]["bytes"] <= predicted["all_to_all"]["bytes_per_token_max"] * batch


def test_a_meta_compile_re_plans_from_the_stored_profile(compiled):
    artifact = compiled(PLAN, 4)
    stored = json.loads((artifact / "report.json").read_text())
    text, found = re.subn(r"profile: \{tokens: (\d+)\}", lambda m: f"profile: {{tokens: {m[1]}, artifact: '{artifact}'}}",
                          (PLANS / PLAN).read_text())
    assert found == 1
    meta = load_model("tiny-deepseek", meta=True)
    graph, ctx = parallelize(lift(meta, check=False).graph, parse_plan_text(text, "replan.yaml"), meta, meta=True)
    owners = {info(n).fqn: list(info(n).shard.owner) for n in graph.nodes
              if "planc" in n.meta and info(n).kind == "moe_experts"}
    assert owners == {fqn: note["heatmap"]["owner"] for fqn, note in stored["notes"]["ep"].items()}
    assert not ctx.advice and all(r.action == "applied" for r in ctx.records if r.pass_name == "ep")


def test_triton_backend_runs_experts_and_permutations_with_the_artifacts_kernels(compiled):
    """--kernels triton: routed experts as grouped GEMMs over expert-sorted rows, and the shuffle's
    permutations, with the kernels the artifact ships, against the reference ops. (The interpreter is
    not thread-safe, so this checks the ops one rank runs rather than thread ranks.)"""
    artifact = ArtifactDir(compiled(PLAN, 2))
    ops, reference = make_ops("triton", artifact), Ops()
    W = Weights(load_file(artifact.path(weights_file("target", 0))))
    experts = W.scope("model.layers.2.mlp.experts")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(19, 128, generator=gen)
    weight = torch.rand(19, 4, generator=gen) * (torch.rand(19, 4, generator=gen) < 0.4)  # some rows use no expert here
    # fp32 GEMMs in tiles against torch's: ~1e-6 relative
    torch.testing.assert_close(ops.moe_experts(x, weight, experts, "silu"),
                               reference.moe_experts(x, weight, experts, "silu"), rtol=1e-5, atol=1e-5)
    plan = shuffle.plan_tokens(torch.randint(0, 260, (3, 5), generator=gen),
                               W.scope("model.layers.2.mlp.shuffle"), torch.randint(0, 2, (15,)), 2, 0)
    h = torch.randn(3, 5, 128, generator=gen)
    rows = plan.permute(ops, h)
    assert torch.equal(rows, plan.permute(reference, h)) and torch.equal(plan.unpermute(ops, rows, h), h)

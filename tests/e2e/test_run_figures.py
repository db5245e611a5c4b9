"""report.json's collective figures against what the Comm wrapper measured in a real run,
`--kernels triton` against `--kernels torch`, and a rank that fails mid-run."""
from __future__ import annotations

import hashlib
import json
import shutil
import time

import pytest

from planc.cli import main
from planc.codegen.artifact import manifest_digest
from planc.run import format_run, run
from planc.verify import verify


def _report(artifact):
    return json.loads((artifact / "report.json").read_text())


@pytest.mark.parametrize("plan,world", [("deepseek_mla_tp_ep.yaml", 2), ("deepseek_mla_tp_ep.yaml", 4), ("draft_tp.yaml", 2)])
def test_report_collectives_equal_measured(compiled, plan, world):
    artifact = compiled(plan, world)
    report = _report(artifact)
    result = run(artifact, max_new_tokens=6, timeout_s=300)
    measured = result["collectives_per_decode_step"]
    predicted = report["collectives_per_decode_step"]
    assert {op: c["calls"] for op, c in measured.items()} == {op: c["calls"] for op, c in predicted.items()}
    batch = len(result["tokens"])  # one token per row per decode step
    assert measured["all_reduce"]["bytes"] == predicted["all_reduce"]["bytes_per_token"] * batch
    if "all_gather_varlen" in predicted:
        assert measured["all_gather_varlen"]["bytes"] == predicted["all_gather_varlen"]["bytes_per_token"] * batch
        assert measured["all_to_all"]["bytes"] <= predicted["all_to_all"]["bytes_per_token_max"] * batch


def test_collective_counts_follow_the_formula(compiled):
    """One all-reduce per attention layer and per dense MLP; dispatch + combine (+ restore) per MoE layer."""
    report = _report(compiled("deepseek_mla_tp_ep.yaml", 2))
    layers, moe_layers = 4, 3
    per_step = report["collectives_per_decode_step"]
    assert per_step["all_reduce"]["calls"] == layers + (layers - moe_layers)
    assert per_step["all_to_all"]["calls"] == 2 * moe_layers
    assert per_step["all_gather_varlen"]["calls"] == moe_layers


def test_mla_tp_kv_width_is_latent_plus_rope_on_every_rank(compiled):
    report = _report(compiled("deepseek_mla_tp_ep.yaml", 2))
    assert set(report["kv_width_per_rank"].values()) == {64 + 16}
    assert all(r["kv_bytes_per_token"] == 4 * (64 + 16) * 4 for r in report["per_rank"])  # layers x width x fp32


def test_triton_kernels_give_the_same_tokens(compiled):
    artifact = compiled("deepseek_mla_tp_ep.yaml", 2)
    prompts = ["def f(x):"]
    torch_run = run(artifact, prompts=prompts, max_new_tokens=5, kernels="torch", timeout_s=300)
    triton_run = run(artifact, prompts=prompts, max_new_tokens=5, kernels="triton", timeout_s=500)
    assert triton_run["tokens"] == torch_run["tokens"]


@pytest.mark.skipif(shutil.which("cc") is None, reason="--kernels cpu needs a C compiler")
def test_cpu_kernels_match_transformers(compiled):
    """--kernels cpu: MLA decode through the fused C kernel, checked like the torch reference."""
    report = verify(compiled("deepseek_mla_tp_ep.yaml", 2), max_new_tokens=9, kernels="cpu", timeout_s=300)
    assert report["token_agreement"] == 1.0 and report["max_logit_diff"] <= 1e-4, report


def _reseal(artifact, rel):
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["files"][rel] = hashlib.sha256((artifact / rel).read_bytes()).hexdigest()
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (artifact / "manifest.json").write_text(json.dumps(manifest))


def test_failing_rank_ends_the_run(compiled, tmp_path, capsys):
    artifact = tmp_path / "faulty"
    shutil.copytree(compiled("deepseek_mla_tp_ep.yaml", 2), artifact)
    program = artifact / "programs" / "target" / "program.py"
    marker = "    ops, comm, W, caches = rt.ops, rt.comm, rt.weights, rt.kv\n"
    fault = marker + "    if comm.rank == 1 and step.start > 0:\n        raise RuntimeError('injected fault in decode')\n"
    program.write_text(program.read_text().replace(marker, fault))
    _reseal(artifact, "programs/target/program.py")  # an edit the manifest vouches for, as a compile would
    started = time.monotonic()
    code = main(["run", str(artifact), "--max-new-tokens", "4", "--timeout", "120"])
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    assert code != 0
    assert elapsed < 60
    assert "rank 1" in err and "injected fault in decode" in err


def test_seeded_sampling_is_reproducible_and_identical_on_all_ranks(compiled):
    artifact = compiled("deepseek_mla_tp_ep.yaml", 2)
    sampled = [run(artifact, prompts=["x = "], max_new_tokens=8, sampling={"temperature": 1.0, "seed": s}, timeout_s=300)
               for s in (7, 7, 8)]
    assert sampled[0]["tokens"] == sampled[1]["tokens"]
    assert all(s["ranks_agree"] for s in sampled)
    assert sampled[0]["tokens"] != sampled[2]["tokens"]  # 8 draws over 260 ids: equal by chance ~never


def test_speculative_run_prints_acceptance_and_its_collectives_equal_the_report(compiled, capsys):
    """plans/deepseek_easyspec.yaml on 4 gloo ranks: the acceptance figures and each rank's draft
    work are printed; per round, the verification makes the target's decode-step collectives, the
    G - 1 drafting forwards one gather per group, the calibration one per grouped layer."""
    artifact = compiled("deepseek_easyspec.yaml", 4)
    assert main(["run", str(artifact), "--max-new-tokens", "12", "--json", "--timeout", "300"]) == 0
    result = json.loads(capsys.readouterr().out)
    spec, report = result["speculation"], _report(artifact)
    assert result["ranks_agree"] and spec["rounds"] == result["decode_steps"] >= 2
    assert 0 < spec["accepted"] <= spec["drafted"] and spec["draft_sequential_depth"] == 4.5  # (6 + 3 * 4) / 4
    assert [w["grouped_attention"] for w in spec["draft_work_per_rank"]] == [spec["rounds"] * 4 + 1] * 4
    per_round, rows = spec["collectives_per_round"], len(result["tokens"])
    drafting = report["draft"]["entry_points"]["forward_layer_parallel"]["collectives_per_step"]["all_gather_varlen"]
    assert per_round["draft"]["all_gather_varlen"]["calls"] == 3 * drafting["calls"] == 3 * 2
    assert per_round["draft"]["all_gather_varlen"]["bytes"] == 3 * drafting["bytes_per_token"] * rows
    assert per_round["calibrate"]["all_gather_varlen"]["calls"] == 4
    assert {op: c["calls"] for op, c in per_round["verify"].items()} == \
        {op: c["calls"] for op, c in report["collectives_per_decode_step"].items()}
    text = format_run(result)
    assert "acceptance rate" in text and "rank 3 draft work" in text and "EasySpec layer_parallel 2" in text


def test_batches_run_in_one_launch_and_their_collectives_add_up(compiled, capsys):
    """--batch-size 2 over the 3 default prompts: two batches, one after another, on the same ranks;
    per round, the verification's collectives summed over both batches still equal the report's
    decode step, and tokens/s is every decoded token over every batch's decode time."""
    artifact = compiled("deepseek_easyspec.yaml", 4)
    assert main(["run", str(artifact), "--batch-size", "2", "--max-new-tokens", "8", "--json", "--timeout", "300"]) == 0
    result = json.loads(capsys.readouterr().out)
    spec, rows = result["speculation"], len(result["tokens"])
    assert (result["batch_size"], result["batches"], rows) == (2, 2, 3) and result["ranks_agree"]
    assert result["decode_tokens"] == result["new_tokens"] - rows
    assert result["decode_tokens_per_s"] == result["decode_tokens"] / result["decode_s"]
    assert spec["rounds"] == result["decode_steps"] and spec["verified"] == spec["drafted"] / spec["tokens"]
    assert {op: c["calls"] for op, c in spec["collectives_per_round"]["verify"].items()} == \
        {op: c["calls"] for op, c in _report(artifact)["collectives_per_decode_step"].items()}
    assert "batch 2: 3 prompts in 2 batches, one after another" in format_run(result)


def test_speculative_verify_agrees_with_the_target_alone(compiled):
    report = verify(compiled("deepseek_easyspec.yaml", 4), max_new_tokens=10, timeout_s=300)
    assert report["passed"] and report["token_agreement"] == 1.0, report
    assert report["speculation"]["rounds"] >= 2

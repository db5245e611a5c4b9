"""torch.compile(model, backend="planc"): Dynamo's graph through planc's pipeline, in process and on ranks."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T

from planc.codegen.artifact import program_file
from planc.models.registry import load_model
from planc.runtime.launch import launch
from planc.torch_compile import compile_records
from tests.conftest import ROOT, plan_for
from tests.lift.test_layouts import configs
from tests.models import TP_PLAN

ONE_DEVICE = """version: 1
mesh: {devices: 1}
model: {source: tiny-deepseek, dtype: float32}
rules:
  - match: "model.layers.*.self_attn"
    attention: {strategy: replicated}
"""
QWEN3_TP = TP_PLAN
TOLERANCE = 1e-4  # fp32: planc's ops sum in other orders than transformers' (and over 2 ranks)


def test_a_fresh_process_finds_the_backend_through_its_entry_point():
    code = ("import sys, torch\nfrom torch._dynamo.backends.registry import lookup_backend\n"
            "fn = lookup_backend('planc')\nprint(fn.__module__, fn.__name__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["planc.torch_compile", "planc_backend"], done.stderr


def test_an_unknown_option_lists_the_valid_ones(tmp_path):
    torch._dynamo.reset()
    model = torch.nn.Linear(2, 2)
    compiled = torch.compile(model, backend="planc", options={"plan": "p.yaml", "dtype": "bf16"})
    with pytest.raises(Exception, match="unknown option 'dtype'; valid options are plan, strict, kernels"):
        compiled(torch.ones(1, 2))


def test_one_device_in_process_decodes_16_steps_with_at_most_two_compiles(tmp_path):
    torch._dynamo.reset()
    (tmp_path / "plan.yaml").write_text(ONE_DEVICE)
    model = load_model("tiny-deepseek", dtype="float32")
    compiled = torch.compile(model, backend="planc", options={"plan": str(tmp_path / "plan.yaml")})
    before = len(compile_records())
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    worst = 0.0
    for _ in range(17):  # the prompt, then 16 decode steps on the growing sequence
        got = compiled(ids, use_cache=False).logits
        with torch.no_grad():
            want = model(ids, use_cache=False).logits
        worst = max(worst, (got - want).abs().max().item())
        ids = torch.cat([ids, want[:, -1:].argmax(-1)], 1)
    records = compile_records()[before:]
    assert 1 <= len(records) <= 2, records
    assert all(r.reused for r in records[1:]) and len({r.artifact for r in records}) == 1
    assert worst <= TOLERANCE


def test_blocks_run_as_captured_compile_through_the_backend(tmp_path):
    """Starcoder2's LayerNorm norms and c_fc / c_proj MLP run as captured: planc exports them while
    Dynamo is compiling the user's frame, which must leave Dynamo's own guards intact."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(configs()["starcoder2_window"]).eval()
    (tmp_path / "plan.yaml").write_text('version: 1\nmesh: {devices: 1}\nrules:\n  - match: "model.layers.*.self_attn"\n'
                                        '    attention: {strategy: tp}\n')
    compiled = torch.compile(model, backend="planc", options={"plan": str(tmp_path / "plan.yaml")})
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits
    assert (got - want).abs().max().item() <= TOLERANCE
    program = (Path(compile_records()[-1].artifact) / program_file("target")).read_text()
    assert "as torch.export captured it" in program  # the blocks did run as captured


@pytest.mark.slow
def test_two_gloo_ranks_give_the_eager_logits_for_deepseek_and_qwen3(tmp_path):
    (tmp_path / "qwen3.yaml").write_text(QWEN3_TP)
    plans = {"tiny-deepseek": str(plan_for(tmp_path, "deepseek_mla_tp_ep.yaml", 2)), "qwen3": str(tmp_path / "qwen3.yaml")}
    results = launch("tests.backend.workers:eager_and_compiled", {"plans": plans}, 2, timeout_s=600)
    for rank, r in enumerate(results):
        assert set(r["max_abs_diff"]) == set(plans), r
        assert all(diff <= TOLERANCE for diff in r["max_abs_diff"].values()), (rank, r)
        assert r["compiles"] <= 2 * len(plans), (rank, r)

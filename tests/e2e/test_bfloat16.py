"""bfloat16 end to end: the example plan with model.dtype bfloat16, compiled and run on 2 gloo ranks,
against transformers' generate() in bfloat16 on one process (what `planc verify` does)."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from planc.driver import compile
from planc.models.tokenizer import ByteTokenizer
from planc.runtime.artifact import read_manifest
from planc.runtime.launch import launch
from planc.verify import compare, default_prompt_ids, reference_generate
from tests.conftest import PLANS

NEW_TOKENS = 17  # the prefill's token + 16 decode steps, as in the fp32 test


def _bf16_plan(tmp: Path) -> Path:
    data = yaml.safe_load((PLANS / "deepseek_mla_tp_ep.yaml").read_text())
    data["model"]["dtype"] = "bfloat16"
    path = tmp / "deepseek_mla_tp_ep_bf16.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _step_diffs(ref_tokens, ref_logits, got_tokens, got_logits) -> list[float]:
    """max |logit difference| of every (row, step) where both still agree on the prefix."""
    diffs = []
    for row, (want, got) in enumerate(zip(ref_tokens, got_tokens)):
        for step, token in enumerate(want):
            if step >= len(got) or got[step] != token:
                break
            diffs.append((torch.tensor(got_logits[step][row]) - ref_logits[step][row]).abs().max().item())
    return diffs


def _is_bf16(x: torch.Tensor) -> bool:
    return torch.equal(x, x.bfloat16().float())


def test_bfloat16_plan_matches_transformers_in_bfloat16_on_two_ranks(tmp_path):
    artifact = compile(None, _bf16_plan(tmp_path), tmp_path / "art").path
    manifest = read_manifest(artifact)
    assert manifest["dtype"] == "bfloat16" and manifest["world_size"] == 2
    prompts = default_prompt_ids(manifest, ByteTokenizer())
    ref_tokens, ref_logits = reference_generate(manifest, prompts, NEW_TOKENS)
    args = {"artifact": str(artifact), "prompts": prompts, "max_new_tokens": NEW_TOKENS, "stop_at_eos": False,
            "keep_logits": True, "kernels": "torch"}
    results = launch("planc.runtime.worker:main", args, 2, timeout_s=300)
    got = results[0]
    report = compare(ref_tokens, ref_logits, got["tokens"], got["logits"])
    diffs = _step_diffs(ref_tokens, ref_logits, got["tokens"], got["logits"])
    assert all(r["tokens"] == got["tokens"] for r in results), "ranks disagree"
    # Both sides computed in bfloat16: every logit (upcast to fp32 for the comparison) is a bf16 value.
    assert all(_is_bf16(l) for l in ref_logits) and all(_is_bf16(torch.tensor(l)) for l in got["logits"])
    assert report["tokens_compared"] == 3 * NEW_TOKENS
    # Measured: all 51 greedy tokens equal. bf16 keeps 8 significant bits and the ranks (and the
    # absorbed MLA form) round at other points than transformers, so a near-tied argmax may flip
    # on another machine; a row counts as lost from its first divergence, and 0.95 (48 of 51) allows
    # one row to diverge in its last 2 steps.
    assert report["token_agreement"] >= 0.95, report
    # Logits here are below 32 in magnitude, where one bf16 step is 0.125. Measured: median 0.0625,
    # all but one of 51 (row, step) within 0.25 (2 steps). The exception (0.70; 1.94 at 1 and 4
    # ranks) is a MoE routing flip: a 2-step difference in a hidden state swaps two experts whose
    # router scores differ by < 0.004, which moves that token's logits by up to ~2. So: the typical
    # step within one bf16 step, at most 3 steps beyond 2 bf16 steps, none beyond a flip's reach.
    assert report["median_logit_diff"] <= 0.125, diffs
    assert sum(d > 0.25 for d in diffs) <= 3, diffs
    assert report["max_logit_diff"] <= 3.0, report

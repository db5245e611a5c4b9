"""T3 end to end on plans/deepseek_mla_tp_ep_t3.yaml: the same greedy tokens as the plan without it
at 2 and 4 ranks, planc verify's agreement, and per-rank bytes of a real gloo run against the ring
formulas and report.json."""
from __future__ import annotations

import json

import pytest
import torch

from planc.models.tokenizer import artifact_tokenizer
from planc.ops import Ops
from planc.passes import t3
from planc.ring import ring_all_gather_bytes, ring_reduce_scatter_bytes
from planc.runtime.artifact import ArtifactDir, open_artifact
from planc.runtime.decode import generate
from planc.runtime.kernel_ops import make_ops
from planc.runtime.launch import launch
from planc.runtime.model import Model
from planc.runtime.threads import run_threads
from planc.verify import compare, default_prompt_ids, reference_generate, verify

PLAN, PLAIN = "deepseek_mla_tp_ep_t3.yaml", "deepseek_mla_tp_ep.yaml"
FUSED_GEMMS, HIDDEN, F32 = 5, 128, 4  # four o_proj and layer 0's down_proj; tiny-deepseek's width


def _prompts(artifact) -> list[list[int]]:
    """planc verify's prompts, through the artifact's tokenizer."""
    opened = open_artifact(artifact)
    return default_prompt_ids(opened.manifest, artifact_tokenizer(opened.manifest, opened.tokenizer_dir()))


def _threads(artifact, world: int, steps: int = 12):
    prompts = _prompts(artifact)

    def body(comm):
        return generate(Model(artifact, comm=comm), prompts, steps, keep_logits=True)

    return run_threads(body, world)[0]


@pytest.mark.parametrize("devices", [2, 4])
def test_same_greedy_tokens_as_the_plan_without_t3(compiled, devices):
    fused, plain = _threads(compiled(PLAN, devices), devices), _threads(compiled(PLAIN, devices), devices)
    assert fused.tokens == plain.tokens
    # fp32: the ring adds 2-4 partial sums in another order than the all-reduce, per output piece.
    assert max((a - b).abs().max().item() for a, b in zip(fused.step_logits, plain.step_logits)) <= 1e-4


def test_planc_verify_agrees_at_two_ranks(compiled):
    report = verify(compiled(PLAN, 2), max_new_tokens=16, timeout_s=300)
    assert report["passed"] and report["token_agreement"] == 1.0 and report["max_logit_diff"] <= 1e-4, report


def test_gloo_run_at_four_ranks_counts_a_ring_reduce_scatter_per_fused_gemm(compiled):
    artifact = compiled(PLAN, 4)
    manifest = json.loads((artifact / "manifest.json").read_text())
    report = json.loads((artifact / "report.json").read_text())
    prompts, steps = _prompts(artifact), 8
    args = {"artifact": str(artifact), "prompts": prompts, "max_new_tokens": steps, "keep_logits": True,
            "stop_at_eos": False}
    ranks = launch("planc.runtime.worker:main", args, 4, timeout_s=300)
    ref_tokens, ref_logits = reference_generate(manifest, prompts, steps)
    agreement = compare(ref_tokens, ref_logits, ranks[0]["tokens"], ranks[0]["logits"])
    assert agreement["token_agreement"] == 1.0 and agreement["max_logit_diff"] <= 1e-4, agreement
    assert ranks[0]["tokens"] == _threads(compiled(PLAIN, 4), 4, steps).tokens

    tokens = len(prompts) * max(map(len, prompts))  # the left-padded prefill: >= min_tokens 16, so fused
    S = tokens * HIDDEN * F32
    for rank in ranks:
        prefill = rank["comm"]["prefill"]
        # per rank: one ring reduce-scatter's bytes in (n-1) sends per fused GEMM, then its all-gather
        assert prefill["send"]["bytes"] == prefill["recv"]["bytes"] == FUSED_GEMMS * ring_reduce_scatter_bytes(S, 4)
        assert prefill["send"]["calls"] == FUSED_GEMMS * 3  # 4 pieces each (auto; chunks: 4): one per rank, 3 sent
        assert (prefill["all_gather"]["calls"], prefill["all_gather"]["bytes"]) == (
            FUSED_GEMMS, FUSED_GEMMS * ring_all_gather_bytes(S, 4))
        assert "all_reduce" not in prefill  # every serialized all-reduce after a GEMM is gone
        for op, entry in report["collectives_per_prefill"].items():
            if "bytes_per_token" in entry:
                assert (prefill[op]["calls"], prefill[op]["bytes"]) == (entry["calls"], entry["bytes_per_token"] * tokens)
        decode = rank["comm"]["decode"]  # 3 tokens a step < min_tokens: GEMM, then all-reduce
        assert decode["all_reduce"]["calls"] == FUSED_GEMMS * (steps - 1) and "send" not in decode
        assert decode["all_reduce"]["calls"] == report["collectives_per_decode_step"]["all_reduce"]["calls"] * (steps - 1)


def test_triton_backend_makes_the_pieces_with_the_counting_kernel(compiled):
    ops = make_ops("triton", ArtifactDir(compiled(PLAN, 2)))
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 9, 64, generator=gen) for _ in range(2)]
    ws = [torch.randn(HIDDEN, 64, generator=gen) for _ in range(2)]

    def body(comm):
        r = comm.rank
        return (t3.linear_all_reduce(ops, comm, xs[r], ws[r], None, chunks=4, min_tokens=1),
                t3.linear_all_reduce(Ops(), comm, xs[r], ws[r], None, chunks=4, min_tokens=1))

    for kernel, torch_ in run_threads(body, 2):
        # fp32 GEMMs of 64 terms in tiles against torch's: ~1e-6 relative.
        torch.testing.assert_close(kernel, torch_, rtol=1e-5, atol=1e-5)

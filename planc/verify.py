"""`planc verify`: the same prompts through transformers on one process and the artifact on N ranks.

Greedy tokens are compared position by position (a row stops at its EOS in both); an artifact with
a draft decodes speculatively, so its tokens and logits (the target's, from its verification
passes) are checked against the target model alone, and the report carries the acceptance figures
(`speculation`). The tolerance
judges logits at the steps where both still agree on the prefix, and the report also gives the
largest logit difference over all steps. The prompts are DEFAULT_PROMPTS
encoded by the model's tokenizer (random ids when it has none).

Pass or fail is judged by the artifact's dtype (TOLERANCES), or, where report.json names nodes a
strategy approximates by design (TPLA with more than one latent group), by token agreement >= 0.95
alone (APPROXIMATE), the logits reported:
  float32, float64: every greedy token equal and every logit within 1e-4. The ranks' partial sums
    and the absorbed MLA form reorder additions (~1e-6 in fp32), and transformers computes RMSNorm
    in fp32 whatever the model dtype, so fp64 gets the fp32 bar.
  bfloat16 (float16 alike, with its 11 significant bits): token agreement >= 0.95, and the median
    compared step's largest |logit difference| within 2 rounding steps (ulps) of the reference's
    largest |logit| (0.25 for logits in [16, 32)). bf16 keeps 8 significant bits and the ranks round
    sharded matmuls and the absorbed MLA form at other points than transformers, so a typical
    logit moves by a step or so; a MoE router whose top-k scores nearly tie may flip an expert for
    one token and move that step's logits by far more, which is why the bound is on the median
    step and why a near-tied greedy argmax may flip (a row counts as lost from its first
    divergence; 0.95 of 48 tokens lets one row diverge in its last 2 steps).
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig

from planc.models.registry import load_model
from planc.models.tokenizer import Tokenizer, artifact_tokenizer
from planc.dims import DTYPES
from planc.errors import RunError
from planc.codegen.artifact import REPORT
from planc.runtime.artifact import open_artifact
from planc.runtime.kernel_ops import default_kernels
from planc.runtime.launch import COLLECTIVE_TIMEOUT_S, check_limits, launch, resolve_backend

WORKER = "planc.runtime.worker:main"  # the entry every rank of `planc run` and `planc verify` runs
# Each ends mid-line: a model this small, asked to start a fresh line, tends to emit indentation only.
DEFAULT_PROMPTS = ("def fibonacci(n):\n    return", "import os\nimport", "class Tree:\n    def __init__(self")


@dataclass(frozen=True)
class Tolerance:
    """min_agreement: token_agreement at least; max_logit: every compared logit within (absolute);
    median_ulps: the median step's max |logit diff| within this many ulps of the largest |logit|."""

    min_agreement: float
    max_logit: float | None = None
    median_ulps: float | None = None

    def bound(self, dtype: torch.dtype, report: dict) -> str:
        parts = [f"token_agreement >= {self.min_agreement:g}"]
        if self.max_logit is not None:
            parts.append(f"max_logit_diff <= {self.max_logit:g}")
        if self.median_ulps is not None:
            parts.append(f"median step logit diff <= {self.median_ulps:g} {_short(dtype)} ulps at |logit| "
                         f"{report['max_abs_logit']:.3g} (= {self.median_limit(dtype, report):.3g})")
        return ", ".join(parts)

    def median_limit(self, dtype: torch.dtype, report: dict) -> float:
        largest = max(report["max_abs_logit"], torch.finfo(dtype).tiny)
        return self.median_ulps * torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(largest))

    def holds(self, dtype: torch.dtype, report: dict) -> bool:
        return (report["token_agreement"] >= self.min_agreement
                and (self.max_logit is None or report["max_logit_diff"] <= self.max_logit)
                and (self.median_ulps is None or report["median_logit_diff"] <= self.median_limit(dtype, report)))


TOLERANCES = {
    "float64": Tolerance(1.0, max_logit=1e-4),
    "float32": Tolerance(1.0, max_logit=1e-4),
    "bfloat16": Tolerance(0.95, median_ulps=2),
    "float16": Tolerance(0.95, median_ulps=2),
}


def _short(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype).removeprefix("torch."))


def default_prompt_ids(manifest: dict, tokenizer: Tokenizer | None, prompts=DEFAULT_PROMPTS) -> list[list[int]]:
    """`prompts` encoded by the model's tokenizer; seeded random ids when it has none."""
    if tokenizer is not None:
        return [tokenizer.encode(p) for p in prompts]
    vocab = manifest["model"]["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (len(prompts), 12), generator=gen).tolist()


def reference_generate(manifest: dict, prompts: list[list[int]], max_new_tokens: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    """transformers' own generate() on one process: (new tokens per row, logits per step). Plain
    greedy on the raw logits, as the ranks decode: no EOS (neither stopping at it nor suppressing
    it), none of the checkpoint's generation_config processors (repetition penalty and the like)."""
    model = load_model(manifest["model"]["source"], dtype=DTYPES[manifest["dtype"]])
    pad = manifest["model"]["pad_token_id"] or 0
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    greedy = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=pad,
                              output_logits=True, return_dict_in_generate=True)
    model.generation_config = greedy  # generate() fills a passed config's unset fields (eos) from this one
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask)
    return out.sequences[:, width:].tolist(), [l.float() for l in out.logits]


def compare(ref_tokens, ref_logits, got_tokens, got_logits) -> dict:
    """token_agreement: share of reference tokens reproduced before a row first diverges (free
    generation after a divergence compares different prefixes, so those count as disagreeing).
    Over the (row, step) pairs before a row's divergence (logit_steps_agreeing of them): the max
    and median of each step's max |logit difference|, and the reference's largest |logit| (the scale
    of a half-precision rounding step). max_logit_diff_all_steps is the max over every step both
    generated (logit_steps_all), past divergences too: an artifact that agrees on nothing shows
    its difference there rather than a vacuous 0 over no steps."""
    equal = total = 0
    diffs, all_diffs, largest = [], [], 0.0
    for row, (want, got) in enumerate(zip(ref_tokens, got_tokens)):
        total += len(want)
        agreeing = True
        for step, token in enumerate(want[:len(got)]):
            diff = (torch.tensor(got_logits[step][row]) - ref_logits[step][row]).abs().max().item()
            all_diffs.append(diff)
            agreeing = agreeing and got[step] == token
            if agreeing:
                equal += 1
                diffs.append(diff)
                largest = max(largest, ref_logits[step][row].abs().max().item())
    return {"token_agreement": equal / max(total, 1), "max_logit_diff": max(diffs, default=0.0),
            "median_logit_diff": statistics.median(diffs) if diffs else 0.0, "max_abs_logit": largest,
            "tokens_compared": total, "logit_steps_agreeing": len(diffs),
            "max_logit_diff_all_steps": max(all_diffs, default=0.0), "logit_steps_all": len(all_diffs)}


# A plan with a strategy that approximates the model (TPLA with g > 1 latent groups) is judged by its
# tokens alone, as the bf16 bar judges them; its logits are reported, not held to a bound.
APPROXIMATE = Tolerance(0.95)


def judge(report: dict, dtype_name: str, approximate: dict | None = None) -> dict:
    """report plus the tolerance (as text) and whether it holds: the dtype's, or APPROXIMATE where
    report.json names nodes a strategy approximates (`approximate`, kept in the result)."""
    dtype, tol = DTYPES[dtype_name], APPROXIMATE if approximate else TOLERANCES[dtype_name]
    return {**report, "dtype": dtype_name, "tolerance": tol.bound(dtype, report), "passed": tol.holds(dtype, report),
            "approximate": approximate or {}}


def ranks_per_machine(artifact: Path, world: int, nproc: int | None, rdzv: dict | None) -> int:
    """--nproc, or the artifact's world size over --nnodes machines; they must multiply to it."""
    if nproc is not None and nproc < 1:
        raise RunError(f"--nproc {nproc}: the number of ranks on this machine must be at least 1 (leave it out "
                       f"for the plan's mesh.devices)")
    nnodes = (rdzv or {}).get("nnodes", 1)
    nproc = world // nnodes if nproc is None else nproc
    if nproc * nnodes != world:
        raise RunError(f"{artifact}: compiled for mesh.devices = {world}, but --nproc {nproc} x {nnodes} node(s) "
                       f"= {nproc * nnodes} ranks; run with --nproc {world // nnodes} or recompile the plan")
    return nproc


def verify(artifact: Path, *, max_new_tokens: int = 16, kernels: str | None = None, timeout_s: float = 600,
           collective_timeout_s: float = COLLECTIVE_TIMEOUT_S, nproc: int | None = None,
           rdzv: dict | None = None) -> dict:
    opened = open_artifact(artifact)
    manifest = opened.manifest
    nproc = ranks_per_machine(artifact, manifest["world_size"], nproc, rdzv)
    check_limits(nproc, timeout_s, collective_timeout_s)  # before the slow reference
    prompts = default_prompt_ids(manifest, artifact_tokenizer(manifest, opened.tokenizer_dir()))
    ref_tokens, ref_logits = reference_generate(manifest, prompts, max_new_tokens)
    kernels = kernels or default_kernels(resolve_backend(manifest["backend"]))
    args = {"artifact": str(Path(artifact).resolve()), "prompts": prompts, "max_new_tokens": max_new_tokens,
            "stop_at_eos": False, "keep_logits": True, "kernels": kernels}
    results = launch(WORKER, args, nproc, timeout_s=timeout_s, collective_timeout_s=collective_timeout_s, rdzv=rdzv,
                     backend=manifest["backend"])
    got = results[0]
    report = compare(ref_tokens, ref_logits, got["tokens"], got["logits"])
    report["ranks_agree"] = all(r["tokens"] == got["tokens"] for r in results)
    report["world_size"] = manifest["world_size"]
    report["speculation"] = got.get("speculation")
    compiled = json.loads(Path(opened.root, REPORT).read_text())  # checked with every file by open_artifact
    report = judge(report, manifest["dtype"], compiled.get("approximate"))
    return {**report, "passed": report["passed"] and report["ranks_agree"]}

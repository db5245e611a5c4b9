"""`planc verify`: the same prompts through transformers on one process and the artifact on N ranks.

Greedy tokens are compared position by position (a row stops at its EOS in both); logits are
compared at every step where both still agree on the prefix.
"""
from __future__ import annotations

from pathlib import Path

import torch

from planc.models.registry import load_model
from planc.models.tokenizer import encode
from planc.dims import DTYPES
from planc.runtime.artifact import open_artifact
from planc.runtime.launch import launch

# Each ends mid-line: a model this small, asked to start a fresh line, tends to emit indentation only.
DEFAULT_PROMPTS = ("def fibonacci(n):\n    return", "import os\nimport", "class Tree:\n    def __init__(self")


def default_prompt_ids(manifest: dict, prompts=DEFAULT_PROMPTS) -> list[list[int]]:
    if manifest["model"]["tokenizer"] == "bytes":
        return [encode(p) for p in prompts]
    vocab = manifest["model"]["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (len(prompts), 12), generator=gen).tolist()


def reference_generate(manifest: dict, prompts: list[list[int]], max_new_tokens: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    """transformers' own generate() on one process: (new tokens per row, logits per step)."""
    model = load_model(manifest["model"]["source"], dtype=DTYPES[manifest["dtype"]])
    width = max(map(len, prompts))
    ids = torch.tensor([[manifest["model"]["pad_token_id"] or 0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             do_sample=False, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=manifest["model"]["pad_token_id"])
    return out.sequences[:, width:].tolist(), [l.float() for l in out.logits]


def compare(ref_tokens, ref_logits, got_tokens, got_logits) -> dict:
    """token_agreement: share of reference tokens reproduced before a row first diverges (free
    generation after a divergence compares different prefixes, so those count as disagreeing)."""
    equal = total = 0
    max_diff = 0.0
    for row, (want, got) in enumerate(zip(ref_tokens, got_tokens)):
        total += len(want)
        for step, token in enumerate(want):
            if step >= len(got) or got[step] != token:
                break
            equal += 1
            max_diff = max(max_diff, (torch.tensor(got_logits[step][row]) - ref_logits[step][row]).abs().max().item())
    return {"token_agreement": equal / max(total, 1), "max_logit_diff": max_diff, "tokens_compared": total}


def verify(artifact: Path, *, max_new_tokens: int = 16, kernels: str = "torch", timeout_s: float = 600) -> dict:
    manifest = open_artifact(artifact).manifest
    prompts = default_prompt_ids(manifest)
    ref_tokens, ref_logits = reference_generate(manifest, prompts, max_new_tokens)
    args = {"artifact": str(Path(artifact).resolve()), "prompts": prompts, "max_new_tokens": max_new_tokens,
            "stop_at_eos": False, "keep_logits": True, "kernels": kernels}
    results = launch("planc.runtime.worker:main", args, manifest["world_size"], timeout_s=timeout_s)
    got = results[0]
    report = compare(ref_tokens, ref_logits, got["tokens"], got["logits"])
    report["ranks_agree"] = all(r["tokens"] == got["tokens"] for r in results)
    report["world_size"] = manifest["world_size"]
    return report

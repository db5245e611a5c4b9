"""Quality figures of the bundled models on held-out text, alone or compiled and run on N ranks.

The evaluation set is fixed: EVAL_WINDOWS windows of EVAL_SEQ tokens, evenly spaced over the
held-out split (corpus.windows), each read from position 0 with nothing before it. 64 x 256
tokens = 16,320 predictions (about 16 KB of held-out text); a full pass of tiny-deepseek takes a
few seconds on 2 cores. `max_bytes` asks for fewer (or more) windows: ceil(max_bytes / 255).

Bits per byte: the mean of -log2 p(next token) over the predictions whose target is a byte
(id < 256); predictions of the BOS/EOS separators are not scored.

Legend: N windows, S tokens per window, V vocab, E experts, K experts per token, C latent dim.
"""
from __future__ import annotations

import functools
import json
import math
import statistics
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from planc.ops import Step
from planc.models.registry import WEIGHTS_DIR, load_model
from planc.zoo import corpus

EVAL_WINDOWS = 64
EVAL_SEQ = 256
EVAL_BATCH = 16  # windows per forward: bounds the [B, S, V] logits and the attention scores
MIN_OCCURRENCES = 20  # topk_hotness ignores token ids seen fewer times in the evaluation set

ModelRef = str | nn.Module


def eval_ids(split: str = "heldout", max_bytes: int | None = None, seq_len: int = EVAL_SEQ) -> torch.Tensor:
    """The fixed evaluation windows [N, S] of `split` (see the module docstring)."""
    _check_corpus()
    num = EVAL_WINDOWS if max_bytes is None else max(1, math.ceil(max_bytes / (seq_len - 1)))
    return corpus.windows(split, num, seq_len)


@functools.lru_cache(maxsize=1)
def _check_corpus() -> None:
    """Warn once when this Python's stdlib is not the corpus the bundled models were trained on."""
    path = WEIGHTS_DIR / "manifest.json"
    if not path.is_file():
        return
    want = json.loads(path.read_text()).get("corpus", {})
    if want and want.get("fingerprint") != corpus.fingerprint():
        warnings.warn(f"the installed Python's stdlib (Python {want.get('python')} expected) differs from the "
                      "corpus the bundled models were trained on; held-out figures are not comparable to the "
                      "manifest's", stacklevel=3)


def _module(model: ModelRef) -> nn.Module:
    return load_model(model) if isinstance(model, str) else model.eval()


@torch.no_grad()
def _logits(model: nn.Module, ids_NS: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(ids_BS, logits_BSV) per batch of windows, teacher-forced with transformers' forward."""
    for ids_BS in ids_NS.split(EVAL_BATCH):
        yield ids_BS, model(input_ids=ids_BS, use_cache=False).logits.float()


def scored_bits(logits_BSV: torch.Tensor, ids_BS: torch.Tensor) -> tuple[float, int]:
    """(sum of -log2 p over byte targets, number of byte targets) of one batch."""
    logp = F.log_softmax(logits_BSV[:, :-1].double(), dim=-1)
    target = ids_BS[:, 1:]
    nll = -logp.gather(-1, target[..., None])[..., 0]
    scored = target < 256
    return float(nll[scored].sum()) / math.log(2), int(scored.sum())


def bits_per_byte(model: ModelRef = "tiny-deepseek", split: str = "heldout", max_bytes: int | None = None) -> float:
    """Held-out bits per byte of a model (bundled name, checkpoint directory or module) on its own."""
    module, bits, count = _module(model), 0.0, 0
    for ids_BS, logits_BSV in _logits(module, eval_ids(split, max_bytes)):
        b, n = scored_bits(logits_BSV, ids_BS)
        bits, count = bits + b, count + n
    return bits / count


def draft_agreement(draft: ModelRef = "tiny-draft", target: ModelRef = "tiny-deepseek", split: str = "heldout",
                    max_bytes: int | None = None) -> float:
    """Share of positions where the draft's top-1 next token equals the target's (greedy acceptance)."""
    ids = eval_ids(split, max_bytes)
    draft_top = torch.cat([l[:, :-1].argmax(-1).flatten() for _, l in _logits(_module(draft), ids)])
    target_top = torch.cat([l[:, :-1].argmax(-1).flatten() for _, l in _logits(_module(target), ids)])
    return float((draft_top == target_top).double().mean())


# -- structure of the trained weights ---------------------------------------------------------


@contextmanager
def _capture(model: nn.Module, suffix: str, pick) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Collect pick(output) of every module whose name ends with `suffix`, keyed by its parent's FQN."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if name.endswith(suffix):
            fqn = name[: -len(suffix)]
            seen[fqn] = []
            handles.append(module.register_forward_hook(lambda m, a, out, fqn=fqn: seen[fqn].append(pick(out))))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def hotness(counts_VE: torch.Tensor, k: int, min_occurrences: int = MIN_OCCURRENCES) -> float:
    """Median over token ids seen >= min_occurrences times of the share of their routings that go
    to their k most chosen experts. counts_VE[v, e]: how often token v was routed to expert e."""
    totals = counts_VE.sum(-1)
    frequent = totals >= min_occurrences * k
    if not bool(frequent.any()):
        raise ValueError(f"no token id occurs {min_occurrences} times; evaluate on more text (max_bytes)")
    shares = counts_VE[frequent].topk(k, dim=-1).values.sum(-1) / totals[frequent]
    return statistics.median(shares.tolist())


def topk_hotness(model: ModelRef = "tiny-deepseek", split: str = "heldout", max_bytes: int | None = None,
                 min_occurrences: int = MIN_OCCURRENCES) -> dict[str, float]:
    """Per MoE layer (FQN of the block holding the router `gate`): see `hotness`."""
    module, ids = _module(model), eval_ids(split, max_bytes)
    with _capture(module, ".gate", lambda out: out[-1]) as picks:  # router output: (..., topk_indices [N, K])
        for _ in _logits(module, ids):
            pass
    picks = {fqn: p for fqn, p in picks.items() if p}
    result = {}
    for fqn, chunks in picks.items():
        topk_NK = torch.cat(chunks)
        num_experts = module.get_submodule(f"{fqn}.gate").e_score_correction_bias.numel()
        counts_VE = torch.zeros(module.config.vocab_size, num_experts, dtype=torch.long)
        token_N = ids.flatten()[:, None].expand_as(topk_NK)
        counts_VE.index_put_((token_N.flatten(), topk_NK.flatten()), torch.ones(topk_NK.numel(), dtype=torch.long), accumulate=True)
        result[fqn] = hotness(counts_VE, topk_NK.shape[-1], min_occurrences)
    return result


def top_half_energy(x_NC: torch.Tensor) -> float:
    """Share of the covariance's total variance held by its largest C/2 eigenvalues."""
    eig = torch.linalg.eigvalsh(torch.cov(x_NC.double().T)).flip(0).clamp(min=0)
    return float(eig[: len(eig) // 2].sum() / eig.sum())


def latent_top_half_energy(model: ModelRef = "tiny-deepseek", split: str = "heldout",
                           max_bytes: int | None = None) -> dict[str, float]:
    """Per MLA layer (attention FQN): top_half_energy of the normalized latent c_kv (the output of
    kv_a_layernorm, what the MLA cache holds) over every held-out token."""
    module, ids = _module(model), eval_ids(split, max_bytes)
    with _capture(module, ".kv_a_layernorm", lambda out: out.detach().flatten(0, -2)) as latents:
        for _ in _logits(module, ids):
            pass
    return {fqn: top_half_energy(torch.cat(chunks)) for fqn, chunks in latents.items() if chunks}


# -- compiled artifacts -----------------------------------------------------------------------


def artifact_bits_per_byte(artifact: str | Path, nproc: int | None = None, *, split: str = "heldout",
                           max_bytes: int | None = None, kernels: str = "torch", timeout_s: float = 600) -> float:
    """Bits per byte of a compiled artifact run on its ranks (nproc: the artifact's world size)."""
    from planc.runtime.artifact import read_manifest
    from planc.runtime.launch import launch

    nproc = nproc or read_manifest(Path(artifact))["world_size"]
    args = {"artifact": str(artifact), "split": split, "max_bytes": max_bytes, "kernels": kernels}
    if nproc == 1:
        from planc.runtime.comm import Comm

        result = _artifact_bits(args, Comm.single())
    else:
        result = launch("planc.zoo.eval:artifact_worker", args, nproc, timeout_s=timeout_s)[0]
    return result["bits"] / result["bytes"]


def artifact_worker(args: dict) -> None:
    """Per-rank entry of artifact_bits_per_byte: every rank runs every forward (the collectives need
    all of them) and reports its sums; the caller reads rank 0's."""
    from planc.runtime.comm import Comm
    from planc.runtime.launch import write_result

    write_result(_artifact_bits(args, Comm() if dist.is_initialized() else Comm.single()))


@torch.no_grad()
def _artifact_bits(args: dict, comm) -> dict:
    from planc.runtime.model import Model

    rank = Model(args["artifact"], comm=comm, kernels=args["kernels"])
    bits, count = 0.0, 0
    for ids_BS in eval_ids(args["split"], args["max_bytes"]).split(EVAL_BATCH):
        B, S = ids_BS.shape
        rank.allocate(B, S)
        step = Step(0, torch.arange(S).expand(B, S), torch.ones(B, S, dtype=torch.bool))
        b, n = scored_bits(rank.forward(ids_BS, step).float(), ids_BS)
        bits, count = bits + b, count + n
    return {"bits": bits, "bytes": count}

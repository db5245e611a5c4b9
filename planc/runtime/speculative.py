"""Speculative decoding: a draft proposes G tokens, the target scores G + 1 positions in one pass.

State between rounds, per row: the target's cache holds every committed token but the last
(`last_B`, fed first in the next verification); the draft's cache holds every committed token but
the row's `pending` ones. A round:

    catch-up   the draft runs its pending tokens (exact forward: with EasySpec this is the
               calibration over the accepted tokens + the bonus); its last position gives q_1
    draft      d_1 = pick(q_1); then G - 1 one-token forwards (layer-parallel under EasySpec,
               their cache slots fuzzy) give q_2..q_G and d_2..d_G
    verify     the target runs [last, d_1..d_G]: p_1..p_{G+1}; the strategy accepts k_b drafts
               of row b and draws its next token (correction or bonus)
    roll back  the target keeps [last, d_1..d_k] per row; the draft forgets its fuzzy slots
               (pending = d_1..d_k, next) or, when they are exact, keeps d_1..d_k
               (pending = [d_G if k = G] + next)

Rows accept different counts: a row's rejected slots become holes in both caches (masked like
padding; rope positions count real tokens only), so every row stays exact whatever the others do.

Legend: B batch rows, G draft tokens per round, V vocabulary, W widest pending chunk.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, astuple, dataclass, fields

import torch

from planc.runtime.decode import Generation, Strategy, left_pad
from planc.runtime.model import Model


@dataclass(frozen=True)
class Speculation:
    """How to speculate, from the artifact's manifest["speculate"]."""

    tokens: int  # G
    sequential_depth: int  # attention steps of the draft's exact forward
    layer_parallel: bool = False  # drafting runs forward_layer_parallel
    parallel_depth: int = 0  # attention steps of one layer-parallel forward
    fuzzy: bool = False  # its cache slots are not what the exact forward would write
    calibrate: bool = True  # forget fuzzy slots and rewrite them exactly after each verification

    @classmethod
    def from_manifest(cls, spec: dict) -> Speculation:
        lp = spec.get("layer_parallel")
        if lp is None:
            return cls(spec["tokens"], spec["sequential_depth"])
        return cls(spec["tokens"], spec["sequential_depth"], True, lp["depth"], not lp["exact"], lp["calibrate"])

    @property
    def drafting_depth(self) -> int:
        return self.parallel_depth if self.layer_parallel else self.sequential_depth

    @property
    def exact_catch_up(self) -> bool:
        """The round's first draft forward is the exact one (always, but for uncalibrated EasySpec)."""
        return self.calibrate or not self.fuzzy


@dataclass
class Round:
    """What one round did, for observers (tests, traces): every row's committed tokens after it
    (prompt included) and its pending ones (committed, not yet in the draft's cache)."""

    committed: list[list[int]]
    pending: list[list[int]]
    draft_logits_BGV: torch.Tensor
    drafts_BG: torch.Tensor
    accepted_B: torch.Tensor
    next_B: torch.Tensor
    running_B: torch.Tensor


@dataclass
class Figures:
    """Counts and seconds, all additive: the figures of batches decoded one after another are their
    sum, and every rate is derived from sums (never an average of rates)."""

    rounds: int = 0
    drafted: int = 0  # draft tokens proposed to rows still running
    accepted: int = 0
    verified: int = 0  # (row, round) verifications of rows still running; each emits accepted + 1 tokens
    draft_depth: int = 0  # attention steps on the draft's critical path, all rounds
    draft_s: float = 0.0
    verify_s: float = 0.0

    def __add__(self, other: Figures) -> Figures:
        return Figures(*(a + b for a, b in zip(astuple(self), astuple(other))))

    @classmethod
    def of(cls, summary: dict) -> Figures:
        """The counts behind a summary()."""
        return cls(**{f.name: summary[f.name] for f in fields(cls)})

    def summary(self, spec: Speculation) -> dict:
        return {"tokens": spec.tokens, "sequential_depth": spec.sequential_depth,
                "layer_parallel": spec.layer_parallel, "calibrate": spec.calibrate and spec.fuzzy,
                **self.rates(spec.tokens)}

    def rates(self, tokens: int) -> dict:
        """The counts and seconds, and the rates derived from them (tokens: drafted per round)."""
        return {**asdict(self), "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
                "mean_accepted_length": (self.accepted + self.verified) / self.verified if self.verified else 0.0,
                "draft_sequential_depth": self.draft_depth / (self.rounds * tokens) if self.rounds else 0.0}


def combined(summaries: list[dict]) -> dict:
    """One summary for runs of the same speculation (the batches of `planc run --batch-size`, a
    benchmark's rounds): the first's settings, counts and seconds summed, rates derived from the sums."""
    total = sum((Figures.of(s) for s in summaries), Figures())
    return {**summaries[0], **total.rates(summaries[0]["tokens"])}


@torch.no_grad()
def speculative_generate(target: Model, draft: Model, prompts: list[list[int]], max_new_tokens: int,
                         strategy: Strategy, spec: Speculation, *, eos_id: int | list[int] | None = None,
                         pad_id: int = 0, keep_logits: bool = False,
                         on_round: Callable[[Round], None] | None = None) -> Generation:
    """generate()'s contract (tokens per row, EOS kept, other rows go on) by speculative rounds;
    keep_logits keeps the target's logits behind every emitted token."""
    ids_BP, real_BP = left_pad(prompts, pad_id)
    B, P = ids_BP.shape
    G, comm = spec.tokens, target.comm
    target.allocate(B, P + max_new_tokens * (G + 1))
    draft.allocate(B, P + max_new_tokens * 2 * G + 1)
    out, figures = Generation([[] for _ in prompts]), Figures()
    rows_logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    committed = [list(p) for p in prompts]
    done_B = torch.zeros(B, dtype=torch.bool)
    eos = set([eos_id] if isinstance(eos_id, int) else list(eos_id or []))

    def emit(row: int, tokens: list[int], logits_TV: torch.Tensor) -> None:
        for token, logits_V in zip(tokens, logits_TV):
            committed[row].append(token)
            if done_B[row]:
                continue
            out.tokens[row].append(token)
            if keep_logits:
                rows_logits[row].append(logits_V.float().clone())
            done_B[row] = token in eos or len(out.tokens[row]) == max_new_tokens

    t0 = time.perf_counter()
    with comm.phase("prefill"):
        logits_BV = target.extend(ids_BP, real_BP)[:, -1]
        draft.extend(ids_BP, real_BP)
    last_B = strategy.pick(logits_BV)
    for row in range(B):
        emit(row, [int(last_B[row])], logits_BV[row:row + 1])
    pending = [[int(t)] for t in last_B]
    out.prefill_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    while not bool(done_B.all()):
        running_B = ~done_B
        t_draft = time.perf_counter()
        drafts_BG, q_BGV, mark = _draft(draft, strategy, spec, pending, pad_id, figures)
        figures.draft_s += time.perf_counter() - t_draft

        t_verify, start = time.perf_counter(), target.cache.length
        with comm.phase("verify"):
            p_BGV = target.extend(torch.cat([last_B[:, None], drafts_BG], dim=1))
        accepted_B, last_B = strategy.verify(p_BGV, q_BGV, drafts_BG)
        target.cache.reject(start, torch.arange(G + 1)[None] <= accepted_B[:, None])
        figures.verify_s += time.perf_counter() - t_verify
        out.decode_steps += 1

        pending = _roll_back_draft(draft, spec, mark, drafts_BG, accepted_B, last_B)
        figures.rounds += 1
        figures.drafted += G * int(running_B.sum())
        figures.accepted += int(accepted_B[running_B].sum())
        figures.verified += int(running_B.sum())
        for row in range(B):
            k = int(accepted_B[row])
            emit(row, drafts_BG[row, :k].tolist() + [int(last_B[row])], p_BGV[row, :k + 1])
        if on_round is not None:
            on_round(Round([list(c) for c in committed], [list(p) for p in pending], q_BGV, drafts_BG,
                           accepted_B, last_B, running_B))
    out.decode_s = time.perf_counter() - t0
    out.speculation = figures.summary(spec)
    if keep_logits:
        out.step_logits = _by_step(rows_logits)
    return out


def _draft(draft: Model, strategy: Strategy, spec: Speculation, pending: list[list[int]], pad_id: int,
           figures: Figures) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The catch-up forward over every row's pending tokens, then G - 1 drafting forwards:
    (draft tokens [B, G], their logits [B, G, V], the first drafting slot)."""
    ids_BW, real_BW = left_pad(pending, pad_id)
    catch_up = spec.exact_catch_up
    with draft.comm.phase("calibrate" if spec.fuzzy and spec.calibrate else "draft"):
        q_BV = draft.extend(ids_BW, real_BW, layer_parallel=not catch_up, fuzzy=not catch_up and spec.fuzzy)[:, -1]
    figures.draft_depth += spec.sequential_depth if catch_up else spec.drafting_depth
    mark = draft.cache.length
    logits, tokens = [q_BV], [strategy.pick(q_BV)]
    with draft.comm.phase("draft"):
        for _ in range(spec.tokens - 1):
            q_BV = draft.extend(tokens[-1][:, None], layer_parallel=spec.layer_parallel, fuzzy=spec.fuzzy)[:, -1]
            figures.draft_depth += spec.drafting_depth
            logits.append(q_BV)
            tokens.append(strategy.pick(q_BV))
    return torch.stack(tokens, dim=1), torch.stack(logits, dim=1), mark


def _roll_back_draft(draft: Model, spec: Speculation, mark: int, drafts_BG: torch.Tensor, accepted_B: torch.Tensor,
                     next_B: torch.Tensor) -> list[list[int]]:
    """Drop the draft's slots of rejected tokens (all of its fuzzy ones when calibrating); returns
    each row's pending tokens: those the next catch-up forward must run."""
    G = drafts_BG.shape[1]
    if spec.fuzzy and spec.calibrate:
        draft.cache.truncate(mark)
        return [drafts_BG[b, :k].tolist() + [int(next_B[b])] for b, k in enumerate(accepted_B.tolist())]
    draft.cache.reject(mark, torch.arange(G - 1)[None] < accepted_B[:, None])
    return [([int(drafts_BG[b, -1])] if k == G else []) + [int(next_B[b])] for b, k in enumerate(accepted_B.tolist())]


def _by_step(rows_logits: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Per emitted position, [B, V] (zeros for rows that stopped before it)."""
    steps = max(len(r) for r in rows_logits)
    like = next(t for r in rows_logits for t in r)
    return [torch.stack([r[i] if i < len(r) else torch.zeros_like(like) for r in rows_logits]) for i in range(steps)]

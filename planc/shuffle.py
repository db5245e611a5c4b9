"""Speculative token shuffling: before routing, move each token to the rank predicted to hold its
experts, so that its expert activations are served where it already is.

Compile time (from a routing profile and the placement): per MoE layer, a token table
`token_score[v, d]`, the share of token id v's activations that rank d's experts served on the
calibration text (its confidence is the largest share; all zeros for an id never seen), and a
2-gram table `bigram[p, d]`, the same shares for tokens whose best rank in the previous MoE layer
was p. A token whose confidence is below `threshold` is predicted by the 2-gram instead (chosen on
a held-back half of the profile, so that unseen and ambiguous ids fall back to their context).

Run time (`plan_tokens`, identical on every rank: it reads only the token ids, the tables and the
previous layer's routing, which every rank holds): each token's ranks in order of predicted share;
the most confident tokens first, each rank takes an equal share of the step's tokens (sizes differ
by at most one), a token whose preferred rank is full goes to its next-best rank with room. The
permutation groups the tokens by rank (ascending token index inside a group). A misprediction costs
traffic only: routing runs on exact values wherever the token lands.

Legend: V token ids, n ranks, N tokens this step, T calibration tokens, K experts per token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from planc.placement import Owner

THRESHOLDS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # candidate confidences below which the 2-gram predicts


def best_rank(experts_TK: torch.Tensor, owner: Owner) -> torch.Tensor:
    """[T] the rank holding most of each token's experts (the lowest such rank on ties)."""
    owner_E = torch.tensor(owner)
    return held(owner_E[experts_TK], int(owner_E.max()) + 1).argmax(1)


def held(dest_TK: torch.Tensor, world: int) -> torch.Tensor:
    """[T, n]: how many of each token's choices each rank holds (dest_TK: the rank of each choice)."""
    held_Tn = torch.zeros(dest_TK.shape[0], world, dtype=torch.long, device=dest_TK.device)
    return held_Tn.scatter_add_(1, dest_TK, torch.ones_like(dest_TK))


def precision(predicted_T: torch.Tensor, dest_TK: torch.Tensor, world: int) -> float:
    """Share of tokens whose predicted rank holds as many of their experts as any rank does."""
    held_Tn = held(dest_TK, world)
    return float((held_Tn.gather(1, predicted_T[:, None])[:, 0] == held_Tn.max(1).values).double().mean())


def rank_shares(ids_T: torch.Tensor, experts_TK: torch.Tensor, owner: Owner, vocab: int) -> torch.Tensor:
    """[vocab, n]: the share of each token id's activations served by each rank (0 if never seen)."""
    owner_E = torch.tensor(owner)
    held = torch.zeros(vocab, int(owner_E.max()) + 1, dtype=torch.double)
    held.index_put_((ids_T.reshape(-1, 1).expand_as(experts_TK).reshape(-1), owner_E[experts_TK].reshape(-1)),
                    torch.ones(experts_TK.numel(), dtype=torch.double), accumulate=True)
    return (held / held.sum(1, keepdim=True).clamp(min=1)).float()


def bigram(prev_best_T: torch.Tensor, experts_TK: torch.Tensor, owner: Owner) -> torch.Tensor:
    """[n, n]: share of this layer's activations per rank, for tokens by their previous best rank."""
    return rank_shares(prev_best_T, experts_TK, owner, int(max(owner)) + 1)


@dataclass(frozen=True)
class Predictor:
    token_score: torch.Tensor  # [V, n]
    bigram: torch.Tensor | None  # [n, n]; None for the first MoE layer
    threshold: float

    def scores(self, ids_N: torch.Tensor, prev_best_N: torch.Tensor | None) -> torch.Tensor:
        """[N, n] predicted share per rank: the token table's row, or the 2-gram's when the token's
        confidence is below the threshold."""
        score = self.token_score[ids_N]
        if self.bigram is None or prev_best_N is None:
            return score
        low = score.max(1).values < self.threshold
        low |= score.sum(1) == 0  # never seen: the token table knows nothing
        return torch.where(low[:, None], self.bigram[prev_best_N], score)


def predictor(ids_T: torch.Tensor, experts_TK: torch.Tensor, owner: Owner, vocab: int,
              prev_best_T: torch.Tensor | None) -> tuple[Predictor, float]:
    """The tables from the whole profile, with the threshold that predicted the best rank most often
    on the profile's second half from tables of its first half; and that precision."""
    half = ids_T.numel() // 2
    owner_E, world = torch.tensor(owner), max(owner) + 1
    early = None if prev_best_T is None else bigram(prev_best_T[:half], experts_TK[:half], owner)
    trial = Predictor(rank_shares(ids_T[:half], experts_TK[:half], owner, vocab), early, 0.0)
    prev = None if prev_best_T is None else prev_best_T[half:]

    def hits(threshold: float) -> float:
        guess = Predictor(trial.token_score, trial.bigram, threshold).scores(ids_T[half:], prev).argmax(1)
        return precision(guess, owner_E[experts_TK[half:]], world)

    found = {t: hits(t) for t in (THRESHOLDS if early is not None else (0.0,))}
    threshold = max(found, key=lambda t: (found[t], -t))
    full = None if prev_best_T is None else bigram(prev_best_T, experts_TK, owner)
    return Predictor(rank_shares(ids_T, experts_TK, owner, vocab), full, threshold), found[threshold]


# -- run time --------------------------------------------------------------------------------------


@dataclass
class ShufflePlan:
    """Where every token of the step lives for one MoE layer. Rank r holds rows
    perm[offsets[r]:offsets[r+1]] of the step (tokens in original order, flattened [B*S])."""

    perm: torch.Tensor  # [N] original token index of each row, grouped by rank
    sizes: list[int]  # tokens per rank
    rank: int
    predicted: torch.Tensor  # [N] each token's first-choice rank
    home: torch.Tensor  # [N] the rank it was given

    @property
    def mine(self) -> tuple[int, int]:
        lo = sum(self.sizes[: self.rank])
        return lo, lo + self.sizes[self.rank]

    def permute(self, ops, x_BSD: torch.Tensor) -> torch.Tensor:
        """[N, D] rows in group order."""
        return ops.gather_rows(x_BSD.reshape(-1, x_BSD.shape[-1]), self.perm)

    def take(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """This rank's rows [n_r, D] of a tensor every rank holds whole."""
        lo, hi = self.mine
        return x_BSD.reshape(-1, x_BSD.shape[-1])[self.perm[lo:hi]]

    def unpermute(self, ops, rows_ND: torch.Tensor, like_BSD: torch.Tensor) -> torch.Tensor:
        """Rows in group order back to token order, shaped like `like_BSD`."""
        return ops.scatter_rows(rows_ND, self.perm, rows_ND.shape[0]).view_as(like_BSD)


def assign(score_Nn: torch.Tensor) -> torch.Tensor:
    """[N] a rank per token: preferred ranks in order of score (lower rank on ties), tokens by
    confidence (earlier token on ties); every rank takes N // n tokens, then the N % n left over go
    one per rank, again by preference. Round k offers every unplaced token to its k-th rank, which
    takes them in priority order while it has room."""
    N, world = score_Nn.shape
    order = torch.argsort(-score_Nn.max(1).values, stable=True)
    pref_Nn = torch.argsort(-score_Nn, dim=1, stable=True)[order]  # rows in priority order
    home = torch.full((N,), -1, dtype=torch.long, device=score_Nn.device)
    for room in (N // world, 1):  # equal shares, then one more for the N % n left
        left = torch.full((world,), room, dtype=torch.long, device=score_Nn.device)
        for k in range(world):
            free = home[order] < 0
            rank = pref_Nn[:, k]
            queued = (torch.nn.functional.one_hot(rank, world) * free[:, None]).cumsum(0)  # place in its rank's queue
            take = free & (queued.gather(1, rank[:, None])[:, 0] <= left[rank])
            home[order[take]] = rank[take]
            left -= torch.bincount(rank[take], minlength=world)
    return home


def plan_tokens(ids_BS: torch.Tensor, W: dict, threshold: float, prev_best_N: torch.Tensor | None,
                world: int, rank: int) -> ShufflePlan:
    """The step's shuffle (module docstring); W holds `token_score` and, past the first MoE layer,
    `bigram` (this layer's tables in the rank's weights)."""
    ids_N = ids_BS.reshape(-1)
    score = Predictor(W["token_score"], W.get("bigram"), threshold).scores(ids_N, prev_best_N)
    home = assign(score)
    perm = torch.argsort(home, stable=True)
    sizes = torch.bincount(home, minlength=world).tolist()
    return ShufflePlan(perm, sizes, rank, torch.argsort(-score, dim=1, stable=True)[:, 0], home)

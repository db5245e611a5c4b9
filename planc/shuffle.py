"""Speculative token shuffling: before routing, move each token to the rank predicted to hold its
experts, so that its expert activations are served where it already is.

What a token costs is the all-to-all rows it needs: one per rank other than its own that holds any
of its experts. So a rank's score for a token is its coverage: the probability that the rank holds
at least one of the token's experts (the rows the token saves by sitting there).

Compile time (from a routing profile and the placement), per MoE layer: n-gram tables of coverage
over token contexts, the token id alone (order 1), with the token before it (order 2), with the two
before it (order 3), each context's coverage summed over the calibration text with its number of
occurrences (a longer context seen once is left out: it would speak for one token); and a `prior`
under them: the 2-gram over the previous MoE layer's devices (coverage of
the tokens whose best rank there was p), or, for the first MoE layer, the coverage of all tokens.
A context is only what precedes a token in its calibration window (or, at run time, in its row of
the step): a token's first positions have the shorter contexts only, and a decode step (one token
per sequence) predicts from the token id and the 2-gram.

Run time (`plan_tokens`, identical on every rank: it reads only the token ids, the tables and the
previous layer's routing, which every rank holds): a token's scores start at the prior and each
longer context found in the tables refines them, `(cover + SMOOTHING * scores) / (count + SMOOTHING)`
(a context seen often speaks for itself, a rare one leans on the shorter); then every rank takes
an equal share of the step's tokens (sizes differ by at most one), the tokens that lose most by
moving keeping their best rank (`assign`). The permutation groups the tokens by rank (ascending
token index inside a group). A misprediction costs traffic only: routing runs on exact values
wherever the token lands.

Legend: V token ids, n ranks, N tokens this step, T calibration tokens, K experts per token,
C contexts of one order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from planc.placement import Owner

ORDER = 3  # the longest context: the token and the two before it
BASE = 2 ** 20  # a context's key is its ids in base BASE (ids beyond it: the token id alone is used)
MIN_COUNT = 2  # a longer context (order 2 or more) is kept when seen this often: the tables stay under T / 2
SMOOTHING = 1.0  # the pseudo-count of the shorter context's scores in a longer one's
PRICE_SWEEPS = 10  # assign: rounds of pricing every rank


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


def coverage(experts_TK: torch.Tensor, owner: Owner) -> torch.Tensor:
    """[T, n] float64: 1 where the rank holds at least one of the token's experts."""
    owner_E = torch.tensor(owner)
    return (held(owner_E[experts_TK], int(owner_E.max()) + 1) > 0).double()


def context_keys(ids_BS: torch.Tensor, order: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([B*S] key, [B*S] valid): each token's context of `order` ids (the token and the order - 1
    before it in its row) as one int64; valid where the row holds that many."""
    key, S = ids_BS.long(), ids_BS.shape[1]
    for back in range(1, order):
        key = key * BASE + torch.nn.functional.pad(ids_BS.long(), (back, 0))[:, :S]  # the id `back` before
    valid = torch.arange(ids_BS.shape[1], device=ids_BS.device) >= order - 1
    return key.reshape(-1), valid.expand(ids_BS.shape).reshape(-1)


@dataclass(frozen=True)
class NGram:
    """Coverage of the contexts of one order seen on the calibration text."""

    keys: torch.Tensor  # [C] int64, ascending
    cover: torch.Tensor  # [C, n] summed coverage (float32 in the weights: whole counts, exact)
    count: torch.Tensor  # [C] occurrences

    def refine(self, key_N: torch.Tensor, valid_N: torch.Tensor, scores_Nn: torch.Tensor) -> torch.Tensor:
        if not self.keys.numel():
            return scores_Nn
        i = torch.searchsorted(self.keys, key_N).clamp(max=self.keys.numel() - 1)
        found = valid_N & (self.keys[i] == key_N)
        cover, count = self.cover[i].to(scores_Nn.dtype), self.count[i, None].to(scores_Nn.dtype)
        refined = (cover + SMOOTHING * scores_Nn) / (count + SMOOTHING)
        return torch.where(found[:, None], refined, scores_Nn)


@dataclass(frozen=True)
class Predictor:
    prior: torch.Tensor  # [1, n], or [n, n] by the previous MoE layer's best rank (the 2-gram)
    ngrams: tuple[NGram, ...]  # orders 1, 2, ...

    def scores(self, ids_BS: torch.Tensor, prev_best_N: torch.Tensor | None) -> torch.Tensor:
        """[N, n] each token's predicted coverage per rank (module docstring)."""
        N = ids_BS.numel()
        if self.prior.shape[0] > 1 and prev_best_N is not None:
            scores = self.prior[prev_best_N]
        else:
            scores = self.prior[:1].expand(N, -1)
        for order, ngram in enumerate(self.ngrams, 1):
            scores = ngram.refine(*context_keys(ids_BS, order), scores)
        return scores

    def token_scores(self, vocab: int) -> torch.Tensor:
        """[vocab, n] the scores of each token id alone (no context, the first MoE layer's prior)."""
        return self.scores(torch.arange(vocab)[:, None], None)

    def tables(self) -> dict[str, torch.Tensor]:
        """What every rank's weights hold (`from_tables` reads it back)."""
        out = {"prior": self.prior.float()}
        for order, g in enumerate(self.ngrams, 1):
            out |= {f"ngram{order}.keys": g.keys, f"ngram{order}.cover": g.cover.float(),
                    f"ngram{order}.count": g.count.float()}
        return out

    @classmethod
    def from_tables(cls, W: dict) -> "Predictor":
        ngrams, order = [], 1
        while f"ngram{order}.keys" in W:
            ngrams.append(NGram(W[f"ngram{order}.keys"], W[f"ngram{order}.cover"], W[f"ngram{order}.count"]))
            order += 1
        return cls(W["prior"].double(), tuple(ngrams))


def predictor_from(ids_T: torch.Tensor, experts_TK: torch.Tensor, owner: Owner, prev_best_T: torch.Tensor | None,
                   window: int) -> Predictor:
    """The tables of a profile whose tokens are windows of `window` ids (module docstring)."""
    cover_Tn = coverage(experts_TK, owner)
    world = cover_Tn.shape[1]
    if prev_best_T is None:
        prior = cover_Tn.mean(0, keepdim=True)
    else:
        sums = torch.zeros(world, world, dtype=torch.double).index_add_(0, prev_best_T, cover_Tn)
        seen = torch.bincount(prev_best_T, minlength=world).double()
        prior = torch.where(seen[:, None] > 0, sums / seen.clamp(min=1)[:, None], cover_Tn.mean(0))
    ids_BS = ids_T.reshape(-1, window)
    orders = ORDER if int(ids_T.max()) < BASE else 1
    ngrams = []
    for order in range(1, orders + 1):
        key, valid = context_keys(ids_BS, order)
        keys, inverse = torch.unique(key[valid], return_inverse=True)
        cover = torch.zeros(keys.numel(), world, dtype=torch.double).index_add_(0, inverse, cover_Tn[valid])
        count = torch.bincount(inverse, minlength=keys.numel()).double()
        kept = count >= (MIN_COUNT if order > 1 else 1)
        ngrams.append(NGram(keys[kept], cover[kept], count[kept]))
    return Predictor(prior, tuple(ngrams))


def _halves(ids_T: torch.Tensor, window: int) -> tuple[int, int, int]:
    """(where the profile's second half starts, where it ends, the window to read both halves in):
    whole windows in each half; a profile of a single window is read as two windows of half."""
    windows = ids_T.numel() // window
    if windows >= 2:
        return windows // 2 * window, windows * window, window
    half = ids_T.numel() // 2
    return half, 2 * half, half


def _early(ids_T: torch.Tensor, experts_TK: torch.Tensor, owner: Owner, prev_best_T: torch.Tensor | None,
           window: int) -> tuple[Predictor, slice, int]:
    """The tables of the profile's first half, the slice of its second half, the window length."""
    half, end, window = _halves(ids_T, window)
    early = predictor_from(ids_T[:half], experts_TK[:half], owner, None if prev_best_T is None else prev_best_T[:half],
                           window)
    return early, slice(half, end), window


def predictor(ids_T: torch.Tensor, experts_TK: torch.Tensor, owner: Owner, prev_best_T: torch.Tensor | None,
              window: int) -> tuple[Predictor, float]:
    """The tables from the whole profile; and the precision on the profile's second half of tables
    from its first half."""
    early, second, held_window = _early(ids_T, experts_TK, owner, prev_best_T, window)
    prev = None if prev_best_T is None else prev_best_T[second]
    guess = early.scores(ids_T[second].reshape(-1, held_window), prev).argmax(1)
    owner_E = torch.tensor(owner)
    found = precision(guess, owner_E[experts_TK[second]], max(owner) + 1)
    return predictor_from(ids_T, experts_TK, owner, prev_best_T, window), found


def held_back_rows(ids_T: torch.Tensor, experts_TK: torch.Tensor, owner: Owner, prev_best_T: torch.Tensor | None,
                   window: int, step_windows: int) -> float:
    """All-to-all rows per token on the profile's second half, shuffled in steps of `step_windows`
    windows by tables from its first half: what a placement costs with the predictor it is deployed
    with, on text the tables have not seen."""
    early, second, window = _early(ids_T, experts_TK, owner, prev_best_T, window)
    cover_Tn = coverage(experts_TK[second], owner)
    ids_BS = ids_T[second].reshape(-1, window)
    prev = None if prev_best_T is None else prev_best_T[second]
    rows, step = 0.0, step_windows * window
    for lo in range(0, ids_BS.shape[0], step_windows):
        p = None if prev is None else prev[lo * window: lo * window + step]
        home = assign(early.scores(ids_BS[lo: lo + step_windows], p))
        c = cover_Tn[lo * window: lo * window + step]
        rows += float(c.sum() - c.gather(1, home[:, None]).sum())
    return rows / max(1, cover_Tn.shape[0])


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
    """[N] a rank per token, every rank taking N // n or N // n + 1 of them, so as to keep the
    summed score high (a transportation problem; this is a price heuristic for it, exact or close
    on the cases tests/test_shuffle.py checks by brute force). Placeholder tokens scoring 0
    everywhere pad N to a multiple of n, so that every rank takes the same number; every rank
    gets a price at which about that many tokens prefer it (`_prices`, coordinate steps on the
    problem's dual), and the placeholders go one each to the cheapest (least asked-for) ranks;
    then, while tokens are left, each goes to its best open rank at those prices,
    the tokens that would lose most by their next choice (the regret) first, earlier tokens on
    ties, lower ranks on ties, a rank taking them while it has room. Deterministic: every rank
    computes the same from the same scores."""
    N, world = score_Nn.shape
    pads = -N % world
    score = score_Nn.double()
    room = (N + pads) // world
    price = _prices(torch.cat([score, score.new_zeros(pads, world)]), room)
    left = torch.full((world,), room, dtype=torch.long, device=score.device)
    left[torch.argsort(price, stable=True)[:pads]] -= 1  # a placeholder each on the least asked-for ranks
    home = torch.full((N,), -1, dtype=torch.long, device=score.device)
    while True:
        free = (home < 0).nonzero()[:, 0]
        if not free.numel():
            return home
        open_ = left > 0
        value = (score[free] - price).masked_fill(~open_, float("-inf"))
        best = value.argmax(1)  # the first (lowest) rank on ties
        top = value.topk(min(2, int(open_.sum())), dim=1).values
        regret = top[:, 0] - top[:, 1] if top.shape[1] > 1 else torch.zeros_like(top[:, 0])
        order = torch.argsort(-regret, stable=True)
        for rank in range(world):
            wanting = order[best[order] == rank][: int(left[rank])]
            home[free[wanting]] = rank
            left[rank] -= wanting.numel()


def _prices(score_Nn: torch.Tensor, room: int) -> torch.Tensor:
    """[n] a price per rank such that about `room` tokens prefer each: PRICE_SWEEPS rounds, each
    setting every rank's price in turn to where exactly `room` tokens would rather have it than
    their best other rank at the others' prices (halfway between the room-th and the next margin)."""
    N, world = score_Nn.shape
    price = torch.zeros(world, dtype=torch.double, device=score_Nn.device)
    if room == 0 or world == 1:
        return price
    for _ in range(PRICE_SWEEPS):
        for rank in range(world):
            others = (score_Nn - price).index_fill(1, torch.tensor([rank], device=score_Nn.device), float("-inf"))
            margin = (score_Nn[:, rank] - others.max(1).values).topk(room + 1).values
            price[rank] = (margin[room - 1] + margin[room]) / 2
    return price


def plan_tokens(ids_BS: torch.Tensor, W: dict, prev_best_N: torch.Tensor | None, world: int,
                rank: int) -> ShufflePlan:
    """The step's shuffle (module docstring); W holds this layer's tables (Predictor.tables) in the
    rank's weights."""
    score = Predictor.from_tables(W).scores(ids_BS, prev_best_N)
    home = assign(score)
    perm = torch.argsort(home, stable=True)
    sizes = torch.bincount(home, minlength=world).tolist()
    return ShufflePlan(perm, sizes, rank, torch.argsort(-score, dim=1, stable=True)[:, 0], home)

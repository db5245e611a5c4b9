"""Expert placement: which rank holds which routed expert, decided from a routing profile.

    contiguous  experts r·E/n … (r+1)·E/n − 1 on rank r (the baseline)
    eplb        greedy load packing in the style of DeepSeek's EPLB: experts by expected load,
                heaviest first, each to the least-loaded rank that still has room (E/n experts per
                rank; EPLB's replicas of hot experts are not made: every expert lives on one rank)
    semantic    Sem-MoE's balanced token–expert co-clustering: with each token id sent to the rank
                holding most of its experts, minimize the expected remote activations plus a
                load-balance term (experts' activations, and tokens per rank). Starts: a greedy
                assignment over the experts' affinity graph (networkx), recursive Kernighan–Lin
                bisection of that graph (when n is a power of two) and contiguous; each is refined
                by pairwise swaps; the best objective wins.

Every placement puts exactly E/n experts on each rank; the router is untouched (placement is the
owner map, so group-limited top-k routes exactly as before).

Legend: V token ids (rows of a profile's counts), E experts, n ranks, T calibration tokens,
K experts per token.
"""
from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch

Owner = tuple[int, ...]  # owner[e] = the rank holding expert e

BALANCE = 0.25  # weight of the expert-load imbalance against the remote-activation rate
SWEEPS = 200  # swap-refinement steps at most (each applies the best improving swap)


def counts(ids_T: torch.Tensor, experts_TK: torch.Tensor, vocab: int, num_experts: int) -> torch.Tensor:
    """count[v, e]: how often token id v was routed to expert e."""
    out = torch.zeros(vocab, num_experts, dtype=torch.long)
    token = ids_T.reshape(-1, 1).expand_as(experts_TK)
    return out.index_put_((token.reshape(-1), experts_TK.reshape(-1)), torch.ones(experts_TK.numel(), dtype=torch.long),
                          accumulate=True)


def coactivation(experts_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """co[e, f]: tokens routed to both e and f (the diagonal: tokens routed to e)."""
    hit_TE = torch.zeros(experts_TK.shape[0], num_experts).scatter_(1, experts_TK, 1.0)
    return (hit_TE.T @ hit_TE).long()


def one_hot(owner: Owner) -> torch.Tensor:
    """[E, n] float: 1 where the rank holds the expert."""
    return torch.nn.functional.one_hot(torch.tensor(owner), max(owner) + 1).double()


def co_located(experts_TK: torch.Tensor, owner: Owner) -> float:
    """Share of co-activated expert pairs (two experts of one token) that one rank holds together."""
    pairs = coactivation(experts_TK, len(owner)).double().triu(1)
    same = one_hot(owner) @ one_hot(owner).T
    return float((pairs * same).sum() / pairs.sum().clamp(min=1))


def expected_load(counts_VE: torch.Tensor, world: int, score_Vn: torch.Tensor | None = None) -> torch.Tensor:
    """[E, n] share of all activations that expert e serves for tokens sitting on rank d: each
    token id on its best-scored rank (score_Vn, the token shuffle's table), or spread evenly over
    the ranks (no shuffle, or an id the table has never seen)."""
    c = counts_VE.double()
    home_Vn = torch.full((c.shape[0], world), 1.0 / world, dtype=torch.double)
    if score_Vn is not None:
        seen = score_Vn.sum(1) > 0
        home_Vn[seen] = torch.nn.functional.one_hot(score_Vn[seen].argmax(1), world).double()
    return c.T @ home_Vn / c.sum()


def contiguous(num_experts: int, world: int) -> Owner:
    per = num_experts // world
    return tuple(e // per for e in range(num_experts))


def eplb(load_E: torch.Tensor, world: int) -> Owner:
    """Heaviest expert first, each to the least-loaded rank with fewer than E/n experts (lowest
    rank on ties)."""
    per = load_E.numel() // world
    owner, room, load = [0] * load_E.numel(), [per] * world, [0.0] * world
    for e in sorted(range(load_E.numel()), key=lambda e: (-float(load_E[e]), e)):
        d = min((d for d in range(world) if room[d]), key=lambda d: (load[d], d))
        owner[e], room[d], load[d] = d, room[d] - 1, load[d] + float(load_E[e])
    return tuple(owner)


@dataclass(frozen=True)
class Score:
    """A placement's figures on the profile it was chosen from, with every token moved, before
    routing, to a rank: its preferred ranks in order of the share of its activations they serve,
    the most confident tokens first, each rank taking an equal share of the tokens (the runtime's
    token shuffle, planc.shuffle, over the whole profile at once)."""

    remote: float  # share of activations served by another rank than the token's
    expert_imbalance: float  # max over mean activations per rank

    @property
    def objective(self) -> float:
        return self.remote + BALANCE * (self.expert_imbalance - 1)


def score(counts_VE: torch.Tensor, owner: Owner) -> Score:
    return scores(counts_VE, [owner])[0]


def scores(counts_VE: torch.Tensor, owners: list[Owner]) -> list[Score]:
    """Score of each placement, computed together."""
    S_PVn = torch.einsum("ve,pen->pvn", counts_VE.double(), torch.stack([one_hot(o) for o in owners]))
    load_Pn = S_PVn.sum(1)
    imbalance = load_Pn.max(1).values / load_Pn.mean(1)
    return [Score(float(r), float(i)) for r, i in zip(balanced_remote(S_PVn), imbalance)]


def balanced_remote(S_PVn: torch.Tensor) -> torch.Tensor:
    """[P] remote share of activations when each token id's activations S[p, v] go to ranks in
    order of preference, most confident ids first, up to an equal share per rank (fractional: an
    id may split over ranks)."""
    total_PV = S_PVn.sum(2)
    share_PVn = S_PVn / total_PV.clamp(min=1)[..., None]
    order_PV = torch.argsort(-share_PVn.max(2).values, dim=1, stable=True)
    share_PVn = share_PVn.gather(1, order_PV[..., None].expand_as(share_PVn))  # rows in processing order
    pref_PVn = torch.argsort(-share_PVn, dim=2, stable=True)
    left_PV = total_PV.gather(1, order_PV)
    world = S_PVn.shape[2]
    room_Pn = (total_PV.sum(1, keepdim=True) / world).expand(-1, world).clone()
    local_P = torch.zeros(S_PVn.shape[0], dtype=torch.double)
    for k in range(world):
        for d in range(world):
            mass = left_PV * (pref_PVn[..., k] == d)
            take = torch.minimum(mass, (room_Pn[:, d:d + 1] - (mass.cumsum(1) - mass)).clamp(min=0))
            left_PV -= take
            room_Pn[:, d] -= take.sum(1)
            local_P += (take * share_PVn[..., d]).sum(1)
    return 1 - local_P / total_PV.sum(1)


def affinity(counts_VE: torch.Tensor) -> nx.Graph:
    """Experts as nodes; edge e–f weighs how much the same token ids use both:
    Σ_v c[v,e]·c[v,f] / Σ_e c[v,e]."""
    c = counts_VE.double()
    per_token = c / c.sum(1, keepdim=True).clamp(min=1)
    A = c.T @ per_token
    graph = nx.Graph()
    E = c.shape[1]
    graph.add_nodes_from(range(E))
    graph.add_weighted_edges_from((e, f, float(A[e, f])) for e in range(E) for f in range(e + 1, E) if A[e, f] > 0)
    return graph


def greedy(graph: nx.Graph, load_E: torch.Tensor, world: int) -> Owner:
    """Heaviest expert first, each to the rank with room whose experts it has most affinity with,
    less the rank's load share (empty ranks first until every rank is seeded)."""
    per, mean = load_E.numel() // world, float(load_E.sum()) / world
    members: list[list[int]] = [[] for _ in range(world)]
    load = [0.0] * world
    for e in sorted(range(load_E.numel()), key=lambda e: (-float(load_E[e]), e)):
        def gain(d: int) -> float:
            return sum(graph[e][f]["weight"] for f in members[d] if graph.has_edge(e, f)) - BALANCE * load[d] / mean
        d = max((d for d in range(world) if len(members[d]) < per), key=lambda d: (gain(d), -d))
        members[d].append(e)
        load[d] += float(load_E[e])
    return _owner(members, load_E.numel())


def kernighan_lin(graph: nx.Graph, world: int) -> Owner | None:
    """Recursive balanced bisection (None unless n is a power of two)."""
    if world & (world - 1):
        return None
    parts = [sorted(graph.nodes)]
    while len(parts) < world:
        parts = [sorted(half) for p in parts for half in _bisect(graph.subgraph(p), p)]
    return _owner(parts, graph.number_of_nodes())


def _bisect(graph: nx.Graph, nodes: list[int]) -> tuple[set, set]:
    start = (set(nodes[: len(nodes) // 2]), set(nodes[len(nodes) // 2:]))
    return nx.algorithms.community.kernighan_lin_bisection(graph, start, weight="weight", seed=0)


def _owner(members: list[list[int]], num_experts: int) -> Owner:
    owner = [0] * num_experts
    for d, group in enumerate(members):
        for e in group:
            owner[e] = d
    return tuple(owner)


def refine(counts_VE: torch.Tensor, owner: Owner) -> Owner:
    """Apply the best objective-lowering swap of two experts on different ranks until none is left."""
    c = counts_VE.double()
    owner, best = list(owner), score(c, owner).objective
    E = len(owner)
    for _ in range(SWEEPS):
        pairs = [(e, f) for e in range(E) for f in range(e + 1, E) if owner[e] != owner[f]]
        if not pairs:
            break
        objectives = [s.objective for s in scores(c, [tuple(_swap(owner, e, f)) for e, f in pairs])]
        i = min(range(len(pairs)), key=lambda i: (objectives[i], i))
        if objectives[i] >= best - 1e-12:
            break
        owner, best = _swap(owner, *pairs[i]), objectives[i]
    return tuple(owner)


def _swap(owner: list[int], e: int, f: int) -> list[int]:
    out = list(owner)
    out[e], out[f] = owner[f], owner[e]
    return out


def semantic(counts_VE: torch.Tensor, world: int) -> tuple[Owner, dict]:
    """The best refined start (module docstring), and what each start scored and became."""
    seen = counts_VE[counts_VE.sum(1) > 0]
    graph, load = affinity(seen), seen.sum(0).double()
    starts = {"greedy": greedy(graph, load, world), "kernighan_lin": kernighan_lin(graph, world),
              "contiguous": contiguous(seen.shape[1], world)}
    refined = {name: refine(seen, o) for name, o in starts.items() if o is not None}
    objectives = {name: score(seen, o).objective for name, o in refined.items()}
    winner = min(objectives, key=lambda name: (objectives[name], name))
    return refined[winner], {"start": winner, "objectives": objectives, "placements": refined}

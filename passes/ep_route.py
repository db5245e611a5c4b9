"""Expert-parallel routing on one rank: who sends which rows where, and how they come back.

Every rank routes every token (the gate is replicated), so all ranks derive the same table and
every split size is known locally. Rank r owns the token slice N·r/n … N·(r+1)/n; it sends each
of its tokens once to every rank owning one of the token's experts (de-duplicated).

Legend: N tokens this step, K top-k, E experts, El experts on this rank, R received rows, D hidden.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from planc.dims import RouterDims


def token_slices(num_tokens: int, world_size: int) -> list[tuple[int, int]]:
    bounds = [num_tokens * r // world_size for r in range(world_size + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


@dataclass
class EpRoute:
    mine: tuple[int, int]  # this rank's token slice
    slice_sizes: list[int]
    send_rows: torch.Tensor  # token ids (global) in send order, grouped by destination rank
    send_splits: list[int]
    recv_splits: list[int]
    recv_weight_RE: torch.Tensor  # routing weight of each received row for each local expert

    def dispatch_rows(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return x_BSD.reshape(-1, x_BSD.shape[-1])[self.send_rows]

    def mine_rows(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return x_BSD.reshape(-1, x_BSD.shape[-1])[self.mine[0]:self.mine[1]]

    def combine(self, back_RD: torch.Tensor, like_BSD: torch.Tensor) -> torch.Tensor:
        """Sum the partial expert outputs returned for this rank's tokens."""
        out = like_BSD.new_zeros(self.mine[1] - self.mine[0], like_BSD.shape[-1])
        return out.index_add_(0, self.send_rows - self.mine[0], back_RD.to(out.dtype))


def route(idx_NK: torch.Tensor, w_NK: torch.Tensor, owner: list[int], rank: int, world_size: int) -> EpRoute:
    owner_E = torch.tensor(owner, device=idx_NK.device)
    dest_NK = owner_E[idx_NK]
    needs_ND = torch.zeros(idx_NK.shape[0], world_size, dtype=torch.bool, device=idx_NK.device)
    needs_ND.scatter_(1, dest_NK, True)
    slices = token_slices(idx_NK.shape[0], world_size)
    lo, hi = slices[rank]
    send = [lo + needs_ND[lo:hi, d].nonzero().flatten() for d in range(world_size)]
    recv = [s + needs_ND[s:e, rank].nonzero().flatten() for s, e in slices]
    recv_rows = torch.cat(recv)
    local_E = torch.cumsum(owner_E == rank, 0) - 1  # expert id -> column among this rank's experts
    weight_RE = torch.zeros(recv_rows.numel(), int((owner_E == rank).sum()), dtype=w_NK.dtype, device=w_NK.device)
    hit = dest_NK[recv_rows] == rank  # [R, K]: which of the row's k choices live here
    rows, ks = hit.nonzero(as_tuple=True)
    weight_RE[rows, local_E[idx_NK[recv_rows][rows, ks]]] = w_NK[recv_rows][rows, ks]
    return EpRoute((lo, hi), [e - s for s, e in slices], torch.cat(send),
                   [t.numel() for t in send], [t.numel() for t in recv], weight_RE)


def route_tokens(ops, x_BSD: torch.Tensor, gate: dict, dims: RouterDims, owner: list[int], comm) -> EpRoute:
    idx_NK, w_NK = ops.moe_route(x_BSD.reshape(-1, x_BSD.shape[-1]), gate, dims)
    return route(idx_NK, w_NK, owner, comm.rank, comm.world_size)

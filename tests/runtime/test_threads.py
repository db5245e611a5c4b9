"""ThreadComm: the in-process simulation computes what the gloo collectives compute."""
from __future__ import annotations

import torch

from planc.runtime.threads import run_threads
from tests.runtime.workers import rank_rows

N = 3  # three ranks: the next rank and the previous one differ


def _exchange(comm) -> dict[str, torch.Tensor]:
    r = comm.rank
    buf = torch.empty(2, 3)
    sent = comm.isend(rank_rows(r, 2), (r + 1) % N)
    received = comm.irecv(buf, (r - 1) % N).wait()
    sent.wait()
    return {
        "all_reduce": comm.all_reduce_async(rank_rows(r, 4)).wait(),
        "reduce_scatter": comm.reduce_scatter(rank_rows(r, 2, cols=2 * N), dim=1),
        "all_gather": comm.all_gather_async(rank_rows(r, 2), dim=1).wait(),
        "broadcast": comm.broadcast(torch.full((3,), float(r)), src=N - 1),
        "recv": received,
    }


def test_collectives_and_point_to_point_across_threads():
    results = run_threads(_exchange, N)
    total = sum(rank_rows(j, 4) for j in range(N))
    total_wide = sum(rank_rows(j, 2, cols=2 * N) for j in range(N))
    for r, got in enumerate(results):
        assert torch.equal(got["all_reduce"], total)
        assert torch.equal(got["reduce_scatter"], total_wide[:, 2 * r:2 * r + 2])
        assert torch.equal(got["all_gather"], torch.cat([rank_rows(j, 2) for j in range(N)], 1))
        assert torch.equal(got["broadcast"], torch.full((3,), float(N - 1)))
        assert torch.equal(got["recv"], rank_rows((r - 1) % N, 2))


def test_reduce_scatter_varlen_keeps_each_ranks_uneven_piece_of_the_sum():
    sizes = [3, 0, 2]  # a rank may keep nothing

    def body(comm):
        return comm.reduce_scatter_varlen(rank_rows(comm.rank, sum(sizes)), sizes)

    total = sum(rank_rows(j, sum(sizes)) for j in range(N))
    for r, got in enumerate(run_threads(body, N)):
        lo = sum(sizes[:r])
        assert torch.equal(got, total[lo:lo + sizes[r]])

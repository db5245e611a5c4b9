"""Worker entry points for the runtime tests; launch() imports them in every spawned rank.

Each rank builds every rank's input deterministically (rank_rows), so it can compute the
expected result of a collective locally; the test process compares got/want and the counters.
"""
from __future__ import annotations

import os
import time
from typing import Any

import torch

from planc.runtime.comm import Comm
from planc.runtime.launch import write_result


def rank_rows(rank: int, rows: int, cols: int = 3, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.arange(rows * cols) + 1000 * rank).reshape(rows, cols).to(dtype)


def a2a_rows(src: int, dst: int) -> int:
    """Rows rank src sends to rank dst: uneven, with zeros on and off the diagonal."""
    return (src + 2 * dst) % 3


def varlen_rows(rank: int) -> int:
    return rank % 3


def _a2a_uneven(comm: Comm) -> tuple[torch.Tensor, torch.Tensor]:
    r, n = comm.rank, comm.world_size
    send = [a2a_rows(r, j) for j in range(n)]
    recv = [a2a_rows(j, r) for j in range(n)]
    got = comm.all_to_all(rank_rows(r, sum(send)), send, recv)
    blocks = []
    for j in range(n):  # rank j's rows addressed to r sit after its blocks for ranks < r
        start = sum(a2a_rows(j, k) for k in range(r))
        blocks.append(rank_rows(j, sum(a2a_rows(j, k) for k in range(n)))[start : start + a2a_rows(j, r)])
    return got, torch.cat(blocks)


def _a2a_one_sided(comm: Comm) -> tuple[torch.Tensor, torch.Tensor]:
    # Rank 0 sends one row to every rank (itself included); every other rank sends nothing.
    r, n = comm.rank, comm.world_size
    send = [1] * n if r == 0 else [0] * n
    recv = [1] + [0] * (n - 1)
    got = comm.all_to_all(rank_rows(r, sum(send)), send, recv)
    return got, rank_rows(0, n)[r : r + 1]


def _prefill_checks(comm: Comm) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    r, n = comm.rank, comm.world_size
    ranks = range(n)
    total = sum(rank_rows(j, 2 * n) for j in ranks)
    total_wide = sum(rank_rows(j, 2, cols=2 * n) for j in ranks)
    empty = torch.empty(0, 3)
    return {
        "all_reduce": (comm.all_reduce(rank_rows(r, 4)), sum(rank_rows(j, 4) for j in ranks)),
        "reduce_scatter_dim0": (comm.reduce_scatter(rank_rows(r, 2 * n)), total[2 * r : 2 * r + 2]),
        "reduce_scatter_dim1": (
            comm.reduce_scatter(rank_rows(r, 2, cols=2 * n), dim=1), total_wide[:, 2 * r : 2 * r + 2]
        ),
        "all_gather_dim0": (comm.all_gather(rank_rows(r, 2)), torch.cat([rank_rows(j, 2) for j in ranks])),
        "all_gather_dim1": (comm.all_gather(rank_rows(r, 2), dim=1), torch.cat([rank_rows(j, 2) for j in ranks], 1)),
        "all_gather_varlen": (
            comm.all_gather_varlen(rank_rows(r, varlen_rows(r)), [varlen_rows(j) for j in ranks]),
            torch.cat([rank_rows(j, varlen_rows(j)) for j in ranks]),
        ),
        "all_to_all_uneven": _a2a_uneven(comm),
        "all_to_all_empty": (comm.all_to_all(empty, [0] * n, [0] * n), empty),
        "all_to_all_one_sided": _a2a_one_sided(comm),
        "broadcast": (comm.broadcast(torch.full((5,), float(r)), src=n - 1), torch.full((5,), float(n - 1))),
    }


def _decode_checks(comm: Comm) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    r, n = comm.rank, comm.world_size
    ints = [torch.arange(5, dtype=torch.int64) * (j + 1) for j in range(n)]
    halves = [rank_rows(j, 2, dtype=torch.bfloat16) for j in range(n)]
    return {
        "all_reduce_int64": (comm.all_reduce(ints[r].clone()), sum(ints)),
        "all_gather_bf16": (comm.all_gather(halves[r]), torch.cat(halves)),
    }


def _as_json(got: torch.Tensor, want: torch.Tensor) -> dict[str, Any]:
    return {
        "got": got.float().tolist(), "want": want.float().tolist(),
        "shape": [list(got.shape), list(want.shape)], "dtype": [str(got.dtype), str(want.dtype)],
    }


def comm_checks(args: dict[str, Any]) -> None:
    """Every Comm collective on fixed inputs, in two phases; hands back got/want and stats."""
    comm = Comm()
    with comm.phase("prefill"):
        checks = _prefill_checks(comm)
        comm.barrier()
    with comm.phase("decode"):
        checks |= _decode_checks(comm)
    write_result({
        "rank": comm.rank,
        "world_size": comm.world_size,
        "checks": {name: _as_json(*pair) for name, pair in checks.items()},
        "stats": comm.stats(),
    })


def _ring_send_recv(comm: Comm, *, overlapped: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank sends its rows to the next rank and receives the previous rank's; blocking
    forms alternate the order by parity so no two ranks wait on each other."""
    r, n = comm.rank, comm.world_size
    nxt, prev = (r + 1) % n, (r - 1) % n
    buf = torch.empty(2, 3)
    if overlapped:
        sent, got = comm.isend(rank_rows(r, 2), nxt), comm.irecv(buf, prev)
        assert sent.wait() is None and got.wait() is buf
    elif r % 2 == 0:
        comm.send(rank_rows(r, 2), nxt)
        comm.recv(buf, prev)
    else:
        comm.recv(buf, prev)
        comm.send(rank_rows(r, 2), nxt)
    return buf, rank_rows(prev, 2)


def _async_checks(comm: Comm, *, overlapped: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    r, n = comm.rank, comm.world_size
    ranks = range(n)
    if overlapped:  # two all-reduces in flight at once, waited in the opposite order
        first, second = comm.all_reduce_async(rank_rows(r, 4)), comm.all_reduce_async(rank_rows(r, 1) * 2)
        reduced_twice, reduced = second.wait(), first.wait()
        assert first.wait() is reduced  # a second wait returns the result and records nothing
        scattered = comm.reduce_scatter_async(rank_rows(r, 2 * n)).wait()
        gathered = comm.all_gather_async(rank_rows(r, 2), dim=1).wait()
    else:
        reduced, reduced_twice = comm.all_reduce(rank_rows(r, 4)), comm.all_reduce(rank_rows(r, 1) * 2)
        scattered = comm.reduce_scatter(rank_rows(r, 2 * n))
        gathered = comm.all_gather(rank_rows(r, 2), dim=1)
    return {
        "all_reduce": (reduced, sum(rank_rows(j, 4) for j in ranks)),
        "all_reduce_second": (reduced_twice, sum(rank_rows(j, 1) * 2 for j in ranks)),
        "reduce_scatter": (scattered, sum(rank_rows(j, 2 * n) for j in ranks)[2 * r : 2 * r + 2]),
        "all_gather": (gathered, torch.cat([rank_rows(j, 2) for j in ranks], 1)),
        "send_recv": _ring_send_recv(comm, overlapped=overlapped),
    }


def comm_async_checks(args: dict[str, Any]) -> None:
    """The same collectives and ring exchange, blocking in phase "sync", async in phase "async"."""
    comm = Comm()
    checks = {}
    for phase in ("sync", "async"):
        with comm.phase(phase):
            pairs = _async_checks(comm, overlapped=phase == "async")
        checks |= {f"{phase}.{name}": pair for name, pair in pairs.items()}
    write_result({"checks": {name: _as_json(*pair) for name, pair in checks.items()}, "stats": comm.stats()})


def echo(args: dict[str, Any]) -> None:
    """Prints on every rank (only rank 0's output should reach the caller); all but the last rank report."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    print(f"echo from rank {rank}: {args['word']}", flush=True)
    Comm().barrier()
    if rank < world - 1:
        write_result({"rank": rank, "args": args, "gloo_ifname": os.environ.get("GLOO_SOCKET_IFNAME")})


def raise_on_rank(args: dict[str, Any]) -> None:
    """args["rank"] raises while every other rank is blocked in an all_reduce it never joins."""
    comm = Comm()
    if comm.rank == args["rank"]:
        time.sleep(1.0)  # let the others reach the all_reduce first
        raise ValueError(args["message"])
    comm.all_reduce(torch.ones(1))
    time.sleep(600)  # reached only if the all_reduce wrongly completed: the launch timeout ends it


def sleep_on_rank(args: dict[str, Any]) -> None:
    """args["rank"] sleeps far past the timeout while the others wait in a barrier."""
    comm = Comm()
    if comm.rank == args["rank"]:
        time.sleep(args["seconds"])
    comm.barrier()

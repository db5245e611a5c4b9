"""Logical bytes a rank sends in each collective, by the standard ring formulas, and the order in
which a ring reduce-scatter visits chunks and ranks.

S = logical payload in bytes, n = world size; integer arithmetic, rounded down, so the compile-time
report and the runtime's counters agree exactly (planc.runtime.comm counts with these).
    all_reduce       2(n-1)/n * S   S = the tensor being reduced (reduce-scatter + all-gather)
    reduce_scatter    (n-1)/n * S   S = the full input (every rank's contribution)
    all_gather        (n-1)/n * S   S = the full output (the concatenation over ranks)
    broadcast         (n-1)/n * S   S = the tensor broadcast (pipelined ring)
    all_to_all       the rows a rank sends to other ranks (what it keeps never crosses a link)
"""
from __future__ import annotations


def ring_all_reduce_bytes(S: int, n: int) -> int:
    return 2 * (n - 1) * S // n


def ring_reduce_scatter_bytes(S: int, n: int) -> int:
    return (n - 1) * S // n


def ring_all_gather_bytes(S: int, n: int) -> int:
    return (n - 1) * S // n


def broadcast_bytes(S: int, n: int) -> int:
    return (n - 1) * S // n


def all_to_all_bytes(send_splits: list[int], rank: int, row_bytes: int) -> int:
    return (sum(send_splits) - send_splits[rank]) * row_bytes


def ring_chunk_order(rank: int, n: int) -> list[int]:
    """The chunks rank `rank` works on in a ring reduce-scatter, in order: (rank+1)%n first, its
    own last. At step s it adds its part of chunk (rank+1+s)%n to the partial sum received from
    rank+1 and passes the result to rank-1; at step n-1 its own chunk is fully reduced."""
    return [(rank + 1 + s) % n for s in range(n)]


def ring_sum_order(chunk: int, n: int) -> list[int]:
    """The ranks whose parts of `chunk` a ring reduce-scatter adds, in the order it adds them:
    chunk-1 first (it starts the chunk at step 0), then chunk-2, ..., the owner `chunk` last."""
    return [(chunk - 1 - s) % n for s in range(n)]


def ring_piece_order(rank: int, n: int, pieces: int) -> list[int]:
    """The order rank `rank` makes `pieces` output pieces in when chunk c is pieces c·k ... c·k+k-1
    (k = pieces / n): ring_chunk_order, each chunk's pieces in turn."""
    k = pieces // n
    return [chunk * k + j for chunk in ring_chunk_order(rank, n) for j in range(k)]

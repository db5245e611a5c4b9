"""Logical bytes a rank sends in each collective, by the standard ring formulas.

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

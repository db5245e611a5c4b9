"""Run every rank of an artifact in one process, one thread per rank, with an in-memory Comm.

A single-process simulation of the distributed program: the same per-rank code and weights,
collectives done by summing / concatenating in memory. Tests use it to compare against real gloo
runs and to look inside every rank (caches, weights) at once.
"""
from __future__ import annotations

import queue
import threading

import torch

from planc.runtime.comm import Comm, Pending

TIMEOUT_S = 120  # a rank waiting this long for its peers has lost them


class _Exchange:
    """Where the ranks of one collective meet: each deposits, all wait, each reads everything."""

    def __init__(self, world_size: int):
        self.barrier = threading.Barrier(world_size, timeout=TIMEOUT_S)
        self.slots: list = [None] * world_size
        self.mailboxes = {(src, dst): queue.Queue() for src in range(world_size) for dst in range(world_size)}

    def gather(self, rank: int, value) -> list:
        self.slots[rank] = value
        self.barrier.wait()
        values = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before everyone has read
        return values


class ThreadComm(Comm):
    """Comm's API over an _Exchange; records nothing (counts are measured on real runs).

    The async forms complete before they return (wait() only hands the result over): every rank
    issues collectives in the same order, so the simulation stays correct, just never overlapped.
    """

    def __init__(self, rank: int, world_size: int, exchange: _Exchange):
        self._setup(rank, world_size, distributed=False, sync_cuda=False)
        self._ex = exchange

    def all_reduce_async(self, x):
        parts = self._ex.gather(self.rank, x.clone())
        return Pending.done(sum(parts[1:], parts[0].clone()))

    def reduce_scatter_async(self, x, dim=0):
        self._check_divisible("reduce_scatter", x, dim)
        parts = self._ex.gather(self.rank, x.clone())
        total = sum(parts[1:], parts[0].clone())
        return Pending.done(total.chunk(self.world_size, dim)[self.rank].clone())

    def all_gather_async(self, x, dim=0):
        return Pending.done(torch.cat(self._ex.gather(self.rank, x.clone()), dim))

    def broadcast(self, x, src=0):
        return x.copy_(self._ex.gather(self.rank, x.clone())[src])

    def barrier(self):
        self._ex.gather(self.rank, None)

    def isend(self, x, dst):
        self._check_peer("send", dst)
        self._ex.mailboxes[self.rank, dst].put(x.clone())
        return Pending.done(None)

    def irecv(self, buf, src):
        self._check_peer("recv", src)
        mailbox = self._ex.mailboxes[src, self.rank]
        return Pending(lambda: buf.copy_(mailbox.get(timeout=TIMEOUT_S)))

    def all_gather_varlen(self, x, sizes):
        return torch.cat(self._ex.gather(self.rank, x.clone()))

    def reduce_scatter_varlen(self, x, sizes):
        parts = self._ex.gather(self.rank, x.clone())
        lo = sum(sizes[: self.rank])
        return sum(parts[1:], parts[0].clone())[lo : lo + sizes[self.rank]].clone()

    def all_to_all(self, x, send_splits, recv_splits):
        pieces = self._ex.gather(self.rank, list(x.split(send_splits)))
        return torch.cat([pieces[src][self.rank] for src in range(self.world_size)])


def run_threads(fn, world_size: int) -> list:
    """fn(comm) on every rank in its own thread; returns the per-rank results (re-raises errors)."""
    exchange = _Exchange(world_size)
    results: list = [None] * world_size
    errors: list = []

    def body(rank: int) -> None:
        try:
            results[rank] = fn(ThreadComm(rank, world_size, exchange))
        except BaseException as exc:  # surface the first failure, unblock the others
            errors.append(exc)
            exchange.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    if errors:
        raise errors[0]
    return results

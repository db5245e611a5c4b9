"""The one wrapper through which every collective of a run goes, with logical byte accounting.

Legend (S = logical payload in bytes = numel * element_size, n = world size, integer bytes,
rounded down with integer arithmetic so the runtime and the compile-time report agree exactly):
    all_reduce       2(n-1)/n * S   S = the tensor being reduced (ring: reduce-scatter + all-gather)
    reduce_scatter    (n-1)/n * S   S = the full input (every rank's contribution)
    all_gather        (n-1)/n * S   S = the full output (the concatenation over ranks)
    all_gather_varlen (n-1)/n * S   S = the full unpadded output (padding is a gloo/NCCL detail)
    reduce_scatter_varlen  as reduce_scatter, S = the full unpadded input; counted as reduce_scatter
    all_to_all       sum(send_splits) - send_splits[rank] rows * row bytes (off-diagonal blocks
                     this rank sends; what it keeps for itself never crosses a link)
    broadcast         (n-1)/n * S   S = the tensor broadcast (pipelined ring)
    send, recv        S             S = the message (point to point: it crosses one link once)
    barrier          0
Bytes are never read from the backend: gloo emulates some collectives (e.g. reduce-scatter via
all-reduce), so its traffic says nothing about what NCCL on a GPU would move.

Asynchronous forms (all_reduce_async, reduce_scatter_async, all_gather_async, isend, irecv)
return a Pending whose wait() returns the result; they count exactly as their synchronous forms,
under the same op name, and their time runs from the call until wait() returns.

While a trace records (`planc run --trace`, planc.runtime.trace), `spans` holds every call's
(op, logical bytes, start, end) in time.perf_counter seconds; otherwise it is None.

Verified on torch 2.13 CPU with gloo (2 and 4 ranks; fp32, bf16, fp16, int64, values checked):
all_reduce, reduce_scatter_single, all_gather_single, broadcast and all_to_all_single with uneven,
zero-size and fully empty splits all work natively, so no fallback path exists here; so do
async_op=True on all_reduce, reduce_scatter_single and all_gather_single, and send, recv, isend
and irecv.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from planc.ring import (all_to_all_bytes, broadcast_bytes, ring_all_gather_bytes, ring_all_reduce_bytes,
                        ring_reduce_scatter_bytes)
from planc.runtime import status

Stats = dict[str, dict[str, dict[str, float | int]]]


def payload_bytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


class Pending:
    """An operation in flight; wait() blocks until it is done and returns its result (once)."""

    def __init__(self, finish: Callable[[], Any]):
        self._finish: Callable[[], Any] | None = finish
        self._result: Any = None

    @classmethod
    def done(cls, result: Any) -> Pending:
        return cls(lambda: result)

    def wait(self) -> Any:
        if self._finish is not None:
            self._result, self._finish = self._finish(), None
        return self._result


@dataclass(frozen=True)
class CommRecord:
    op: str
    phase: str
    logical_bytes: int
    seconds: float


class Comm:
    """Collectives over the default process group, counted per phase and op.

    Every method takes and returns torch tensors (CPU with gloo, CUDA with NCCL); gathers and
    scatters work along dim 0 internally, other dims are moved there and back.
    """

    def __init__(self, *, sync_cuda: bool = True) -> None:
        if not dist.is_initialized():
            raise RuntimeError("Comm() needs an initialized default process group; use Comm.single()")
        self._setup(dist.get_rank(), dist.get_world_size(), distributed=True, sync_cuda=sync_cuda)

    @classmethod
    def single(cls) -> Comm:
        """World size 1 without any process group: collectives are identities and record nothing."""
        comm = cls.__new__(cls)
        comm._setup(0, 1, distributed=False, sync_cuda=False)
        return comm

    def _setup(self, rank: int, world_size: int, *, distributed: bool, sync_cuda: bool) -> None:
        self.rank = rank
        self.world_size = world_size
        self._distributed = distributed
        # NCCL calls return once enqueued; syncing makes `seconds` the real collective time.
        self._sync_cuda = sync_cuda
        self._phase = "default"
        self._stats: Stats = {}
        self.spans: list[tuple[str, int, float, float]] | None = None

    @property
    def backend(self) -> str | None:
        """The process group's backend (nccl, gloo); None without one."""
        return dist.get_backend() if self._distributed else None

    @property
    def device(self) -> torch.device:
        """Where this rank's tensors live: its CUDA device under NCCL (launch set it from LOCAL_RANK),
        the CPU otherwise (gloo, or no process group)."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # -- accounting -------------------------------------------------------------------------

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        previous, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = previous

    @property
    def current_phase(self) -> str:
        return self._phase

    def stats(self) -> Stats:
        return {p: {op: dict(c) for op, c in ops.items()} for p, ops in self._stats.items()}

    def reset(self) -> None:
        self._stats = {}

    def _record(self, rec: CommRecord, start: float) -> None:
        counter = self._stats.setdefault(rec.phase, {}).setdefault(
            rec.op, {"calls": 0, "bytes": 0, "seconds": 0.0}
        )
        counter["calls"] += 1
        counter["bytes"] += rec.logical_bytes
        counter["seconds"] += rec.seconds
        if self.spans is not None:
            self.spans.append((rec.op, rec.logical_bytes, start, start + rec.seconds))

    def _timed(self, op: str, logical_bytes: int, x: torch.Tensor, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        sync = self._sync_cuda and x.is_cuda
        if sync:
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        rank_status = status.current()  # where this rank waits, for the launcher to name on a failure
        rank_status.begin(op, self._phase, blocking=True)
        out = fn()
        if sync:
            torch.cuda.synchronize(x.device)
        rank_status.end()
        self._record(CommRecord(op, self._phase, logical_bytes, time.perf_counter() - start), start)
        return out

    def _started(self, op: str, logical_bytes: int, x: torch.Tensor, start_fn: Callable[[], dist.Work],
                 result: Any) -> Pending:
        """Start an async op now; its record (phase at the start, time until wait) is made in wait()."""
        phase, sync = self._phase, self._sync_cuda and x.is_cuda
        if sync:
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        rank_status = status.current()
        seq = rank_status.begin(op, phase, blocking=False)
        work = start_fn()

        def finish() -> Any:
            rank_status.waiting(op, seq)
            work.wait()
            if sync:
                torch.cuda.synchronize(x.device)
            rank_status.end()
            self._record(CommRecord(op, phase, logical_bytes, time.perf_counter() - start), start)
            return result

        return Pending(finish)

    # -- collectives --------------------------------------------------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place on contiguous `x`; returns the reduced tensor."""
        return self.all_reduce_async(x).wait()

    def all_reduce_async(self, x: torch.Tensor) -> Pending:
        if not self._distributed:
            return Pending.done(x)
        buf = x if x.is_contiguous() else x.contiguous()
        nbytes = ring_all_reduce_bytes(payload_bytes(buf), self.world_size)
        return self._started("all_reduce", nbytes, buf, partial(dist.all_reduce, buf, async_op=True), buf)

    def reduce_scatter(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Sum over ranks, then keep this rank's chunk of `dim`: [.., n*c, ..] -> [.., c, ..]."""
        return self.reduce_scatter_async(x, dim).wait()

    def reduce_scatter_async(self, x: torch.Tensor, dim: int = 0) -> Pending:
        self._check_divisible("reduce_scatter", x, dim)
        if not self._distributed:
            return Pending.done(x.clone())
        x0 = x.movedim(dim, 0).contiguous()
        out0 = x0.new_empty((x0.shape[0] // self.world_size, *x0.shape[1:]))
        nbytes = ring_reduce_scatter_bytes(payload_bytes(x0), self.world_size)
        start = partial(dist.reduce_scatter_single, out0, x0, async_op=True)
        return self._started("reduce_scatter", nbytes, x0, start, out0.movedim(0, dim))

    def all_gather(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Concatenate equal-sized pieces over ranks along `dim`: [.., c, ..] -> [.., n*c, ..]."""
        return self.all_gather_async(x, dim).wait()

    def all_gather_async(self, x: torch.Tensor, dim: int = 0) -> Pending:
        if not self._distributed:
            return Pending.done(x.clone())
        x0 = x.movedim(dim, 0).contiguous()
        out0 = x0.new_empty((x0.shape[0] * self.world_size, *x0.shape[1:]))
        nbytes = ring_all_gather_bytes(payload_bytes(out0), self.world_size)
        start = partial(dist.all_gather_single, out0, x0, async_op=True)
        return self._started("all_gather", nbytes, x0, start, out0.movedim(0, dim))

    def all_gather_varlen(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Concatenate over ranks along dim 0 where rank r holds sizes[r] rows."""
        if len(sizes) != self.world_size or sizes[self.rank] != x.shape[0]:
            raise ValueError(f"all_gather_varlen: rank {self.rank} has {x.shape[0]} rows, sizes={sizes}")
        if not self._distributed:
            return x.clone()
        nbytes = ring_all_gather_bytes(sum(sizes) * _row_bytes(x), self.world_size)
        return self._timed("all_gather_varlen", nbytes, x, lambda: self._all_gather_varlen0(x, sizes))

    def reduce_scatter_varlen(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Sum over ranks along dim 0, then keep this rank's piece when rank r's piece is sizes[r]
        rows of the concatenation (a reduce-scatter with uneven pieces)."""
        if len(sizes) != self.world_size or sum(sizes) != x.shape[0]:
            raise ValueError(f"reduce_scatter_varlen: rank {self.rank} has {x.shape[0]} rows, sizes={sizes}")
        if not self._distributed:
            return x.clone()
        nbytes = ring_reduce_scatter_bytes(x.shape[0] * _row_bytes(x), self.world_size)
        return self._timed("reduce_scatter", nbytes, x, lambda: self._reduce_scatter_varlen0(x, sizes))

    def all_to_all(self, x: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        """Send rows send_splits[r] of `x` (in rank order) to rank r; returns the rows received."""
        if len(send_splits) != self.world_size or len(recv_splits) != self.world_size or sum(send_splits) != x.shape[0]:
            raise ValueError(
                f"all_to_all: rank {self.rank} has {x.shape[0]} rows, send_splits={send_splits}, "
                f"recv_splits={recv_splits}, world size {self.world_size}"
            )
        if not self._distributed:
            return x.clone()
        nbytes = all_to_all_bytes(send_splits, self.rank, _row_bytes(x))
        return self._timed("all_to_all", nbytes, x, lambda: _all_to_all(x, send_splits, recv_splits))

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank `src`'s `x` on every rank (in place on contiguous `x`)."""
        if not self._distributed:
            return x
        buf = x if x.is_contiguous() else x.contiguous()
        nbytes = broadcast_bytes(payload_bytes(buf), self.world_size)
        return self._timed("broadcast", nbytes, buf, lambda: _broadcast(buf, src))

    def barrier(self) -> None:
        if self._distributed:
            self._timed("barrier", 0, torch.empty(0), _barrier)

    # -- point to point -----------------------------------------------------------------------

    def send(self, x: torch.Tensor, dst: int) -> None:
        """Send `x` to rank `dst`, which posts a recv of the same shape and dtype."""
        self.isend(x, dst).wait()

    def recv(self, buf: torch.Tensor, src: int) -> torch.Tensor:
        """Receive rank `src`'s message into contiguous `buf`; returns `buf`."""
        return self.irecv(buf, src).wait()

    def isend(self, x: torch.Tensor, dst: int) -> Pending:
        self._check_peer("send", dst)
        buf = x if x.is_contiguous() else x.contiguous()
        return self._started("send", payload_bytes(buf), buf, partial(dist.isend, buf, dst), None)

    def irecv(self, buf: torch.Tensor, src: int) -> Pending:
        self._check_peer("recv", src)
        if not buf.is_contiguous():
            raise ValueError(f"recv: the buffer of shape {tuple(buf.shape)} must be contiguous (it is filled in place)")
        return self._started("recv", payload_bytes(buf), buf, partial(dist.irecv, buf, src), buf)

    # -- dim-0 implementations -----------------------------------------------------------------

    def _check_peer(self, op: str, peer: int) -> None:
        if not 0 <= peer < self.world_size or peer == self.rank:
            raise ValueError(f"{op}: rank {self.rank} cannot exchange with rank {peer} (world size {self.world_size})")

    def _check_divisible(self, op: str, x: torch.Tensor, dim: int) -> None:
        if x.shape[dim] % self.world_size:
            raise ValueError(
                f"{op}: dim {dim} of shape {tuple(x.shape)} is not divisible by world size {self.world_size}"
            )

    def _all_gather0(self, x0: torch.Tensor) -> torch.Tensor:
        out = x0.new_empty((x0.shape[0] * self.world_size, *x0.shape[1:]))
        dist.all_gather_single(out, x0)
        return out

    def _all_gather_varlen0(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        # Backends gather equal pieces only: pad every piece to the longest, then drop the padding.
        longest = max(sizes)
        padded = x.new_zeros((longest, *x.shape[1:]))
        padded[: x.shape[0]] = x
        gathered = self._all_gather0(padded)
        return torch.cat([gathered[r * longest : r * longest + n] for r, n in enumerate(sizes)])


    def _reduce_scatter_varlen0(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        # Backends scatter equal pieces only: pad every piece to the longest, then drop the padding.
        longest, starts = max(sizes), [sum(sizes[:r]) for r in range(self.world_size)]
        padded = x.new_zeros((longest * self.world_size, *x.shape[1:]))
        for r, (start, n) in enumerate(zip(starts, sizes)):
            padded[r * longest : r * longest + n] = x[start : start + n]
        out = padded.new_empty((longest, *x.shape[1:]))
        dist.reduce_scatter_single(out, padded)
        return out[: sizes[self.rank]]


def _row_bytes(x: torch.Tensor) -> int:
    return math.prod(x.shape[1:]) * x.element_size()


def _broadcast(x: torch.Tensor, src: int) -> torch.Tensor:
    dist.broadcast(x, src=src)
    return x


def _all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits)
    return out


def _barrier() -> torch.Tensor:
    dist.barrier()
    return torch.empty(0)

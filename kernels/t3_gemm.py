"""T3's producer GEMM: `y = x @ weight.T`, its output columns cut into pieces made in a ring's order,
with a counter of finished tiles per piece (arXiv 2401.16677).

Shape legend: M rows of x (tokens), K input features, N output features, P pieces of N/P columns,
n ranks, k = P/n pieces per rank-owned chunk (chunk c = pieces c·k ... c·k + k - 1).

Tile order (the swizzle): program `pid` computes tile `pid % tiles_per_piece` of the piece at
position `start + pid // tiles_per_piece` of this rank's order, which is the k pieces of chunk
(rank+1) % n, then of (rank+2) % n, ..., its own chunk `rank` last (planc.ring.ring_piece_order).
After storing its tile a program adds 1 to counters[piece] (atomic, release semantics): a piece is
complete when its counter reaches tiles_per_piece, and a reader that loads the counter with
acquire semantics (`wait_piece`) sees the whole piece.

On a GPU one launch covers every piece (programs start roughly in pid order, so pieces complete in
ring order) and the communication waits on the counters from a side stream. Under the interpreter
(CPU) programs run one after another, so the driver launches one piece at a time (`start` = its
position, one piece's tiles) and sends it when its counter says it is complete.

Under the interpreter low-precision tl.dot is wrong, so there the kernel multiplies in fp32 and the
launcher rounds a bf16 result in torch (as kernels/linear.py does).
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from planc.kernels.gemm_tile import gemm_blocks, matmul_tile

from planc.ring import ring_piece_order

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The interpreter patches triton.language while a kernel runs: thread ranks (planc.runtime.threads)
# launch one at a time. Process ranks, and compiled kernels, are unaffected.
_INTERPRETER = threading.Lock()


@triton.jit
def _t3_gemm_kernel(
    x_ptr, w_ptr, y_ptr, counter_ptr, trace_ptr,
    M, K,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_ym, stride_yn,
    rank, world, start,
    PIECE_N: tl.constexpr, PIECES_PER_RANK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, TRACE: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(PIECE_N, BLOCK_N)
    tiles = tl.cdiv(M, BLOCK_M) * tiles_n
    position = start + pid // tiles
    chunk = (rank + 1 + position // PIECES_PER_RANK) % world
    piece = chunk * PIECES_PER_RANK + position % PIECES_PER_RANK
    tile = pid % tiles

    offs_m = (tile // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_in = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)  # columns within the piece
    offs_n = piece * PIECE_N + offs_in
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_in < PIECE_N
    # x tile [BLOCK_M, BLOCK_K]; weight tile read transposed as [BLOCK_K, BLOCK_N].
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk

    acc = matmul_tile(x_ptrs, w_ptrs, mask_m, mask_n, K, stride_xk, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)

    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    if TRACE:  # which piece the program at this position of the launch order made
        tl.store(trace_ptr + start * tiles + pid, piece)
    tl.debug_barrier()  # every thread's store is issued before the counter says the tile is done
    tl.atomic_add(counter_ptr + piece, 1, sem="release")


@triton.jit
def _wait_piece_kernel(counter_ptr, piece, target):
    seen = tl.atomic_add(counter_ptr + piece, 0, sem="acquire")
    while seen < target:
        seen = tl.atomic_add(counter_ptr + piece, 0, sem="acquire")


def blocks(m: int, n: int, k: int, pieces: int, elem: int) -> tuple[int, int, int]:
    """A piece's tiles: gemm_blocks over one piece's N/P columns (as this process launches them)."""
    return gemm_blocks(m, n // pieces, k, elem, compiled=os.environ.get("TRITON_INTERPRET") != "1")


def tiles_per_piece(m: int, n: int, k: int, pieces: int, elem: int) -> int:
    block_m, block_n, _ = blocks(m, n, k, pieces, elem)
    return triton.cdiv(m, block_m) * triton.cdiv(n // pieces, block_n)


def _check(x_MK: torch.Tensor, weight: torch.Tensor, world: int, pieces: int) -> None:
    if x_MK.dim() != 2 or weight.dim() != 2 or x_MK.shape[1] != weight.shape[1]:
        raise ValueError(f"t3_gemm: x must be [M, K] and weight [N, K] (nn.Linear layout); got x {tuple(x_MK.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if x_MK.dtype not in SUPPORTED_DTYPES or weight.dtype != x_MK.dtype or x_MK.device != weight.device:
        raise ValueError(f"t3_gemm: x and weight must share one device and one dtype among {SUPPORTED_DTYPES}; got "
                         f"x {x_MK.dtype} on {x_MK.device}, weight {weight.dtype} on {weight.device}")
    n = weight.shape[0]
    if pieces % world or n % pieces:
        raise ValueError(f"t3_gemm: {pieces} pieces must be a multiple of the {world} ranks and divide the {n} "
                         f"output features")


def t3_gemm(x_MK: torch.Tensor, weight: torch.Tensor, rank: int, world: int, pieces: int, *, start: int = 0,
            count: int | None = None, y_MN: torch.Tensor | None = None, counters: torch.Tensor | None = None,
            trace: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Make `count` pieces (default: all) from position `start` of rank's order into y_MN [M, N];
    returns (y_MN, counters [P] int32). Pass y_MN and counters back in to go on with later pieces;
    `trace` (int32 [P · tiles_per_piece]) receives the piece each program made, by launch position."""
    _check(x_MK, weight, world, pieces)
    m, k = x_MK.shape
    n = weight.shape[0]
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    buf_dtype = torch.float32 if interpret and x_MK.dtype != torch.float32 else x_MK.dtype
    y_MN = torch.empty((m, n), dtype=buf_dtype, device=x_MK.device) if y_MN is None else y_MN
    counters = torch.zeros(pieces, dtype=torch.int32, device=x_MK.device) if counters is None else counters
    count = pieces - start if count is None else count
    if m == 0 or count == 0:
        return y_MN, counters
    block_m, block_n, block_k = blocks(m, n, k, pieces, x_MK.element_size())
    grid = (count * tiles_per_piece(m, n, k, pieces, x_MK.element_size()),)
    with _INTERPRETER if interpret else contextlib.nullcontext():
        _t3_gemm_kernel[grid](
            x_MK, weight, y_MN, counters, trace if trace is not None else counters,
            m, k,
            x_MK.stride(0), x_MK.stride(1),
            weight.stride(0), weight.stride(1),
            y_MN.stride(0), y_MN.stride(1),
            rank, world, start,
            PIECE_N=n // pieces, PIECES_PER_RANK=pieces // world,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            UPCAST=interpret, TRACE=trace is not None,
        )
    return y_MN, counters


def wait_piece(counters: torch.Tensor, piece: int, target: int) -> None:
    """On the current CUDA stream: hold every later operation until counters[piece] >= target."""
    _wait_piece_kernel[(1,)](counters, piece, target)


class Pieces:
    """One rank's partial sums of `x @ weight.T (+ bias)`, piece by piece, for the T3 ring.

    CPU: `compute(piece)` launches that piece's tiles (pieces are asked for in rank's order);
    CUDA: `running()` launches every piece at once and runs the ring on a side stream, where
    `compute(piece)` waits for the piece's counter."""

    def __init__(self, x_MK: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rank: int, world: int,
                 pieces: int):
        _check(x_MK, weight, world, pieces)
        self.x_MK, self.weight, self.bias = x_MK, weight, bias
        self.rank, self.world, self.num = rank, world, pieces
        self.width = weight.shape[0] // pieces
        self.tiles = tiles_per_piece(x_MK.shape[0], weight.shape[0], x_MK.shape[1], pieces, x_MK.element_size())
        self.order = ring_piece_order(rank, world, pieces)
        self.y_MN: torch.Tensor | None = None
        self.counters: torch.Tensor | None = None
        self._launched = False

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        if not self.x_MK.is_cuda:
            yield
            return
        main, side = torch.cuda.current_stream(), torch.cuda.Stream()
        m, n = self.x_MK.shape[0], self.weight.shape[0]
        self.y_MN = torch.empty((m, n), dtype=self.x_MK.dtype, device=self.x_MK.device)
        self.counters = torch.zeros(self.num, dtype=torch.int32, device=self.x_MK.device)
        zeroed = torch.cuda.Event()
        zeroed.record(main)  # the side stream waits for the zeroed counters, never for the GEMM
        t3_gemm(self.x_MK, self.weight, self.rank, self.world, self.num, y_MN=self.y_MN, counters=self.counters)
        self._launched = True
        for t in (self.x_MK, self.weight, self.y_MN, self.counters):
            t.record_stream(side)
        side.wait_event(zeroed)
        with torch.cuda.stream(side):
            yield
        main.wait_stream(side)

    def compute(self, piece: int) -> torch.Tensor:
        """This rank's partial sum of output columns [piece·width, (piece+1)·width): [M, width]."""
        if self._launched:
            wait_piece(self.counters, piece, self.tiles)
        else:
            self.y_MN, self.counters = t3_gemm(self.x_MK, self.weight, self.rank, self.world, self.num,
                                               start=self.order.index(piece), count=1, y_MN=self.y_MN,
                                               counters=self.counters)
        cols = slice(piece * self.width, (piece + 1) * self.width)
        out = self.y_MN[:, cols].to(self.x_MK.dtype)
        return out if self.bias is None else out + self.bias[cols]

    def ready(self, piece: int) -> bool:
        """CPU: the piece's counter reads tiles_per_piece. CUDA: compute() queued the wait for it on the
        stream the send goes out on (reading the counter here would stall the host)."""
        return self._launched or (self.counters is not None and int(self.counters[piece]) == self.tiles)


def t3_gemm_reference(x_MK: torch.Tensor, weight: torch.Tensor, rank: int, world: int,
                      pieces: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Pure-PyTorch T3 producer: (y [M, N] with fp32 accumulation, every piece's final counter,
    the order rank makes the pieces in)."""
    _check(x_MK, weight, world, pieces)
    m, k = x_MK.shape
    y = torch.nn.functional.linear(x_MK.float(), weight.float()).to(x_MK.dtype)
    counters = torch.full((pieces,), tiles_per_piece(m, weight.shape[0], k, pieces, x_MK.element_size()),
                          dtype=torch.int32)
    return y, counters, ring_piece_order(rank, world, pieces)

"""planc.kernels.t3_gemm: pieces in the ring's order, a counter per piece, values as the reference."""
from __future__ import annotations

import planc  # noqa: F401  (selects TRITON_INTERPRET=1 without CUDA, before any kernel is decorated)

import pytest
import torch

from planc.kernels.t3_gemm import Pieces, t3_gemm, t3_gemm_reference, tiles_per_piece
from planc.ring import ring_piece_order


def _inputs(m: int, n: int, k: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=gen).to(dtype), (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)


# (M, N, K, ranks, pieces): several M tiles (M > 64), pieces narrower than a block (N/P = 24 -> 32-wide
# masked tiles), several N tiles per piece (N/P = 160 -> 3 tiles of 64), one piece per rank and several.
SHAPES = [(70, 96, 40, 2, 4), (5, 96, 33, 4, 4), (3, 480, 16, 3, 3), (65, 192, 24, 2, 8)]


@pytest.mark.parametrize("m, n, k, world, pieces", SHAPES)
def test_one_launch_makes_every_piece_in_ring_order_and_counts_its_tiles(m, n, k, world, pieces):
    x, w = _inputs(m, n, k)
    tiles = tiles_per_piece(m, n, k, pieces, x.element_size())
    for rank in range(world):
        trace = torch.full((pieces * tiles,), -1, dtype=torch.int32)
        y, counters = t3_gemm(x, w, rank, world, pieces, trace=trace)
        want_y, want_counters, order = t3_gemm_reference(x, w, rank, world, pieces)
        # fp32, K <= 40 terms summed in tiles of 16-64: ~1e-7 relative to the reference's order.
        torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-6)
        assert torch.equal(counters, want_counters) and int(counters[0]) == tiles
        # programs run in pid order under the interpreter: launch position p made piece order[p // tiles]
        assert trace.tolist() == [piece for piece in order for _ in range(tiles)]
        k_per = pieces // world
        assert order[:k_per] == [((rank + 1) % world) * k_per + j for j in range(k_per)]  # chunk d+1 first
        assert order[-k_per:] == [rank * k_per + j for j in range(k_per)]  # its own chunk last


def test_piece_at_a_time_launches_complete_counters_in_order():
    m, n, k, world, pieces = 70, 96, 40, 3, 6
    x, w = _inputs(m, n, k, seed=1)
    tiles = tiles_per_piece(m, n, k, pieces, x.element_size())
    y = counters = None
    order = ring_piece_order(1, world, pieces)
    for position, piece in enumerate(order):
        y, counters = t3_gemm(x, w, 1, world, pieces, start=position, count=1, y_MN=y, counters=counters)
        done = set(order[:position + 1])
        assert [int(c) for c in counters] == [tiles if p in done else 0 for p in range(pieces)]
    torch.testing.assert_close(y, t3_gemm_reference(x, w, 1, world, pieces)[0], rtol=1e-5, atol=1e-6)


def test_pieces_driver_gives_each_partial_sum_with_bias():
    x, w = _inputs(9, 64, 24, seed=2)
    b = torch.randn(64)
    made = Pieces(x, w, b, rank=0, world=2, pieces=4)
    for piece in made.order:
        assert not made.ready(piece)
        out = made.compute(piece)
        assert made.ready(piece)
        cols = slice(piece * 16, (piece + 1) * 16)
        torch.testing.assert_close(out, x @ w[cols].T + b[cols], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_rounds_once(dtype):
    x, w = _inputs(17, 64, 48, dtype, seed=3)
    y, _ = t3_gemm(x, w, 0, 2, 2)
    # fp32 accumulation, one rounding to the dtype: within one ulp of the reference's rounding.
    torch.testing.assert_close(y.to(dtype), t3_gemm_reference(x, w, 0, 2, 2)[0], rtol=1e-2, atol=1e-2)


def test_pieces_that_do_not_divide_are_refused():
    x, w = _inputs(4, 96, 8)
    with pytest.raises(ValueError, match="5 pieces must be a multiple of the 2 ranks and divide the 96"):
        t3_gemm(x, w, 0, 2, 5)
    with pytest.raises(ValueError, match="7 pieces must be a multiple of the 7 ranks and divide the 96"):
        t3_gemm(x, w, 0, 7, 7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the one-launch schedule with a side stream")
@pytest.mark.parametrize("dtype, n", [(torch.float32, 512), (torch.bfloat16, 2048)])  # bf16: 128 x 128 tiles, 2 a piece
def test_cuda_side_stream_sees_each_piece_complete(dtype, n):
    x, w = (t.cuda() for t in _inputs(300, n, 256, dtype, seed=4))
    made = Pieces(x, w, None, rank=1, world=4, pieces=8)
    with made.running():
        outs = {piece: made.compute(piece).clone() for piece in made.order}
    torch.cuda.synchronize()
    want, width = x.float() @ w.float().T, n // 8
    rtol, atol = (1e-3, 1e-3) if dtype == torch.float32 else (2**-7, 1e-2)
    for piece, out in outs.items():
        torch.testing.assert_close(out.float(), want[:, piece * width:(piece + 1) * width], rtol=rtol, atol=atol)
    assert made.counters.tolist() == [made.tiles] * 8

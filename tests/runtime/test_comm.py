"""Comm: byte formulas, the single-process identity, and every collective on real gloo ranks."""
from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from planc.runtime.comm import (
    Comm,
    all_to_all_bytes,
    broadcast_bytes,
    ring_all_gather_bytes,
    ring_all_reduce_bytes,
    ring_reduce_scatter_bytes,
)
from planc.runtime.launch import launch
from tests.runtime.workers import a2a_rows, varlen_rows

F32, I64, BF16 = 4, 8, 2
ROW = 3 * F32  # the workers' rows are 3 float32 columns


def test_formulas_on_known_values() -> None:
    assert ring_all_reduce_bytes(1000, 4) == 1500
    assert ring_all_reduce_bytes(10, 3) == 13  # 40/3 rounded down
    assert ring_reduce_scatter_bytes(1000, 4) == 750
    assert ring_all_gather_bytes(10, 3) == 6
    assert broadcast_bytes(1000, 4) == 750
    assert all_to_all_bytes([3, 0, 2], rank=0, row_bytes=12) == 24
    assert all_to_all_bytes([3, 0, 2], rank=1, row_bytes=12) == 60
    for formula in (ring_all_reduce_bytes, ring_reduce_scatter_bytes, ring_all_gather_bytes, broadcast_bytes):
        assert formula(1000, 1) == 0  # one rank moves nothing


@given(S=st.integers(0, 2**62), n=st.integers(1, 4096))
def test_formulas_are_exact_floors(S: int, n: int) -> None:
    # Sizes past 2**53 catch any float arithmetic; all-reduce = reduce-scatter + all-gather.
    ar, rs, ag = ring_all_reduce_bytes(S, n), ring_reduce_scatter_bytes(S, n), ring_all_gather_bytes(S, n)
    assert ar * n <= 2 * (n - 1) * S < (ar + 1) * n
    assert rs * n <= (n - 1) * S < (rs + 1) * n
    assert rs == ag == broadcast_bytes(S, n)
    assert 2 * rs <= ar <= 2 * rs + 1


def test_single_is_identity_and_records_nothing() -> None:
    comm = Comm.single()
    x = torch.arange(6.0).reshape(3, 2)
    assert (comm.rank, comm.world_size) == (0, 1)
    assert comm.all_reduce(x) is x and comm.broadcast(x) is x
    copies = (comm.reduce_scatter(x, dim=1), comm.all_gather(x), comm.all_gather_varlen(x, [3]), comm.all_to_all(x, [3], [3]))
    for out in copies:
        assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
    with comm.phase("decode"):
        comm.barrier()
    assert comm.stats() == {}


def test_mismatched_splits_and_sizes_raise() -> None:
    comm, x = Comm.single(), torch.zeros(3, 2)
    with pytest.raises(ValueError, match="send_splits=\\[2\\]"):
        comm.all_to_all(x, [2], [2])
    with pytest.raises(ValueError, match="sizes=\\[4\\]"):
        comm.all_gather_varlen(x, [4])


def test_comm_without_process_group_points_to_single() -> None:
    with pytest.raises(RuntimeError, match="Comm.single"):
        Comm()


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def gloo_run(request: pytest.FixtureRequest) -> tuple[int, list[dict[str, Any]]]:
    nproc = request.param
    results = launch("tests.runtime.workers:comm_checks", {}, nproc, timeout_s=120)
    assert results is not None and len(results) == nproc
    return nproc, results


def test_collective_values(gloo_run: tuple[int, list[dict[str, Any]]]) -> None:
    nproc, results = gloo_run
    for rank, res in enumerate(results):
        assert (res["rank"], res["world_size"]) == (rank, nproc)
        for name, check in res["checks"].items():
            got_shape, want_shape = check["shape"]
            assert got_shape == want_shape, (rank, name)
            assert check["dtype"][0] == check["dtype"][1], (rank, name)
            # Exact: small integers in every dtype used, and sums of at most 4 of them.
            assert check["got"] == check["want"], (rank, name)
    assert results[0]["checks"]["all_to_all_empty"]["shape"][0] == [0, 3]


def _expected_stats(rank: int, n: int) -> dict[str, dict[str, tuple[int, int]]]:
    """(calls, logical bytes) per phase and op for one rank of workers.comm_checks."""
    send = [a2a_rows(rank, j) for j in range(n)]
    one_sided = [1] * n if rank == 0 else [0] * n
    varlen_total = sum(varlen_rows(j) for j in range(n))
    prefill = {
        "all_reduce": (1, ring_all_reduce_bytes(4 * ROW, n)),
        "reduce_scatter": (2, ring_reduce_scatter_bytes(2 * n * ROW, n) + ring_reduce_scatter_bytes(2 * 2 * n * F32, n)),
        "all_gather": (2, 2 * ring_all_gather_bytes(n * 2 * ROW, n)),
        "all_gather_varlen": (1, ring_all_gather_bytes(varlen_total * ROW, n)),
        "all_to_all": (3, all_to_all_bytes(send, rank, ROW) + all_to_all_bytes(one_sided, rank, ROW)),
        "broadcast": (1, broadcast_bytes(5 * F32, n)),
        "barrier": (1, 0),
    }
    decode = {
        "all_reduce": (1, ring_all_reduce_bytes(5 * I64, n)),
        "all_gather": (1, ring_all_gather_bytes(n * 2 * 3 * BF16, n)),
    }
    return {"prefill": prefill, "decode": decode}


def test_recorded_calls_and_bytes(gloo_run: tuple[int, list[dict[str, Any]]]) -> None:
    nproc, results = gloo_run
    for rank, res in enumerate(results):
        stats = res["stats"]
        recorded = {p: {op: (c["calls"], c["bytes"]) for op, c in ops.items()} for p, ops in stats.items()}
        assert recorded == _expected_stats(rank, nproc), rank
        assert all(c["seconds"] >= 0.0 for ops in stats.values() for c in ops.values())
    # Nonzero traffic on every rank: the checks above cannot pass with everything recorded as 0.
    assert results[0]["stats"]["prefill"]["all_reduce"]["bytes"] > 0


def test_single_async_forms_are_done_and_point_to_point_has_no_peer() -> None:
    comm, x = Comm.single(), torch.arange(4.0)
    assert comm.all_reduce_async(x).wait() is x
    assert torch.equal(comm.reduce_scatter_async(x).wait(), x) and torch.equal(comm.all_gather_async(x).wait(), x)
    with pytest.raises(ValueError, match="cannot exchange with rank 0"):
        comm.send(x, 0)
    with pytest.raises(ValueError, match="cannot exchange with rank 1"):
        comm.irecv(x, 1)
    assert comm.stats() == {}


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def gloo_async_run(request: pytest.FixtureRequest) -> tuple[int, list[dict[str, Any]]]:
    results = launch("tests.runtime.workers:comm_async_checks", {}, request.param, timeout_s=120)
    assert results is not None and len(results) == request.param
    return request.param, results


def test_async_and_point_to_point_values(gloo_async_run: tuple[int, list[dict[str, Any]]]) -> None:
    _, results = gloo_async_run
    for rank, res in enumerate(results):
        assert len(res["checks"]) == 10, rank
        for name, check in res["checks"].items():
            assert check["shape"][0] == check["shape"][1] and check["got"] == check["want"], (rank, name)


def test_async_forms_count_as_the_blocking_ones(gloo_async_run: tuple[int, list[dict[str, Any]]]) -> None:
    n, results = gloo_async_run
    want = {
        "all_reduce": (2, ring_all_reduce_bytes(4 * ROW, n) + ring_all_reduce_bytes(ROW, n)),
        "reduce_scatter": (1, ring_reduce_scatter_bytes(2 * n * ROW, n)),
        "all_gather": (1, ring_all_gather_bytes(n * 2 * ROW, n)),
        "send": (1, 2 * ROW),  # point to point: the message, once
        "recv": (1, 2 * ROW),
    }
    for rank, res in enumerate(results):
        for phase in ("sync", "async"):
            ops = res["stats"][phase]
            assert {op: (c["calls"], c["bytes"]) for op, c in ops.items()} == want, (rank, phase)
            assert all(c["seconds"] > 0.0 for c in ops.values()), (rank, phase)

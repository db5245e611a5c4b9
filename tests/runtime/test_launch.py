"""launch(): real spawned gloo ranks on 127.0.0.1; results, output, failures and the timeout."""
from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest
import torch

from planc.errors import RunError
from planc.runtime.launch import _read_results, launch, write_result


def test_results_args_and_rank0_output(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    handler_before = signal.getsignal(signal.SIGINT)
    args = {"word": "hello", "nested": [1, 2]}
    (tmp_path / "rank2.json").write_text('"stale"')  # from an "earlier run": must not come back
    results = launch("tests.runtime.workers:echo", args, 3, timeout_s=90, backend="gloo", result_dir=tmp_path)
    assert results == [
        {"rank": 0, "args": args, "gloo_ifname": "lo"},
        {"rank": 1, "args": args, "gloo_ifname": "lo"},
        None,  # the last rank writes nothing
    ]
    out = capfd.readouterr().out
    assert "echo from rank 0: hello" in out
    assert "echo from rank 1" not in out and "echo from rank 2" not in out
    assert signal.getsignal(signal.SIGINT) is handler_before  # the agent's handlers were undone


def test_first_failing_rank_is_reported_promptly() -> None:
    start = time.monotonic()
    with pytest.raises(RunError) as info:
        launch("tests.runtime.workers:raise_on_rank", {"rank": 1, "message": "boom at step 3"}, 2, timeout_s=60)
    elapsed = time.monotonic() - start
    assert elapsed < 60, elapsed
    assert re.fullmatch(r"rank 1 raised before its first step, before its first collective: ValueError: boom at "
                        r"step 3 \(tests/runtime/workers.py:\d+ in raise_on_rank <- planc/runtime/launch.py:\d+ in "
                        r"_worker\) \(tests.runtime.workers:raise_on_rank on 2 ranks; every rank was stopped\)",
                        str(info.value)), str(info.value)


def test_a_stalled_rank_is_named_after_the_collective_timeout() -> None:
    start = time.monotonic()
    with pytest.raises(RunError) as info:
        launch("tests.runtime.workers:sleep_on_rank", {"rank": 1, "seconds": 300}, 2, timeout_s=60,
               collective_timeout_s=3)
    elapsed = time.monotonic() - start
    assert 3 <= elapsed < 30, elapsed  # the timeout, ~1 s of stopping, the ranks' start on a busy machine
    assert str(info.value).startswith(
        "rank 1 stalled before its first step, before its first collective: rank 0 waited in barrier #1 until the "
        "collective timeout (3 s) and rank 1 never joined it"), str(info.value)


@pytest.mark.parametrize("nproc", [0, -1])
def test_nproc_below_one_is_an_error(nproc: int) -> None:
    with pytest.raises(RunError, match=f"nproc={nproc}: the number of ranks per machine must be a whole number >= 1"):
        launch("tests.runtime.workers:echo", [], nproc, timeout_s=5)


def test_timeout_stops_every_rank() -> None:
    start = time.monotonic()
    with pytest.raises(RunError, match=r"exceeded timeout_s=8 s \(rank 0 before its first step, blocked in barrier "
                                       r"#1 for [\d.]+ s; rank 1 before its first step, before its first collective\)"):
        launch("tests.runtime.workers:sleep_on_rank", {"rank": 1, "seconds": 300}, 2, timeout_s=8)
    assert time.monotonic() - start < 40


@pytest.mark.parametrize(
    ("entry", "fix"),
    [("tests.runtime.workers", "package.module:function"), ("no_such_pkg.mod:main", "not importable")],
)
def test_bad_entry_is_rejected_before_starting(entry: str, fix: str) -> None:
    with pytest.raises(RunError, match=fix):
        launch(entry, [], 2, timeout_s=5)


def test_bad_rdzv_and_backend_are_rejected() -> None:
    with pytest.raises(RunError, match="unknown keys \\['master_port'\\]"):
        launch("tests.runtime.workers:echo", [], 2, timeout_s=5, rdzv={"master_port": 1})
    with pytest.raises(RunError, match="nnodes=2 needs rdzv_endpoint"):
        launch("tests.runtime.workers:echo", [], 2, timeout_s=5, rdzv={"nnodes": 2})
    with pytest.raises(RunError, match="backend='mpi'"):
        launch("tests.runtime.workers:echo", [], 2, timeout_s=5, backend="mpi")


def test_no_result_files_give_none(tmp_path: Path) -> None:
    assert _read_results(tmp_path, 2) is None


def test_write_result_outside_a_worker_explains() -> None:
    with pytest.raises(RuntimeError, match="only inside a worker"):
        write_result({"x": 1})


def test_more_local_ranks_than_gpus_under_nccl_are_refused_before_any_starts(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RunError, match=r"2 ranks on this machine under NCCL need 2 GPUs, one each, and 1 is visible; "
                                       r"run fewer ranks per machine .* recompile with mesh.backend: gloo"):
        launch("tests.runtime.workers:raise_on_rank", {"rank": 1, "message": "never"}, 2, timeout_s=60,
               backend="nccl")

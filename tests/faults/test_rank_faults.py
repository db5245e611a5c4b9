"""A killed, stalled or raising rank, or ranks running different programs, end `planc run` and
`planc verify` with status 2 and one line (no traceback) naming the rank and its step or
collective, within the bound planc.runtime.launch states, and leave no process behind.

Bounds: a rank that dies or raises ends the run about a second later (the watchdog stops the other
ranks 0.5 s after the first failure); a stalled rank, after the collective timeout plus about as
much. FAULT_S allows for a loaded 2-core machine.
"""
from __future__ import annotations

import os
import re
import signal
import socket

import pytest

from tests.faults.harness import PLANC, RAISING_PLANC, one_line, start, survivors
from tests.faults.workers import FAULT_ENV

FAULT_S = 10.0  # seconds from a fault to planc's exit, stated ~1-2 s
DECODING = ["--max-new-tokens", "1000"]  # still decoding when the fault arrives


@pytest.fixture(scope="module")
def artifact(compiled):
    return compiled("deepseek_mla_tp_ep.yaml", 2)


def test_killed_rank(artifact, tmp_path):
    job = start(PLANC, ["run", str(artifact), *DECODING], tmp_path)
    record = job.wait_for_step(rank=1)
    job.fault()
    os.kill(record["pid"], signal.SIGKILL)
    code, err, seconds = job.finish()
    line = one_line(err)
    assert code == 2 and seconds < FAULT_S, (code, seconds, line)
    assert re.search(r"rank 1 was killed by SIGKILL in decode step \d+ of target", line), line
    assert not survivors(job.tree)


def test_stalled_rank(artifact, tmp_path):
    job = start(PLANC, ["run", str(artifact), *DECODING, "--collective-timeout", "5"], tmp_path)
    record = job.wait_for_step(rank=1)
    job.fault()
    os.kill(record["pid"], signal.SIGSTOP)
    code, err, seconds = job.finish()
    line = one_line(err)
    assert code == 2 and 5 <= seconds < 5 + FAULT_S, (code, seconds, line)
    assert re.search(r"rank 1 stalled in decode step \d+ of target, (after|blocked in) \w+ #\d+", line), line
    assert "stopped (SIGSTOP)" in line
    assert re.search(r"rank 0 gave up waiting in \w+ #\d+: RuntimeError: Timed out", line), line
    assert not survivors(job.tree)


@pytest.mark.parametrize("command", ["run", "verify"])
def test_raising_rank(artifact, tmp_path, command):
    trigger = tmp_path / "raise-now"
    tokens = DECODING if command == "run" else ["--max-new-tokens", "40"]  # verify's reference decodes them first
    job = start(RAISING_PLANC, [command, str(artifact), *tokens], tmp_path, **{FAULT_ENV: f"1:{trigger}"})
    job.wait_for_step(rank=1)
    job.fault()
    trigger.touch()
    code, err, seconds = job.finish()
    line = one_line(err)
    assert code == 2 and seconds < FAULT_S, (code, seconds, line)
    assert re.search(rf"planc {command}: error: rank 1 raised in decode step (\d+) of target, after \w+ #\d+: "
                     r"ValueError: injected fault in step \1 \(tests/faults/workers.py:\d+ in faulty", line), line
    assert not survivors(job.tree)


def test_ranks_running_different_programs(compiled, tmp_path):
    """Two machines (two launchers on one host, one rank each) given different artifacts: every rank
    refuses before its first step, naming what differs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    artifacts = [compiled("deepseek_mla_tp_ep.yaml", 2), compiled("draft_tp.yaml", 2)]
    jobs = [start(PLANC, ["run", str(art), "--nproc", "1", "--nnodes", "2", "--node-rank", str(node),
                          "--rdzv-endpoint", f"127.0.0.1:{port}", "--max-new-tokens", "4"], tmp_path)
            for node, art in enumerate(artifacts)]
    for node, job in enumerate(jobs):
        code, err, seconds = job.finish()
        line = one_line(err)
        assert code == 2 and seconds < 60, (code, seconds, line)
        assert re.search(rf"rank {node} raised before its first step, after all_gather #1: RunError: "
                         r"the ranks disagree on the compiled program \(manifest sha256\): rank 0: \w{12}; "
                         rf"rank 1: \w{{12}}\. Rank {node} loaded {re.escape(str(artifacts[node]))}", line), line
        assert not survivors(job.tree)

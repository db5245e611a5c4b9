"""Ctrl-C and SIGTERM end `planc run` with one line and exit status 130 / 143 within a couple of
seconds (the agent stops the ranks with SIGTERM, then SIGKILL after 2 s), leaving no process."""
from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from tests.faults.harness import PLANC, one_line, start, survivors

STOP_S = 10.0  # seconds from the signal to the exit, stated ~1-2 s; slack for a loaded machine


@pytest.fixture(scope="module")
def artifact(compiled):
    return compiled("deepseek_mla_tp_ep.yaml", 2)


@pytest.mark.parametrize("signum, to_group", [(signal.SIGINT, True), (signal.SIGTERM, False)], ids=["ctrl-c", "sigterm"])
def test_signal_while_decoding(artifact, tmp_path, signum, to_group):
    """SIGINT as a terminal's Ctrl-C sends it (to the launcher and every rank), SIGTERM as `kill` does
    (to the launcher alone)."""
    job = start(PLANC, ["run", str(artifact), "--max-new-tokens", "1000"], tmp_path)
    job.wait_for_step(rank=1)
    job.fault()
    (os.killpg if to_group else os.kill)(job.proc.pid, signum)
    code, err, seconds = job.finish()
    line = one_line(err)
    assert code == 128 + signum and seconds < STOP_S, (code, seconds, line)
    assert line.startswith(f"planc run: interrupted by {signal.Signals(signum).name}; stopped"), line
    assert not survivors(job.tree)


def test_sigterm_while_waiting_for_another_machine(artifact, tmp_path):
    """Node 0 of 2 blocks in the rendezvous (C++, where Python's handler cannot run) for a node that
    never comes: SIGTERM still ends it, with the same line, after cli.STUCK_S."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    job = start(PLANC, ["run", str(artifact), "--nproc", "1", "--nnodes", "2", "--node-rank", "0",
                        "--rdzv-endpoint", f"127.0.0.1:{port}"], tmp_path)
    _wait_listening(port, job)
    job.fault()
    os.kill(job.proc.pid, signal.SIGTERM)
    code, err, seconds = job.finish()
    line = one_line(err)
    assert code == 143 and seconds < STOP_S, (code, seconds, line)
    assert line.startswith("planc run: interrupted by SIGTERM; stopped"), line
    assert not survivors(job.tree)


def _wait_listening(port: int, job, timeout_s: float = 60) -> None:
    """Until planc's rendezvous store accepts connections on port (then it waits for node 1)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and job.proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port} after {timeout_s} s (planc status {job.proc.poll()})")

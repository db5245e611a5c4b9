"""`torchrun --nproc-per-node 2 -m planc run ART` is one job of two ranks, not two jobs of two."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

from tests.conftest import ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_runs_one_job_whose_ranks_are_planc_ranks(compiled):
    artifact = compiled("deepseek_mla_tp_ep.yaml", 2)
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(_free_port()), "-m", "planc", "run", str(artifact), "--max-new-tokens", "4"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # One output (rank 0 speaks for the job), naming a job of 2 ranks and each rank's own figures.
    assert sum(line.startswith("--- 2 ranks") for line in lines) == 1, done.stdout
    assert sum(line.startswith("--- prompt:") for line in lines) == 3, done.stdout
    assert [line.split(":")[0].strip() for line in lines if line.strip().startswith("rank ")] == ["rank 0", "rank 1"]

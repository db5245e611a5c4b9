"""Drive `planc run` / `planc verify` in a subprocess, fault one of its ranks, and check what is left.

The subprocess gets TMPDIR=tmp so the launcher's run directory, and in it every rank's status
record (planc.runtime.status), lands where the test can read it: that is how a test waits until
rank r is in decode step s and learns its pid. Processes are read from /proc (Linux), so no
dependency is needed to find every descendant and check that none survives.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from planc.runtime.status import read_status
from tests.conftest import ROOT

PLANC = (sys.executable, "-m", "planc.cli")
# `planc run` / `planc verify` exactly, except that every rank runs tests.faults.workers:raise_in_decode.
RAISING_PLANC = (sys.executable, "-c", "import sys, planc.run, planc.verify; "
                 "planc.run.WORKER = planc.verify.WORKER = 'tests.faults.workers:raise_in_decode'; "
                 "from planc.cli import main; sys.exit(main(sys.argv[1:]))")


@dataclass
class Job:
    proc: subprocess.Popen
    tmp: Path
    tree: dict[int, str] = field(default_factory=dict)  # pid -> start time of every process seen under it
    fault_at: float = field(default_factory=time.monotonic)

    def status(self, rank: int) -> dict | None:
        paths = list(self.tmp.glob(f"planc-run-*/status/rank{rank}"))
        return read_status(paths[0]) if paths else None

    def wait_for_step(self, rank: int, step: int | None = 3, timeout_s: float = 90) -> dict:
        """rank's status once it is in decode step >= step (step None: once it has one); records the
        process tree at that point."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            record = self.status(rank)
            if record and (step is None or record["phase"] == "decode" and record["step"] >= step):
                self.tree = descendants(self.proc.pid)
                return record
            if self.proc.poll() is not None:
                raise AssertionError(f"planc ended (status {self.proc.returncode}) before rank {rank} reached "
                                     f"decode step {step}: {self.proc.stderr.read()}")
            time.sleep(0.02)
        raise AssertionError(f"rank {rank} did not reach decode step {step} in {timeout_s} s")

    def finish(self, timeout_s: float = 120) -> tuple[int, str, float]:
        """(exit status, stderr, seconds from the fault to the exit); adds every process seen below
        planc until it exits to the tree."""
        end = time.monotonic() + timeout_s
        while self.proc.poll() is None:
            self.tree |= descendants(self.proc.pid)
            if time.monotonic() > end:
                for pid in survivors(self.tree, wait_s=0):
                    os.kill(pid, 9)
                raise AssertionError(f"planc still running {timeout_s} s after the fault")
            time.sleep(0.05)
        seconds = time.monotonic() - self.fault_at
        return self.proc.returncode, self.proc.stderr.read(), seconds

    def fault(self) -> None:
        """Mark now as the moment of the fault (the test injects it next)."""
        self.fault_at = time.monotonic()


def start(command: tuple[str, ...], args: list[str], tmp: Path, **env: str) -> Job:
    proc = subprocess.Popen([*command, *args], cwd=ROOT, env={**os.environ, "TMPDIR": str(tmp), **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    return Job(proc, tmp)


def _stat(pid: int) -> tuple[str, int, str] | None:
    """(state, ppid, start time) from /proc/PID/stat; None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[1]), fields[19]


def descendants(root: int) -> dict[int, str]:
    """pid -> start time of root and every process below it."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            parents[int(entry.name)] = (stat[1], stat[2])
    found, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        if pid in parents:
            found[pid] = parents[pid][1]
        frontier += [child for child, (ppid, _) in parents.items() if ppid == pid and child not in found]
    return found


def survivors(tree: dict[int, str], wait_s: float = 5.0) -> list[int]:
    """Processes of `tree` still alive (not a zombie, same start time) after up to wait_s seconds."""
    end = time.monotonic() + wait_s
    while True:
        alive = [pid for pid, started in tree.items()
                 if (stat := _stat(pid)) is not None and stat[0] != "Z" and stat[2] == started]
        if not alive or time.monotonic() >= end:
            return alive
        time.sleep(0.1)


def one_line(stderr: str) -> str:
    """stderr holds exactly one line and no traceback; returns it."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]

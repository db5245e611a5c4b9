"""Failures of launched ranks: watched while they run, explained once they are over.

The Watchdog runs in the launching process beside torch's elastic agent. It polls every local rank
(waitid with WNOWAIT sees an exit or a stop without reaping, so the agent still can) and the notes
ranks write when they raise. GRACE_S after the first failure it SIGKILLs every rank still alive: a
stopped rank ignores the agent's SIGTERM until it is continued, and the agent would wait 30 s for it.

explain() turns what the ranks left behind (notes, status records, see planc.runtime.status) and
what the watchdog saw into one message naming the rank at fault and its step and collective:
  1. a rank raised outside a collective (an error of its own)       -> the earliest such rank
  2. a rank exited without raising (SIGKILL, a crash, os._exit)      -> the earliest such rank
  3. a rank is stopped (SIGSTOP)                                     -> that rank
  4. ranks raised inside a collective (timed out, a peer went away)  -> the ranks that never joined
     that collective: they stalled
  5. otherwise the earliest note, or the agent's own report.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planc.runtime.status import read_status, where

GRACE_S = 0.5  # ranks failing together (all of them, on mismatched programs) write their notes first
INTERVAL_S = 0.05


@dataclass(frozen=True)
class Exit:
    at: float
    code: int | None  # exit status; None when killed by a signal or already reaped (unknown)
    signal: int | None = None

    @property
    def failed(self) -> bool:
        return self.code != 0

    def words(self) -> str:
        if self.signal is not None:
            try:
                return f"was killed by {signal.Signals(self.signal).name}"
            except ValueError:
                return f"was killed by signal {self.signal}"
        if self.code is None:
            return "exited without raising (status unknown)"
        return f"exited with status {self.code} without raising"


class Watchdog:
    """Watches the ranks whose status records appear in status_dir; see the module docstring."""

    def __init__(self, status_dir: Path, failure_dir: Path, *, grace_s: float = GRACE_S):
        self.status_dir, self.failure_dir, self.grace_s = Path(status_dir), Path(failure_dir), grace_s
        self.exits: dict[int, Exit] = {}
        self.stopped: dict[int, float] = {}  # rank -> when first seen stopped
        self.failed_at: float | None = None
        self.killed_at: float | None = None
        self._pids: dict[int, int] = {}
        self._lock = threading.RLock()  # poll() runs on the thread and in the SIGCHLD handler
        self._sigchld: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="planc-watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        # A rank's exit is read the moment it happens: the agent reaps every rank when it stops the
        # job, and a rank it reaps before a poll sees it leaves its signal unknown (a killed rank and
        # a peer failing in the collective they shared end within one poll interval of each other).
        if threading.current_thread() is threading.main_thread():
            self._sigchld = signal.signal(signal.SIGCHLD, lambda signum, frame: self.poll())
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._sigchld is not None:
            signal.signal(signal.SIGCHLD, self._sigchld)
        self.poll()
        for pid in self.kill_alive():  # nothing outlives the launch; the agent is done with them
            _reap(pid)

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            self.poll()

    def poll(self) -> None:
        with self._lock:
            self._poll()

    def _poll(self) -> None:
        now = time.time()
        for rank, pid in self._known_pids().items():
            if rank in self.exits:
                continue
            state = _child_state(pid)
            if state == "stopped":
                self.stopped.setdefault(rank, now)
            elif state is None:
                if self.killed_at is None:  # continued (after planc's SIGKILL it runs briefly to die)
                    self.stopped.pop(rank, None)
            elif state == "gone":  # already reaped by the agent: only a rank that finished says so
                finished = (read_status(self._status_path(rank)) or {}).get("state") == "done"
                self.exits[rank] = Exit(now, 0 if finished else None)
            else:
                self.exits[rank] = Exit(now, *state)
        if self.failed_at is None and (self.notes_exist() or any(e.failed for e in self.exits.values())):
            self.failed_at = now
        if self.failed_at is not None and self.killed_at is None and now - self.failed_at >= self.grace_s:
            self.kill_alive()
            self.killed_at = now

    def kill_alive(self) -> list[int]:
        """SIGKILL every rank still running or stopped; returns their pids."""
        killed = []
        for rank, pid in self._known_pids().items():
            if rank not in self.exits and _child_state(pid) in (None, "stopped"):
                with contextlib.suppress(ProcessLookupError):  # reaped by the agent just now
                    os.kill(pid, signal.SIGKILL)  # an unreaped child of ours: the pid cannot have been reused
                killed.append(pid)
        return killed

    def notes_exist(self) -> bool:
        return any(self.failure_dir.glob("rank*.json"))

    def _status_path(self, rank: int) -> Path:
        return self.status_dir / f"rank{rank}"

    def _known_pids(self) -> dict[int, int]:
        for path in self.status_dir.glob("rank*"):
            rank = int(path.name.removeprefix("rank"))
            if rank not in self._pids and (record := read_status(path)) is not None:
                self._pids[rank] = record["pid"]
        return dict(self._pids)


def _child_state(pid: int) -> None | str | tuple[int | None, int | None]:
    """None while running, "stopped", "gone" once reaped (or not our child), else (code, signal)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WSTOPPED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return "gone"
    if info is None:
        return None
    if info.si_code in (os.CLD_STOPPED, os.CLD_TRAPPED):
        return "stopped"
    return (info.si_status, None) if info.si_code == os.CLD_EXITED else (None, info.si_status)


def _reap(pid: int, timeout_s: float = 2.0) -> None:
    """Collect a killed child's exit; give up after timeout_s (one stuck in the kernel cannot die)."""
    end = time.monotonic() + timeout_s
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(pid, os.WNOHANG) == (0, 0) and time.monotonic() < end:
            time.sleep(0.01)


# -- explaining a failure ----------------------------------------------------------------------


def read_notes(failure_dir: Path) -> dict[int, dict[str, Any]]:
    return {int(p.stem.removeprefix("rank")): json.loads(p.read_text()) for p in Path(failure_dir).glob("rank*.json")}


def read_statuses(status_dir: Path) -> dict[int, dict[str, Any] | None]:
    return {int(p.name.removeprefix("rank")): read_status(p) for p in Path(status_dir).glob("rank*")}


def explain(notes: dict[int, dict], statuses: dict[int, dict | None], watchdog: Watchdog,
            agent_exits: dict[int, Exit], collective_timeout_s: float) -> str:
    """One message: the rank at fault, what happened to it and where (rules in the module docstring);
    "" when nothing was left to tell."""
    exits = dict(agent_exits)
    exits.update({r: e for r, e in watchdog.exits.items() if e.code is not None or e.signal is not None or r not in exits})

    def at(rank: int, now: float | None = None) -> str:
        return where(statuses.get(rank), now=now)

    own = [r for r in notes if not notes[r]["blocked"]]
    if own:
        rank = min(own, key=lambda r: notes[r]["time"])
        return f"rank {rank} raised {at(rank)}: {notes[rank]['error']} ({notes[rank]['frames']})"
    # Exits seen after the first failure are its consequences (the agent's SIGTERM, planc's SIGKILL).
    first = watchdog.failed_at if watchdog.failed_at is not None else float("inf")
    died = [r for r, e in exits.items() if e.failed and r not in notes and e.at <= first]
    if died:
        rank = min(died, key=lambda r: exits[r].at)
        return f"rank {rank} {exits[rank].words()} {at(rank, exits[rank].at)}"
    if watchdog.stopped:
        rank = min(watchdog.stopped, key=watchdog.stopped.__getitem__)
        return f"rank {rank} stalled {at(rank)}: its process is stopped (SIGSTOP){_waiters(notes, statuses)}"
    if notes:
        return _stalled(notes, statuses, collective_timeout_s) or _earliest(notes, statuses)
    return ""


def short_error(error: str) -> str:
    """gloo's errors start with the C++ source line that raised them: drop it."""
    return re.sub(r"\[[^\]]*\.(?:cc|cpp|h):\d+\] ", "", error)


def _waiters(notes: dict[int, dict], statuses: dict[int, dict | None]) -> str:
    blocked = sorted(r for r in notes if notes[r]["blocked"])
    if not blocked:
        return ""
    record = statuses.get(blocked[0]) or {}
    return (f"; rank{'s' * (len(blocked) > 1)} {', '.join(map(str, blocked))} gave up waiting in "
            f"{record.get('blocked', 'a collective')} #{record.get('blocked_seq', '?')}: "
            f"{short_error(notes[blocked[0]]['error'])}")


def _stalled(notes: dict[int, dict], statuses: dict[int, dict | None], collective_timeout_s: float) -> str | None:
    """Ranks that raised inside one collective, and the ranks that never joined it."""
    blocked_in = Counter(statuses[r]["blocked_seq"] for r in notes if statuses.get(r))
    if not blocked_in:
        return None
    seq = blocked_in.most_common(1)[0][0]
    waiting = sorted(r for r in notes if (statuses.get(r) or {}).get("blocked_seq") == seq)
    absent = sorted(r for r, s in statuses.items() if r not in notes and (s is None or s.get("blocked_seq") != seq))
    if not waiting or not absent:
        return None
    op = statuses[waiting[0]]["blocked"]
    return (f"rank {absent[0]} stalled {where(statuses[absent[0]])}: rank{'s' * (len(waiting) > 1)} "
            f"{', '.join(map(str, waiting))} waited in {op} #{seq} until the collective timeout "
            f"({collective_timeout_s:g} s) and rank {absent[0]} never joined it")


def _earliest(notes: dict[int, dict], statuses: dict[int, dict | None]) -> str:
    rank = min(notes, key=lambda r: notes[r]["time"])
    return (f"rank {rank} raised {where(statuses.get(rank), now=notes[rank]['time'])}: "
            f"{short_error(notes[rank]['error'])}")

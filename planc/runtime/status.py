"""Where a rank is: its step and its collective, kept where the launcher can read it after a failure.

A rank that is killed, stopped or stuck cannot say where it was, but its last writes can. Each
launched rank keeps one fixed-size JSON record in a memory-mapped file (an update is a store into
shared memory, no system call), rewritten when a step starts and when a collective starts, blocks
and ends:

    {"pid": 4242, "program": "target", "step": 5, "phase": "decode",
     "seq": 41, "op": "all_reduce",           # the latest collective started (#seq, counted from 1)
     "blocked": "all_reduce", "blocked_seq": 41, "since": 1700000000.5,   # "" when not waiting
     "state": "running"}                      # running | done | failed

Step 0 of a program is its prefill; step -1 means before the first step (loading, or an entry that
runs no model). Outside a launched rank (Comm.single, the thread simulation) nothing is recorded.
"""
from __future__ import annotations

import json
import mmap
import os
import time
from pathlib import Path
from typing import Any

RECORD_BYTES = 1024


class RankStatus:
    """This rank's record, rewritten in place on every change."""

    def __init__(self, path: Path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, RECORD_BYTES)
            self._map = mmap.mmap(fd, RECORD_BYTES)
        finally:
            os.close(fd)
        self._record: dict[str, Any] = {"pid": os.getpid(), "program": "", "step": -1, "phase": "", "seq": 0,
                                        "op": "", "blocked": "", "blocked_seq": 0, "since": 0.0, "state": "running"}
        self._write()

    def at_step(self, program: str, step: int, phase: str) -> None:
        self._record.update(program=program, step=step, phase=phase)
        self._write()

    def begin(self, op: str, phase: str, *, blocking: bool) -> int:
        """A collective starts (blocking: the caller waits for it now); returns its sequence number."""
        seq = self._record["seq"] + 1
        self._record.update(seq=seq, op=op, phase=phase)
        if blocking:
            self._record.update(blocked=op, blocked_seq=seq, since=time.time())
        self._write()
        return seq

    def waiting(self, op: str, seq: int) -> None:
        """The caller now waits for collective #seq, started earlier."""
        self._record.update(blocked=op, blocked_seq=seq, since=time.time())
        self._write()

    def end(self) -> None:
        self._record.update(blocked="", blocked_seq=0)
        self._write()

    def finish(self, state: str) -> None:
        self._record["state"] = state
        self._write()

    @property
    def blocked(self) -> bool:
        return bool(self._record["blocked"])

    def _write(self) -> None:
        text = json.dumps(self._record).encode()
        self._map[:] = text + b" " * (RECORD_BYTES - len(text))


class _NoStatus(RankStatus):
    """Outside a launched rank: every update is dropped."""

    def __init__(self) -> None:
        self._record = {"seq": 0, "blocked": ""}

    def _write(self) -> None:
        pass


_current: RankStatus = _NoStatus()


def install(path: Path) -> RankStatus:
    """Record this process's position in `path` from now on (called once per launched rank)."""
    global _current
    _current = RankStatus(path)
    return _current


def current() -> RankStatus:
    return _current


def read_status(path: Path) -> dict[str, Any] | None:
    """A rank's last record, or None when it wrote none (or the file holds no whole record)."""
    try:
        return json.loads(path.read_bytes().rstrip(b" \0") or b"null")
    except (OSError, ValueError):
        return None


def where(record: dict[str, Any] | None, now: float | None = None) -> str:
    """The record in words: 'in decode step 5 of target, blocked in all_reduce #41 for 5.0 s'."""
    if record is None:
        return "before it started"
    if record["step"] < 0:
        place = "before its first step"
    else:
        place = f"in {record['phase'] or 'step'} step {record['step']} of {record['program']}"
    if record["blocked"]:
        waited = (now or time.time()) - record["since"]
        return f"{place}, blocked in {record['blocked']} #{record['blocked_seq']} for {waited:.1f} s"
    if record["seq"]:
        return f"{place}, after {record['op']} #{record['seq']}"
    return f"{place}, before its first collective"

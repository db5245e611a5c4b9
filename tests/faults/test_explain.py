"""explain(): which rank a failure is blamed on, from hand-made notes, status records and exits."""
from __future__ import annotations

import signal

from planc.runtime.faults import Exit, Watchdog, explain, short_error


def _status(step=3, seq=40, op="all_reduce", blocked="", since=100.0) -> dict:
    return {"pid": 1, "program": "target", "step": step, "phase": "decode", "seq": seq, "op": op,
            "blocked": blocked, "blocked_seq": seq if blocked else 0, "since": since, "state": "running"}


def _note(time: float, blocked: bool, error="RuntimeError: [gloo/pair.cc:553] Connection closed by peer") -> dict:
    return {"time": time, "error": error, "blocked": blocked, "frames": "w.py:1 in f"}


def _watchdog(tmp_path, *, exits=None, stopped=None, failed_at=None) -> Watchdog:
    dog = Watchdog(tmp_path, tmp_path)
    dog.exits, dog.stopped, dog.failed_at = exits or {}, stopped or {}, failed_at
    return dog


def test_a_rank_raising_its_own_error_is_blamed_before_the_peers_it_broke(tmp_path):
    notes = {0: _note(10.2, blocked=True), 1: _note(10.0, blocked=False, error="ValueError: bad shape")}
    statuses = {0: _status(blocked="all_reduce", since=9.0), 1: _status(seq=39, op="all_to_all")}
    message = explain(notes, statuses, _watchdog(tmp_path, failed_at=10.0), {}, 30)
    assert message == "rank 1 raised in decode step 3 of target, after all_to_all #39: ValueError: bad shape (w.py:1 in f)"


def test_a_rank_that_died_first_is_blamed_not_the_ranks_stopped_after_it(tmp_path):
    exits = {2: Exit(10.0, None, signal.SIGKILL), 3: Exit(10.1, None, signal.SIGTERM)}  # 3: the agent's SIGTERM
    notes = {0: _note(10.05, blocked=True)}
    statuses = {r: _status(blocked="all_reduce") for r in range(4)}
    message = explain(notes, statuses, _watchdog(tmp_path, exits=exits, failed_at=10.0), {}, 30)
    assert message.startswith("rank 2 was killed by SIGKILL in decode step 3 of target, blocked in all_reduce #40")


def test_the_agent_s_exit_code_fills_in_an_exit_the_watchdog_saw_only_as_gone(tmp_path):
    exits = {1: Exit(10.0, None)}  # reaped by the agent before the watchdog looked
    message = explain({}, {1: _status()}, _watchdog(tmp_path, exits=exits, failed_at=10.0),
                      {1: Exit(10.0, None, signal.SIGSEGV)}, 30)
    assert message == "rank 1 was killed by SIGSEGV in decode step 3 of target, after all_reduce #40"


def test_a_stopped_rank_is_blamed_and_its_waiting_peers_said_why(tmp_path):
    notes = {0: _note(40.0, blocked=True, error="RuntimeError: [x/unbound_buffer.cc:78] Timed out waiting 30000ms")}
    statuses = {0: _status(seq=41, blocked="all_to_all", since=10.0), 1: _status()}
    message = explain(notes, statuses, _watchdog(tmp_path, stopped={1: 10.0}, failed_at=40.0), {}, 30)
    assert message == ("rank 1 stalled in decode step 3 of target, after all_reduce #40: its process is stopped "
                       "(SIGSTOP); rank 0 gave up waiting in all_to_all #41: RuntimeError: Timed out waiting 30000ms")


def test_a_rank_that_never_joined_the_collective_its_peers_timed_out_in_stalled(tmp_path):
    notes = {0: _note(40.0, blocked=True), 2: _note(40.1, blocked=True)}
    statuses = {0: _status(seq=41, blocked="all_to_all"), 1: _status(step=2, seq=33), 2: _status(seq=41, blocked="all_to_all")}
    message = explain(notes, statuses, _watchdog(tmp_path, failed_at=40.0), {}, 30)
    assert message == ("rank 1 stalled in decode step 2 of target, after all_reduce #33: ranks 0, 2 waited in "
                       "all_to_all #41 until the collective timeout (30 s) and rank 1 never joined it")


def test_without_a_culprit_the_earliest_note_is_reported(tmp_path):
    notes = {0: _note(40.0, blocked=True), 1: _note(39.0, blocked=True)}  # another machine's rank went away
    statuses = {0: _status(blocked="all_reduce", since=38.0), 1: _status(blocked="all_reduce", since=38.5)}
    message = explain(notes, statuses, _watchdog(tmp_path, failed_at=39.0), {}, 30)
    assert message == ("rank 1 raised in decode step 3 of target, blocked in all_reduce #40 for 0.5 s: "
                       "RuntimeError: Connection closed by peer")
    assert explain({}, {}, _watchdog(tmp_path), {}, 30) == ""


def test_short_error_drops_gloo_source_locations():
    assert short_error("RuntimeError: [/a/b/pair.cc:553] Connection closed") == "RuntimeError: Connection closed"
    assert short_error("ValueError: [1, 2] differ") == "ValueError: [1, 2] differ"

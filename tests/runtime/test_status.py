"""RankStatus: the record a rank leaves of its step and collective, and where() reading it."""
from __future__ import annotations

import os

from planc.runtime import status
from planc.runtime.status import RankStatus, read_status, where


def test_a_step_and_its_collectives_are_recorded_in_place(tmp_path):
    path = tmp_path / "rank0"
    rank = RankStatus(path)
    assert path.stat().st_size == status.RECORD_BYTES
    rank.at_step("target", 3, "decode")
    first = rank.begin("all_reduce", "decode", blocking=True)
    record = read_status(path)
    assert record["pid"] == os.getpid() and record["blocked"] == "all_reduce" and record["blocked_seq"] == first == 1
    assert where(record, now=record["since"] + 2).startswith("in decode step 3 of target, blocked in all_reduce #1 for 2.0 s")
    rank.end()
    second = rank.begin("all_to_all", "decode", blocking=False)  # started, not yet waited for
    assert where(read_status(path)) == "in decode step 3 of target, after all_to_all #2"
    rank.waiting("all_to_all", second)
    assert read_status(path)["blocked"] == "all_to_all" and read_status(path)["blocked_seq"] == 2
    rank.end()
    rank.finish("done")
    assert read_status(path)["state"] == "done" and path.stat().st_size == status.RECORD_BYTES


def test_nothing_or_no_record_reads_as_none(tmp_path):
    assert read_status(tmp_path / "missing") is None
    (tmp_path / "zeros").write_bytes(bytes(status.RECORD_BYTES))  # created, not yet written
    assert read_status(tmp_path / "zeros") is None
    assert where(None) == "before it started"
    assert where({"step": -1, "seq": 0, "blocked": ""}) == "before its first step, before its first collective"


"""Progress bars: drawn on a terminal (a pty here), nothing written and nothing hooked anywhere
else, and a compile's artifact the same either way."""
from __future__ import annotations

import io
import os
import pty
import sys
import threading
import time
from collections.abc import Callable

import pytest
from torch import nn

from planc import progress
from planc.driver import compile
from tests.conftest import PLANS


@pytest.fixture
def no_delay(monkeypatch):
    monkeypatch.setattr(progress, "DELAY_S", 0.0)  # draw at once, however short the step


def _steps() -> None:
    for _ in progress.track(["a", "b"], "lift checks", "blocks"):
        time.sleep(0.2)
    layers = [nn.Linear(2, 2), nn.Linear(2, 2)]
    with progress.calls(layers, "calibrate"):
        assert all(layer._forward_hooks for layer in layers) == progress.on_terminal()
        for layer in layers:
            time.sleep(0.2)
            layer(layer.weight)
    assert not any(layer._forward_hooks for layer in layers)  # every hook removed


def _on_pty(monkeypatch, run: Callable[[], object]) -> str:
    """What `run` writes to stderr when stderr is a terminal."""
    master, replica = pty.openpty()
    stream = os.fdopen(replica, "w", encoding="utf-8")
    chunks: list[bytes] = []
    reader = threading.Thread(target=_drain, args=(master, chunks), daemon=True)
    reader.start()  # read as it comes: a full pty buffer would block the writer
    try:
        with monkeypatch.context() as terminal:
            terminal.setattr(sys, "stderr", stream)
            terminal.setenv("TERM", "xterm")
            run()
    finally:
        stream.close()
        reader.join(timeout=10)
        os.close(master)
    return b"".join(chunks).decode("utf-8", errors="replace")


def _drain(fd: int, chunks: list[bytes]) -> None:
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:  # EIO: the terminal's other end is closed
            return
        if not data:
            return
        chunks.append(data)


def test_nothing_is_drawn_or_hooked_off_a_terminal(monkeypatch, no_delay):
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    assert not progress.on_terminal()
    _steps()
    assert stderr.getvalue() == ""


def test_bars_are_drawn_on_a_terminal(monkeypatch, no_delay):
    drawn = _on_pty(monkeypatch, _steps)
    assert "lift checks" in drawn and "2/2" in drawn and "blocks" in drawn
    assert "calibrate" in drawn and "layers" in drawn


def test_a_dumb_terminal_draws_nothing(monkeypatch, no_delay):
    monkeypatch.setenv("TERM", "dumb")
    monkeypatch.setattr(sys, "stderr", type("Tty", (io.StringIO,), {"isatty": lambda self: True})())
    assert not progress.on_terminal()
    _steps()
    assert sys.stderr.getvalue() == ""


def test_only_rank_0_of_a_torchrun_job_draws(monkeypatch, no_delay):
    monkeypatch.setenv("RANK", "1")
    drawn = _on_pty(monkeypatch, _steps)
    assert "lift checks" not in drawn and "calibrate" not in drawn


def test_a_short_step_draws_nothing(monkeypatch):
    drawn = _on_pty(monkeypatch, lambda: list(progress.track(range(3), "partition", "ranks")))
    assert "partition" not in drawn  # over before DELAY_S


def test_a_compile_on_a_terminal_shows_its_long_steps_and_writes_the_same_artifact(monkeypatch, no_delay, tmp_path):
    plan = PLANS / "deepseek_mla_tp_ep.yaml"
    drawn = _on_pty(monkeypatch, lambda: compile("tiny-deepseek", plan, tmp_path / "tty"))
    for step in ("model tiny-deepseek", "capture", "lift checks", "partition", "write target weights"):
        assert step in drawn, step
    compile("tiny-deepseek", plan, tmp_path / "pipe")
    for name in ("programs/target/program.py", "programs/target/weights/rank0.safetensors"):
        assert (tmp_path / "tty" / name).read_bytes() == (tmp_path / "pipe" / name).read_bytes()

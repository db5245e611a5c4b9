"""Replacing an artifact: a reader finds the old or the new one, never nothing; a compile that is
killed or gets SIGTERM / SIGINT leaves the old artifact (or, once the swap has begun, the new
one) and no temporary directory after the next compile, which removes a killed one's leftovers.

SIGTERM and SIGKILL are sent to a real `planc compile` process: unpatched, as soon as it starts
writing, and paused at a named step (the function there wrapped to print "paused" and sleep).
SIGINT, SIGTERM as the swap begins, and SIGTERM under a handler of the caller's are sent by
planc.driver.compile, run in this process, to itself (cheaper)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from planc import __version__
from planc.cli import main
from planc.codegen.artifact import Program, write_artifact
from planc.codegen.replace import _new_tmp, leftovers, remove_leftovers
from planc.driver import compile
from planc.errors import Interrupted
from planc.runtime.artifact import open_artifact, read_manifest
from tests.conftest import ROOT, plan_for

PLAN = "deepseek_mla_tp_ep.yaml"
SECONDS = 60  # from the signal to the process's exit; the compile itself takes a few seconds
CLI_STATUS = (2, 128 + signal.SIGTERM)  # planc's error status, or the shell's for a signal (Interrupted.exit_status)

PAUSE = """
import sys, time
import planc.codegen.artifact as artifact, planc.codegen.replace as replace
module, name = {"fill": (artifact, "_write_program"), "swapped": (replace, "_swap_in")}[sys.argv[1]]
step = getattr(module, name)
def paused(*args, **kwargs):
    step(*args, **kwargs)
    print("paused", flush=True)
    time.sleep(60)  # a signal's handler runs here
setattr(module, name, paused)
from planc.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def old(tmp_path) -> tuple[Path, dict[str, bytes]]:
    """An artifact compiled for 2 devices, and its bytes; the compiles under test target 4."""
    out = compile(None, plan_for(tmp_path, PLAN, 2), tmp_path / "out" / "art", meta=True).path
    return out, _files(out)


def _compile(tmp_path: Path, out: Path, pause: str | None = None) -> subprocess.Popen:
    command = ["-c", PAUSE, pause] if pause else ["-m", "planc.cli"]
    args = ["compile", "tiny-deepseek", str(plan_for(tmp_path, PLAN, 4)), "-o", str(out), "--meta"]
    return subprocess.Popen([sys.executable, *command, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _pause(proc: subprocess.Popen) -> None:
    for line in proc.stdout:
        if line == "paused\n":
            return
    raise AssertionError(f"the compile ended before pausing: {proc.wait()} {proc.stderr.read()}")


def _signal(proc: subprocess.Popen, signum: int) -> tuple[int, str, float]:
    """(exit status, stderr, seconds to exit) after sending `signum`."""
    started = time.monotonic()
    proc.send_signal(signum)
    code = proc.wait(timeout=SECONDS)
    return code, proc.stderr.read(), time.monotonic() - started


def _is_new(out: Path) -> bool:
    open_artifact(out)  # complete: every file as its manifest says
    return read_manifest(out)["world_size"] == 4


def test_sigterm_while_writing_keeps_the_old_artifact_and_no_litter(tmp_path, old):
    out, before = old
    proc = _compile(tmp_path, out, pause="fill")
    _pause(proc)
    assert leftovers(out)  # the new copy is being written beside the old
    code, err, seconds = _signal(proc, signal.SIGTERM)
    assert code in CLI_STATUS and seconds < SECONDS and "Traceback" not in err
    assert err.splitlines()[-1].startswith("planc compile: ") and "interrupted by SIGTERM" in err.splitlines()[-1]
    assert _files(out) == before and not leftovers(out)


def _compile_here(tmp_path, out: Path) -> None:
    try:
        compile(None, plan_for(tmp_path, PLAN, 4), out, meta=True)
    except KeyboardInterrupt:
        pytest.fail("SIGINT got past planc compile's handler")


def _signal_at(monkeypatch, target: str, signum: int, *, before: bool = False) -> None:
    """Make planc send `signum` to itself when the function `target` returns (or is called)."""
    module, _, name = target.rpartition(".")
    step = getattr(sys.modules[module], name)

    def with_signal(*args, **kwargs):
        if before:
            os.kill(os.getpid(), signum)
        step(*args, **kwargs)
        if not before:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(target, with_signal)


@pytest.fixture
def sigint_handled():
    """SIGINT as a terminal's foreground job has it (KeyboardInterrupt): a test run started in the
    background inherits it ignored, which planc rightly leaves ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_sigint_while_writing_keeps_the_old_artifact_and_no_litter(tmp_path, monkeypatch, old, sigint_handled):
    out, before = old
    _signal_at(monkeypatch, "planc.codegen.artifact._write_program", signal.SIGINT)
    with pytest.raises(Interrupted) as stop:
        _compile_here(tmp_path, out)
    assert str(stop.value) == f"interrupted by SIGINT; {out} left as it was; the partial copy removed"
    assert stop.value.exit_status == 130
    assert _files(out) == before and not leftovers(out)


def test_sigterm_as_the_swap_begins_waits_for_it(tmp_path, monkeypatch, old):
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        # the test runner's own handler would take the signal; the handler-chaining test covers that path
        pytest.skip("a SIGTERM handler is installed")
    out, _ = old
    _signal_at(monkeypatch, "planc.codegen.replace._swap_in", signal.SIGTERM, before=True)
    with pytest.raises(Interrupted) as stop:
        _compile_here(tmp_path, out)
    assert str(stop.value) == (f"interrupted by SIGTERM; {out} holds the new copy, complete (the signal came as it "
                               "was swapped in)")
    assert _is_new(out) and not leftovers(out)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # planc's handler is gone again


class _Stop(BaseException):
    pass


def test_a_handler_the_caller_installed_runs_after_the_cleanup(tmp_path, monkeypatch, old):
    """As a command line's own SIGTERM handler: it ends the command; planc removes its partial copy."""
    out, before = old

    def callers(signum, frame):
        raise _Stop

    previous = signal.signal(signal.SIGTERM, callers)
    try:
        _signal_at(monkeypatch, "planc.codegen.artifact._write_program", signal.SIGTERM)
        with pytest.raises(_Stop):
            _compile_here(tmp_path, out)
        assert signal.getsignal(signal.SIGTERM) is callers
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert _files(out) == before and not leftovers(out)


def test_a_compile_killed_between_the_swap_and_the_cleanup_leaves_the_new_artifact_and_the_next_removes_the_old(
        tmp_path, old):
    out, _ = old
    proc = _compile(tmp_path, out, pause="swapped")
    _pause(proc)
    code, _, _ = _signal(proc, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert _is_new(out) and len(leftovers(out)) == 1  # the old copy, no longer locked by anyone
    compile(None, plan_for(tmp_path, PLAN, 2), out, meta=True)
    assert not leftovers(out) and sorted(p.name for p in out.parent.iterdir()) == ["art"]


def test_sigterm_to_an_unpatched_compile_as_it_starts_writing(tmp_path, old):
    out, before = old
    proc = _compile(tmp_path, out)
    while not leftovers(out):  # the write step has begun: its temporary directory exists
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.001)
    code, err, seconds = _signal(proc, signal.SIGTERM)
    assert code in CLI_STATUS and seconds < SECONDS and "Traceback" not in err
    assert "interrupted by SIGTERM" in err.splitlines()[-1]
    assert _files(out) == before or _is_new(out)  # the new copy, if the signal came as it was swapped in
    assert not leftovers(out)


def _small(out: Path, value: float) -> None:
    write_artifact(out, manifest={"planc_version": __version__}, report={},
                   programs={"target": Program("x = 1\n", {}, [{"w": torch.full((2**16,), value)}])})


_STEPS: list[tuple[str, bool]] = []  # (filesystem step about to run, whether a reader finds a whole artifact)
_WATCHED: list[Path] = []


def _before_each_step(event: str, args: tuple) -> None:
    # Audit hooks run before the operation and cannot be removed: this one only looks while a test
    # watches. Renames and removals are audited; the one renameat2 call (through ctypes) is not.
    if _WATCHED and event in ("os.rename", "shutil.rmtree"):
        _STEPS.append((event, (_WATCHED[0] / "manifest.json").is_file()))


sys.addaudithook(_before_each_step)


def test_a_reader_finds_a_whole_artifact_before_and_after_every_step(tmp_path):
    out = tmp_path / "art"
    _small(out, 0.0)
    _STEPS.clear()
    _WATCHED.append(out)
    try:
        _small(out, 1.0)
    finally:
        _WATCHED.clear()
    assert _STEPS and all(whole for _, whole in _STEPS), _STEPS
    assert _is_whole(out, 1.0) and sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def _is_whole(out: Path, value: float) -> bool:
    from safetensors.torch import load_file

    return load_file(open_artifact(out).path("programs/target/weights/rank0.safetensors"))["w"][0].item() == value


def test_an_output_that_cannot_be_written_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    out = tmp_path / "file" / "art"
    assert main(["compile", "tiny-deepseek", str(plan_for(tmp_path, PLAN, 2)), "-o", str(out), "--meta"]) == 2
    err = capsys.readouterr().err
    assert err.endswith(f"error: {out}: cannot write the artifact there (File exists: {out.parent}); "
                        "choose another -o\n"), err


def test_the_directory_of_a_live_writer_is_not_removed(tmp_path):
    out = tmp_path / "art"
    tmp, lock = _new_tmp(out)
    remove_leftovers(out)
    assert tmp.is_dir()
    os.close(lock)  # the writer ends without cleaning up, as a killed one would
    remove_leftovers(out)
    assert not tmp.exists()


def test_leftovers_are_matched_by_the_artifacts_own_name(tmp_path):
    (tmp_path / ".a*.tmp-1").mkdir()
    (tmp_path / ".ab.tmp-1").mkdir()  # another output's: `*` in a name is not a pattern
    assert leftovers(tmp_path / "a*") == [tmp_path / ".a*.tmp-1"]

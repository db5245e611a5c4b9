"""The command line answers at once and ends every mishap in one line: help, version, usage and plan
errors before torch is imported, a closed pipe, an -o that is a directory or not an artifact."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from planc.cli import main
from planc.diff import human_bytes, rank_groups
from tests.conftest import PLANS, ROOT

BAD_PLAN = 'version: 1\nmesh: {devices: 2}\nrules:\n  - match: "model.layers.*.self_attn"\n    atention: {strategy: mla_tp}\n'
# Runs ARGV through planc's command line in a fresh interpreter; reports its status, whether torch
# was imported, and the wall time from the interpreter's start to the answer.
PROBE = """
import json, sys, time
from planc.cli import main
try:
    status = main(sys.argv[1:])
except SystemExit as exit:
    status = exit.code
print(json.dumps({"status": status, "torch": "torch" in sys.modules}), file=sys.stderr)
"""


def probe(*argv: str) -> tuple[dict, float, str, str]:
    """Best wall time of three runs (the machine is shared: one slow start says nothing)."""
    best = None
    for _ in range(3):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)
        wall = time.perf_counter() - started
        best = wall if best is None else min(best, wall)
    *lines, last = done.stderr.strip().splitlines()
    return json.loads(last), best, done.stdout, "\n".join(lines)


def test_help_answers_in_under_a_second_without_torch():
    found, wall, out, _ = probe("--help")
    assert found == {"status": 0, "torch": False} and "compile" in out and "diff" in out
    assert wall < 1.0, wall


def test_a_plan_error_answers_in_under_a_second_without_torch(tmp_path):
    (tmp_path / "plan.yaml").write_text(BAD_PLAN)
    found, wall, _, err = probe("validate", str(tmp_path / "plan.yaml"))
    assert found == {"status": 2, "torch": False}
    assert err == (f"planc validate: error: {tmp_path / 'plan.yaml'}:5:5: rules[0].atention: unknown key 'atention'; "
                   "did you mean 'attention'? Allowed keys: attention, match, mlp, moe, overlap.")
    assert wall < 1.0, wall


def test_version_and_python_dash_m():
    done = subprocess.run([sys.executable, "-m", "planc", "--version"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert (done.returncode, done.stdout) == (0, "planc 0.1.0\n")


def test_subcommand_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 64)" in out and "(default: 900.0)" in out and "(default: None)" not in out


def test_a_closed_pipe_ends_quietly():
    """`planc schema | head -1`: the reader is gone before the output is written (closed before
    the interpreter has started); no traceback, the shell's status for SIGPIPE."""
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "planc", "schema"], cwd=ROOT, stdout=write_fd,
                            stderr=subprocess.PIPE)
    os.close(write_fd)
    os.close(read_fd)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and err == "", err


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_compile_refuses_an_out_that_is_not_an_artifact_before_any_work(tmp_path, kind):
    out = tmp_path / "out"
    out.mkdir() if kind == "directory" else out.write_text("notes")
    found, _, _, err = probe("compile", "tiny-deepseek", str(PLANS / "deepseek_mla_tp_ep.yaml"), "-o", str(out))
    assert found == {"status": 2, "torch": False}  # refused before the model was loaded
    assert len(err.splitlines()) == 1 and err.startswith(f"planc compile: error: -o {out}: ") and "choose another -o" in err
    assert (out.is_dir() and not any(out.iterdir())) if kind == "directory" else out.read_text() == "notes"


def test_inspect_refuses_a_directory_as_its_page(compiled, tmp_path, capsys):
    assert main(["inspect", str(compiled("deepseek_mla_tp_ep.yaml", 2)), "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"planc inspect: error: -o {tmp_path}: a directory; name the file to write, e.g. -o {tmp_path / 'plan.html'}\n"


def test_model_is_optional_when_the_plan_names_it_and_another_is_an_error(tmp_path, capsys):
    plan = str(PLANS / "deepseek_mla_tp_ep.yaml")
    assert main(["compile", plan, "-o", str(tmp_path / "art"), "--meta", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"] == "tiny-deepseek" and printed["world_size"] == 2 and len(printed["per_rank"]) == 2
    assert main(["compile", "tiny-draft", plan, "-o", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("planc compile: error: MODEL 'tiny-draft' is not the plan's model.source 'tiny-deepseek' "
                          f"({plan}:") and not (tmp_path / "other").exists()


def test_validate_json(capsys):
    assert main(["validate", str(PLANS / "deepseek_tpla.yaml"), "--meta", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert (found["valid"], found["model"], found["applied"], found["declines"]) == (True, "tiny-deepseek", 8, [])


def test_sizes_are_human_and_identical_ranks_share_a_line():
    assert [human_bytes(n) for n in (512, 1536, 169264.86 * 2**20)] == ["512 B", "1.50 KiB", "165.30 GiB"]
    ranks = [{"rank": r, "weight_bytes": 10 if r != 3 else 12, "kv_bytes_per_token": 4} for r in range(5)]
    assert [label for label, _ in rank_groups(ranks)] == ["ranks 0, 1, 2, 4", "rank 3"]
    assert [label for label, _ in rank_groups(ranks[:3])] == ["ranks 0-2"]

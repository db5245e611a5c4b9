"""`planc run` / `planc verify` options out of range are errors (status 2), never "the default"."""
from __future__ import annotations

import pytest

from planc.cli import build_parser, main


@pytest.mark.parametrize("nproc", ["0", "-2"])
def test_nproc_below_one(compiled, capsys, nproc):
    assert main(["run", str(compiled("deepseek_mla_tp_ep.yaml", 2)), "--nproc", nproc]) == 2
    err = capsys.readouterr().err
    assert err == (f"planc run: error: --nproc {nproc}: the number of ranks on this machine must be at least 1 "
                   f"(leave it out for the plan's mesh.devices)\n")


def test_batch_size_below_one(compiled, capsys):
    assert main(["run", str(compiled("deepseek_mla_tp_ep.yaml", 2)), "--batch-size", "0"]) == 2
    assert capsys.readouterr().err == ("planc run: error: --batch-size 0: the prompts decoded together must be at "
                                       "least 1 (leave it out to decode all prompts as one batch)\n")


@pytest.mark.parametrize("command", ["run", "verify"])
@pytest.mark.parametrize("flag", ["--timeout", "--collective-timeout"])
def test_timeouts_must_be_positive(compiled, capsys, command, flag):
    assert main([command, str(compiled("deepseek_mla_tp_ep.yaml", 2)), flag, "0"]) == 2
    err = capsys.readouterr().err
    name = {"--timeout": "timeout_s", "--collective-timeout": "collective_timeout_s"}[flag]
    assert err.startswith(f"planc {command}: error: {name}=0.0: ") and "> 0" in err, err


def test_the_collective_timeout_bounds_a_stall_within_a_minute_by_default():
    args = build_parser().parse_args(["run", "ARTIFACT"])
    assert 0 < args.collective_timeout <= 30

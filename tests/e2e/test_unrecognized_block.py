"""A model with a feed-forward block planc does not recognize compiles, runs that block as captured
on every rank, and reproduces transformers' generate() at 2 ranks; a rule that asks to shard the
block is an error naming it.

The model is a factory (`package.module:factory`): a checkpoint directory cannot hold a custom class.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from planc.cli import main
from planc.models.registry import pin_static_paths
from planc.report.inspect import render
from planc.verify import verify

MODEL = "tests.e2e.test_unrecognized_block:gelu_llama"
# fp32 end to end; attention TP sums two partial o_proj outputs, which moves logits by ~1e-7.
LOGIT_TOL = 1e-4
CAPTURED = ["model.layers.1.mlp", "model.layers.2.mlp"]


class GeluMLP(nn.Module):
    """Linear (bias) -> LayerNorm -> GELU -> Linear (bias): no gate, so no recognizer knows it."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.fc_in = nn.Linear(hidden, inner)
        self.norm = nn.LayerNorm(inner)
        self.fc_out = nn.Linear(inner, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(nn.functional.gelu(self.norm(self.fc_in(x)), approximate="tanh"))


def gelu_llama() -> nn.Module:
    """A 3-layer byte-vocabulary Llama whose layers 1 and 2 have a GeluMLP (one layer structure)
    and whose final norm is a LayerNorm (with bias: not an RMSNorm)."""
    torch.manual_seed(0)
    config = pin_static_paths(LlamaConfig(
        vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=256, eos_token_id=257, pad_token_id=258,
        tie_word_embeddings=False))
    model = LlamaForCausalLM(config)
    for layer in model.model.layers[1:]:
        layer.mlp = GeluMLP(32, 48)
    model.model.norm = nn.LayerNorm(32)
    with torch.no_grad():  # not the identity it starts as
        model.model.norm.weight.uniform_(0.5, 1.5)
        model.model.norm.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _plan(tmp: Path, *rules: str) -> Path:
    body = "".join(f"\n  - {r}" for r in rules)
    path = tmp / "plan.yaml"
    path.write_text(f"version: 1\nmesh: {{devices: 2}}\nmodel: {{source: '{MODEL}', dtype: float32}}\nrules:{body}\n")
    return path


ATTENTION_TP = 'match: "model.layers.*.self_attn"\n    attention: {strategy: tp}'


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("unrecognized")
    out = tmp / "art"
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        assert main(["compile", MODEL, str(_plan(tmp, ATTENTION_TP)), "-o", str(out)]) == 0
    return out, log.getvalue()


def test_compile_runs_the_block_as_captured_and_says_so(compiled):
    art, log = compiled
    assert ("captured model.layers.1.mlp, model.layers.2.mlp (GeluMLP): run as captured, whole on every rank; "
            "not a recognized feed-forward block") in log
    report = json.loads((art / "report.json").read_text())
    mlps = [e for e in report["run_as_captured"] if e["class"] == "GeluMLP"]
    assert [(e["block"], e["function"]) for e in mlps] == [(fqn, "captured_L1_mlp") for fqn in CAPTURED]
    assert all("planc lifts MLPs" in e["why"] for e in mlps)
    norm = next(e for e in report["run_as_captured"] if e["class"] == "LayerNorm")
    assert norm["block"] == "model.norm" and "planc lifts RMSNorm" in norm["why"]
    assert checks_ok(report, "model.norm")
    checks = {c["block"]: c for c in report["lift_checks"]}
    assert checks[CAPTURED[0]]["method"] == "numeric" and checks[CAPTURED[0]]["rel_err"] <= 1e-6
    assert checks[CAPTURED[1]]["against"] == CAPTURED[0]
    program = (art / "programs" / "target" / "program.py").read_text()
    assert program.count("def captured_L1_mlp(x, W):") == 1  # one definition per layer structure
    calls = re.findall(r"= captured_L1_mlp\(x_\d+, W\.scope\('([\w.]+)'\)\)", program)
    assert calls == CAPTURED


def checks_ok(report: dict, block: str) -> bool:
    check = next(c for c in report["lift_checks"] if c["block"] == block)
    return check["method"] == "numeric" and check["rel_err"] <= 1e-6


def test_two_ranks_reproduce_generate(compiled):
    report = verify(compiled[0], max_new_tokens=17, timeout_s=300)
    assert report["tokens_compared"] == 3 * 17
    assert report["token_agreement"] == 1.0, report
    assert report["max_logit_diff"] <= LOGIT_TOL, report
    assert report["ranks_agree"]


def test_a_rule_that_shards_the_captured_block_is_an_error(tmp_path, capsys):
    plan = _plan(tmp_path, ATTENTION_TP, 'match: "model.layers.*.mlp"\n    mlp: {strategy: tp}')
    assert main(["compile", MODEL, str(plan), "-o", str(tmp_path / "art")]) == 2
    err = capsys.readouterr().err
    assert ("plan.yaml:8:11: rules[1].mlp.strategy 'tp' (match 'model.layers.*.mlp') asks to shard model.layers.1.mlp "
            "(GeluMLP) (and 1 more such blocks), which planc runs as captured, whole on every rank: not a recognized "
            "feed-forward block; planc lifts MLPs") in err
    assert not (tmp_path / "art").exists()


def test_inspect_page_lists_the_captured_blocks_and_their_grid_cells(compiled):
    page = render(compiled[0])
    section = re.search(r'<section id="captured">(.*?)</section>', page, re.S).group(1)
    assert "Run as captured (3)" in section and section.count("<code>captured_L1_mlp</code>") == 2
    for layer in (1, 2):
        cell = re.search(rf'<td [^>]*data-cell="(?:[^"]* )?{layer}:ffn(?: [^"]*)?"[^>]*>(.*?)</td>', page, re.S).group(1)
        assert '<div class="strategy">run as captured ' in cell
        assert re.search(rf'<span class="ln" id="L\d+" data-cell="{layer}:ffn"><i>\d+</i>\s+m_\d+ = captured_L1_mlp\(', page)

"""Each decoder family, as a user brings it: a checkpoint written by save_pretrained, compiled with
`planc compile` under its natural plan, and `planc verify` against transformers' generate() on 2
and 4 real gloo ranks: every greedy token equal, logits within 1e-4 (fp32).

Natural plans: attention heads split (GQA tp / MLA mla_tp), dense MLPs tensor-parallel, routed
experts expert-parallel. Qwen2-MoE's gated shared expert is split at 2 ranks and runs on each
rank's token slice at 4; DeepSeek-V2 also runs TPLA with one latent group (exact by construction).
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from planc.cli import main
from planc.verify import verify
from tests.families.configs import save

# fp32: the split GEMMs and all-reduces reorder additions, which moves logits by ~1e-7.
LOGIT_TOL = 1e-4
ATTENTION = {"gqa": "attention: {strategy: tp}", "mla": "attention: {strategy: mla_tp}"}
DENSE_TP = "mlp: {strategy: tp}"
EP = "moe: {strategy: ep}"

CASES = {
    "llama": [("model.layers.*.self_attn", ATTENTION["gqa"]), ("model.layers.*.mlp", DENSE_TP)],
    "qwen2": [("model.layers.*.self_attn", ATTENTION["gqa"]), ("model.layers.*.mlp", DENSE_TP)],
    "qwen3": [("model.layers.*.self_attn", ATTENTION["gqa"]), ("model.layers.*.mlp", DENSE_TP)],
    "mixtral": [("model.layers.*.self_attn", ATTENTION["gqa"]), ("model.layers.*.mlp", EP)],
    "qwen3_moe": [("model.layers.*.self_attn", ATTENTION["gqa"]), ("model.layers.*.mlp", EP)],
    "olmoe": [("model.layers.*.self_attn", ATTENTION["gqa"]), ("model.layers.*.mlp", EP)],
    "deepseek_v2": [("model.layers.*.self_attn", ATTENTION["mla"]), ("model.layers.0.mlp", DENSE_TP),
                    ("model.layers.*.mlp", EP)],
    "deepseek_v3": [("model.layers.*.self_attn", ATTENTION["mla"]), ("model.layers.0.mlp", DENSE_TP),
                    ("model.layers.*.mlp", EP)],
}
EXTRA = {  # (family, world): rules
    ("qwen2_moe", 2): [("model.layers.*.self_attn", ATTENTION["gqa"]), ("model.layers.*.mlp.shared_expert", DENSE_TP),
                       ("model.layers.*.mlp", EP)],
    ("qwen2_moe", 4): [("model.layers.*.self_attn", ATTENTION["gqa"]), ("model.layers.*.mlp", EP)],
    ("deepseek_v2", "tpla"): [("model.layers.*.self_attn",
                               "attention: {strategy: tpla, latent_groups: 1, transform: hadamard, prefill: mla}"),
                              ("model.layers.*.mlp", EP)],
}
RUNS = [(f, w, rules) for f, rules in CASES.items() for w in (2, 4)] + \
       [(f, w if w != "tpla" else 2, rules) for (f, w), rules in EXTRA.items()]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {family: save(family, root) for family in {f for f, _, _ in RUNS}}


def _plan(path: Path, world: int, rules: list[tuple[str, str]]) -> Path:
    body = "".join(f'\n  - match: "{glob}"\n    {section}' for glob, section in rules)
    path.write_text(f"version: 1\nmesh: {{devices: {world}}}\nrules:{body}\n")
    return path


@pytest.mark.parametrize(("family", "world", "rules"), RUNS,
                         ids=[f"{f}-{w}-{rules[0][1].split()[2].rstrip(',}')}" for f, w, rules in RUNS])
def test_compile_and_verify_match_transformers(checkpoints, tmp_path, family, world, rules):
    out = tmp_path / "art"
    with contextlib.redirect_stdout(io.StringIO()) as log:
        code = main(["compile", str(checkpoints[family]), str(_plan(tmp_path / "plan.yaml", world, rules)),
                     "-o", str(out)])
    assert code == 0, log.getvalue()
    assert " 0 declined" in log.getvalue(), log.getvalue()  # every rule applied
    report = verify(out, max_new_tokens=9, timeout_s=300)
    assert report["tokens_compared"] == 3 * 9
    assert report["token_agreement"] == 1.0, report
    assert report["max_logit_diff"] <= LOGIT_TOL, report
    assert report["ranks_agree"]

"""Speculative decoding and EasySpec on the bundled models: tiny-deepseek verifies, tiny-draft
drafts, 4 ranks as threads (planc.runtime.threads). Greedy output is the target's own, N = 1 is
standard speculative decoding bit for bit, and after every calibration the draft's cache is a
fresh prefill of the committed tokens with no fuzzy slot left."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from planc.driver import compile
from planc.models.tokenizer import encode
from scipy.stats import chi2

from planc.runtime.comm import Comm
from planc.runtime.decode import Greedy, Sampling, generate, left_pad
from planc.runtime.kv_cache import KvCache
from planc.runtime.model import Model
from planc.runtime.speculative import Speculation, speculative_generate
from planc.runtime.threads import run_threads
from tests.conftest import PLANS

WORLD = 4
NEW = 20
PROMPTS = [encode("def fibonacci(n):\n    return"), encode("import os\nimport"), encode("class Tree:\n    def __init__(self")]
VARIANTS = {"standard": None, "n1": 1, "n2": 2, "n4": 4}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """plans/deepseek_easyspec.yaml with the draft's easyspec section removed (standard) or at N."""
    root = tmp_path_factory.mktemp("speculative")
    out = {}
    for name, degree in VARIANTS.items():
        data = yaml.safe_load((PLANS / "deepseek_easyspec.yaml").read_text())
        if degree is None:
            del data["draft"]["easyspec"]
        else:
            data["draft"]["easyspec"]["layer_parallel"] = degree
        plan = root / f"{name}.yaml"
        plan.write_text(yaml.safe_dump(data, sort_keys=False))
        out[name] = compile(None, plan, root / name).path
    return out


def _speculate(artifact, *, on_round=None, strategy=Greedy(), prompts=PROMPTS, new=NEW, **changes):
    """Every rank's Generation; on_round(rank, round, target, draft) sees every round; changes
    replace fields of the artifact's Speculation."""
    def rank(comm):
        target, draft = Model(artifact, comm=comm), Model(artifact, "draft", comm=comm)
        spec = dataclasses.replace(Speculation.from_manifest(target.manifest["speculate"]), **changes)
        hook = None if on_round is None else (lambda r: on_round(comm.rank, r, target, draft))
        return speculative_generate(target, draft, prompts, new, strategy, spec, keep_logits=True, on_round=hook)
    return run_threads(rank, WORLD)


@pytest.fixture(scope="module")
def target_alone(artifacts):
    return run_threads(lambda comm: generate(Model(artifacts["standard"], comm=comm), PROMPTS, NEW, Greedy(),
                                             keep_logits=True), WORLD)[0]


@pytest.mark.parametrize("variant", ["standard", "n1", "n2", "n4"])
def test_greedy_output_is_the_target_alone(artifacts, target_alone, variant):
    rounds = []
    outs = _speculate(artifacts[variant], on_round=lambda rank, r, *_: rank == 0 and rounds.append(r))
    assert all(o.tokens == outs[0].tokens for o in outs)
    assert outs[0].tokens == target_alone.tokens
    for got, want in zip(outs[0].step_logits, target_alone.step_logits):
        assert (got - want).abs().max() < 1e-4  # fp32: the verify pass sums G + 1 positions at once
    differ = [r for r in rounds if len(set(r.accepted_B[r.running_B].tolist())) > 1]
    assert differ, "no round had rows accepting different counts"
    assert 0 < outs[0].speculation["accepted"] < outs[0].speculation["drafted"]


def test_layer_parallel_of_one_is_standard_speculative_decoding_bitwise(artifacts):
    logged = {name: [] for name in ("standard", "n1")}
    outs = {}
    for name, log in logged.items():
        outs[name] = _speculate(artifacts[name], on_round=lambda rank, r, *_, log=log: rank == 0 and log.append(r))
    assert outs["n1"][0].tokens == outs["standard"][0].tokens
    assert len(logged["n1"]) == len(logged["standard"])
    for a, b in zip(logged["n1"], logged["standard"]):
        assert torch.equal(a.draft_logits_BGV, b.draft_logits_BGV) and torch.equal(a.drafts_BG, b.drafts_BG)
    assert outs["n1"][0].speculation["draft_sequential_depth"] == 6


def _fresh_prefill(artifact, comm, tokens: list[list[int]]) -> Model:
    fresh = Model(artifact, "draft", comm=comm)
    ids, real = left_pad(tokens, 0)
    fresh.allocate(len(tokens), ids.shape[1])
    fresh.extend(ids, real)
    return fresh


def _real_slots(model: Model, fqn: str, row: int) -> torch.Tensor:
    """K and V of the row's real tokens, in order (padding and rejected holes left out)."""
    layer, end = model.kv[fqn], model.cache.length
    mask = model.cache.key_mask_BT[row, :end]
    return torch.cat([layer.k_BTHD[row, :end][mask].flatten(1), layer.v_BTHD[row, :end][mask].flatten(1)], dim=1)


@pytest.mark.parametrize("variant", ["n2", "n4"])
def test_after_each_calibration_the_draft_cache_is_a_fresh_prefill(artifacts, variant):
    checked = []

    def check(rank, r, target, draft):
        assert draft.cache.fuzzy_slots() == 0  # every fuzzy slot was forgotten
        cached = [c[:len(c) - len(p)] for c, p in zip(r.committed, r.pending)]
        fresh = _fresh_prefill(artifacts[variant], draft.comm, cached)  # every rank joins its gathers
        for fqn in draft.kv:  # this rank's layers: the kept first and last, and its grouped ones
            for row in range(len(cached)):
                torch.testing.assert_close(_real_slots(draft, fqn, row), _real_slots(fresh, fqn, row),
                                           rtol=0, atol=1e-5)  # fp32: chunked forwards vs one prefill
        checked.append(len(draft.kv))

    outs = _speculate(artifacts[variant], on_round=check)
    assert outs[0].speculation["calibrate"] and outs[0].speculation["rounds"] >= 3
    assert set(checked) == {3}  # first, last and the one grouped layer each rank runs


def test_uncalibrated_drafting_keeps_fuzzy_slots_and_stays_lossless(artifacts, target_alone):
    fuzzy = []
    outs = _speculate(artifacts["n2"], calibrate=False,
                      on_round=lambda rank, r, target, draft: fuzzy.append(draft.cache.fuzzy_slots()))
    assert outs[0].tokens == target_alone.tokens
    assert max(fuzzy) > 0 and not outs[0].speculation["calibrate"]


class Markov:
    """A model over a tiny vocabulary whose next-token logits depend on the current token alone:
    the distribution of any continuation is known exactly."""

    def __init__(self, logits_VV: torch.Tensor):
        self.logits_VV, self.comm, self.cache = logits_VV, Comm.single(), KvCache({}, torch.float32)

    def allocate(self, batch: int, capacity: int) -> None:
        self.cache.allocate(batch, capacity)

    def extend(self, ids_BS, real_BS=None, *, layer_parallel=False, fuzzy=False):
        self.cache.step(torch.ones(ids_BS.shape, dtype=torch.bool) if real_BS is None else real_BS)
        self.cache.advance(ids_BS.shape[1], fuzzy=fuzzy)
        return self.logits_VV[ids_BS]


def _joint(logits_VV: torch.Tensor, first: int, length: int) -> torch.Tensor:
    """P(x_1..x_length | x_0 = first), flattened row-major (x_1 slowest)."""
    step = torch.softmax(logits_VV.double(), dim=-1)
    joint = step[first]
    for _ in range(length - 1):  # the last token of each prefix picks the next row of `step`
        joint = (joint[:, None] * step[torch.arange(joint.numel()) % step.shape[0]]).flatten()
    return joint


def test_speculative_sampling_emits_the_target_distribution():
    """Chi-square of 3-token continuations (64 cells) against the target's exact distribution:
    passes at p > 0.001, while the draft's own samples fail it (so the test can fail)."""
    V, G, rows, new = 4, 3, 20000, 3
    gen = torch.Generator().manual_seed(0)
    target, draft = torch.randn(V, V, generator=gen) * 1.5, torch.randn(V, V, generator=gen) * 1.5
    out = speculative_generate(Markov(target), Markov(draft), [[0]] * rows, new, Sampling(seed=1),
                               Speculation(tokens=G, sequential_depth=1))
    assert 0.2 < out.speculation["acceptance_rate"] < 0.9  # drafts are both accepted and rejected
    cells = torch.tensor([((r[0] * V) + r[1]) * V + r[2] for r in out.tokens])
    observed = torch.bincount(cells, minlength=V ** new).double()
    for logits, holds in ((target, True), (draft, False)):
        expected = _joint(logits, 0, new) * rows
        p_value = chi2.sf(float(((observed - expected) ** 2 / expected).sum()), V ** new - 1)
        assert bool(p_value > 1e-3) is holds, (p_value, holds)

"""check_ranks_agree: ranks that loaded other programs or were asked other things refuse together.
run_rank with a batch size: each batch decodes as it would alone, and the figures add up."""
from __future__ import annotations

import pytest

from planc.errors import RunError
from planc.models.tokenizer import encode
from planc.runtime.threads import run_threads
from planc.runtime.worker import check_ranks_agree, run_rank

PROMPTS = [encode("def fibonacci(n):\n    return"), encode("import os\nimport"), encode("class Tree:\n    def __init__(self")]


class _Loaded:
    def __init__(self, fingerprint: bytes):
        self._fingerprint = fingerprint

    def fingerprint(self) -> bytes:
        return self._fingerprint


def _check(programs: list[bytes], requests: list[dict]) -> None:
    run_threads(lambda comm: check_ranks_agree(comm, _Loaded(programs[comm.rank]), requests[comm.rank]), len(programs))


def test_same_program_and_request_at_different_paths_pass():
    _check([b"p" * 32] * 3, [{"artifact": f"/node{r}/art", "prompts": [[1, 2]], "max_new_tokens": 4} for r in range(3)])


@pytest.mark.parametrize("programs, tokens, what", [
    ([b"a" * 32, b"a" * 32, b"b" * 32], [4, 4, 4], r"compiled program \(manifest sha256\): ranks 0, 1: \w{12}; rank 2: "),
    ([b"a" * 32] * 3, [4, 8, 4], r"request \(prompts, batch_size, max_new_tokens, sampling, kernels\): ranks 0, 2: \w{12}; rank 1: "),
])
def test_a_rank_that_differs_is_named(programs, tokens, what):
    requests = [{"artifact": "/art", "prompts": [[1, 2]], "max_new_tokens": n} for n in tokens]
    with pytest.raises(RunError, match=f"the ranks disagree on the {what}"):
        _check(programs, requests)


def test_a_rank_asked_another_batch_size_is_named():
    requests = [{"artifact": "/art", "prompts": [[1, 2], [3]], "max_new_tokens": 4, "batch_size": b} for b in (1, 1, None)]
    with pytest.raises(RunError, match=r"the ranks disagree on the request .*: ranks 0, 1: \w{12}; rank 2: "):
        _check([b"p" * 32] * 3, requests)


def _rank0(artifact, prompts, **options) -> dict:
    args = {"artifact": str(artifact), "prompts": prompts, "max_new_tokens": 16, "keep_logits": True, **options}
    return run_threads(lambda comm: run_rank(args, comm), 4)[0]


@pytest.mark.parametrize("speculate", [True, False])
def test_batches_decode_as_if_alone_and_their_figures_add_up(compiled, speculate):
    """plans/deepseek_easyspec.yaml on 4 ranks, greedy: batch size 1 gives each prompt's tokens and
    logits alone; counts are the sums of the lone runs' and rates are derived from those sums."""
    artifact = compiled("deepseek_easyspec.yaml", 4)
    alone = [_rank0(artifact, [p], speculate=speculate) for p in PROMPTS]
    batched = _rank0(artifact, PROMPTS, batch_size=1, speculate=speculate)
    assert batched["tokens"] == [a["tokens"][0] for a in alone]
    assert batched["decode_steps"] == sum(a["decode_steps"] for a in alone)
    for row, a in enumerate(alone):  # [B, V] per step; a row whose batch had stopped reads zeros
        steps = len(a["logits"])
        assert [s[row] for s in batched["logits"][:steps]] == [s[0] for s in a["logits"]]
        assert all(not any(s[row]) for s in batched["logits"][steps:])
    if not speculate:
        assert batched["speculation"] is None
        return
    spec = batched["speculation"]
    for count in ("rounds", "drafted", "accepted", "verified", "draft_depth"):
        assert spec[count] == sum(a["speculation"][count] for a in alone), count
    assert len({a["speculation"]["drafted"] for a in alone}) > 1  # an average of rates would differ from the sums' rate
    assert spec["acceptance_rate"] == spec["accepted"] / spec["drafted"]
    assert spec["mean_accepted_length"] == (spec["accepted"] + spec["verified"]) / spec["verified"]
    assert spec["draft_sequential_depth"] == spec["draft_depth"] / (spec["rounds"] * spec["tokens"]) == 4.5
    assert batched["draft_work"]["forwards"] == sum(a["draft_work"]["forwards"] for a in alone)
    assert batched["draft_work"]["draft_s"] == spec["draft_s"]


def test_a_batch_size_of_every_prompt_is_one_batch(compiled):
    artifact = compiled("deepseek_easyspec.yaml", 4)
    one, wider = _rank0(artifact, PROMPTS), _rank0(artifact, PROMPTS, batch_size=len(PROMPTS) + 2)
    assert wider["tokens"] == one["tokens"] and wider["logits"] == one["logits"]
    assert {k: v for k, v in wider["speculation"].items() if not k.endswith("_s")} == \
        {k: v for k, v in one["speculation"].items() if not k.endswith("_s")}

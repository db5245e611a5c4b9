"""check_ranks_agree: ranks that loaded other programs or were asked other things refuse together."""
from __future__ import annotations

import pytest

from planc.errors import RunError
from planc.runtime.threads import run_threads
from planc.runtime.worker import check_ranks_agree


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
    ([b"a" * 32] * 3, [4, 8, 4], r"request \(prompts, max_new_tokens, sampling, kernels\): ranks 0, 2: \w{12}; rank 1: "),
])
def test_a_rank_that_differs_is_named(programs, tokens, what):
    requests = [{"artifact": "/art", "prompts": [[1, 2]], "max_new_tokens": n} for n in tokens]
    with pytest.raises(RunError, match=f"the ranks disagree on the {what}"):
        _check(programs, requests)

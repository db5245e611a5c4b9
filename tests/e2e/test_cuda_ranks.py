"""On a CUDA machine: each plan compiled for one device runs on an NCCL rank on the GPU (weights,
caches and kernels there) and matches transformers' generate() as `planc verify` judges it."""
from __future__ import annotations

import pytest
import torch

from planc.driver import compile
from planc.verify import verify
from tests.conftest import plan_for

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("plan, changes", [("deepseek_mla_tp_ep.yaml", {}), ("deepseek_tpla.yaml", {}),
                                           ("deepseek_moe_semantic.yaml", {}),
                                           ("deepseek_mla_tp_ep.yaml", {"model": {"source": "tiny-deepseek",
                                                                                  "dtype": "bfloat16"}})])
@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_one_nccl_rank_on_the_gpu_matches_transformers(tmp_path, plan, changes, kernels):
    art = compile(None, plan_for(tmp_path, plan, 1, **changes), tmp_path / "art").path
    report = verify(art, max_new_tokens=12, kernels=kernels, timeout_s=300)
    assert report["passed"] and report["token_agreement"] == 1.0, report

"""`planc bench kernels` on CPU: the same probes, under the interpreter at small shapes; each probe's
output is checked against its reference before it is timed, and the figures are derived, not read
back."""
from __future__ import annotations

import pytest
import torch

from planc import cost
from planc.bench import kernels
from planc.errors import PlancError


def test_probes_check_their_outputs_and_derive_their_figures():
    shapes = kernels.CPU_SHAPES
    result = kernels.measure(torch.device("cpu"), shapes, torch.float32)
    decode = result["tpla_decode"]
    assert [(r["strategy"], r["heads_per_rank"], r["latent_per_rank"]) for r in decode] == [
        ("mla_tp", 4, 64), ("tpla g=2", 8, 32), ("tpla g=4", 16, 16)]
    for r in decode:  # cache (C/g + R per token) read once, queries in, outputs out, fp32
        cache = r["batch"] * r["context"] * (r["latent_per_rank"] + shapes["rope"]) * 4
        assert r["bytes"] == cache + r["batch"] * r["heads_per_rank"] * (2 * r["latent_per_rank"] + shapes["rope"]) * 4
        assert r["bandwidth"] == pytest.approx(r["bytes"] / r["seconds"])
        assert r["speedup_vs_mla_tp"] == pytest.approx(decode[0]["seconds"] / r["seconds"])
    for r in result["t3_gemm"]:
        assert (r["in_features_per_rank"], r["out_features"]) == (shapes["k_in"] // shapes["tp"], shapes["n_out"])
        assert r["t3_over_cublas"] == pytest.approx(r["t3_gemm_s"] / r["cublas_s"])
        flops = 2 * r["tokens"] * r["in_features_per_rank"] * r["out_features"]
        assert r["tflops_t3"] == pytest.approx(flops / r["t3_gemm_s"] / 1e12)
    assert [line.split()[0] for line in kernels.table(result).splitlines()[3:6]] == ["mla_tp", "tpla", "tpla"]


def test_gpu_shapes_are_deepseek_v3s():
    m, shapes = cost.mla_model("deepseek-v3"), kernels.gpu_shapes()
    assert (shapes["heads"], shapes["latent"], shapes["rope"], shapes["n_out"]) == (128, 512, 64, 7168)
    assert shapes["k_in"] == m.H * m.V == 16384


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_cuda_the_case_refuses_and_says_where_it_runs():
    with pytest.raises(PlancError, match="on a CUDA device and none is visible here"):
        kernels.run()

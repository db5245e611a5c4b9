"""Model: one program of an artifact on one rank, loading only files the manifest vouches for."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from planc.errors import ArtifactError
from planc.runtime.model import Model
from planc.runtime.threads import ThreadComm, _Exchange


def _rank(rank: int, world: int) -> ThreadComm:
    return ThreadComm(rank, world, _Exchange(world))


def test_the_program_indexes_the_caches_of_the_model_cache(compiled):
    model = Model(compiled("deepseek_mla_tp_ep.yaml", 2), comm=_rank(1, 2))
    cache = model.allocate(2, 5)
    assert model.kv is cache.layers and set(model.kv) == {f"model.layers.{i}.self_attn" for i in range(4)}
    assert model.kv["model.layers.0.self_attn"].ckv_BTC.shape == (2, 5, 64)
    assert model.name == "target" and callable(model.program.forward)


def test_a_rank_checks_its_own_weights_and_not_the_others(compiled, tmp_path):
    copy = Path(shutil.copytree(compiled("deepseek_mla_tp_ep.yaml", 2), tmp_path / "copy"))
    weights = copy / "programs/target/weights/rank1.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    Model(copy, comm=_rank(0, 2))
    with pytest.raises(ArtifactError, match="rank1.safetensors: sha256 .*planc compile"):
        Model(copy, comm=_rank(1, 2))


def test_a_rank_checks_the_kernels_it_loads(compiled, tmp_path):
    copy = Path(shutil.copytree(compiled("deepseek_mla_tp_ep.yaml", 1), tmp_path / "copy"))
    with (copy / "kernels" / "mla_decode_cpu.c").open("a") as f:
        f.write("/* edited */\n")
    Model(copy, kernels="torch")  # runs no kernel file
    with pytest.raises(ArtifactError, match="mla_decode_cpu.c: sha256"):
        Model(copy, kernels="cpu")


def test_refusals_name_the_fix(compiled):
    artifact = compiled("deepseek_mla_tp_ep.yaml", 2)
    with pytest.raises(ArtifactError, match="compiled for 2 devices .* run with --nproc 2"):
        Model(artifact)
    with pytest.raises(ArtifactError, match="no program 'draft'"):
        Model(artifact, "draft", comm=_rank(0, 2))


def test_ranks_run_on_the_cpu_without_nccl_and_kernels_must_suit_the_device(monkeypatch):
    from planc.errors import RunError
    from planc.runtime.comm import Comm
    from planc.runtime.model import _check_kernels

    assert Comm.single().device == torch.device("cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RunError, match="needs TRITON_INTERPRET=1 .* or use --kernels torch"):
        _check_kernels("triton", torch.device("cpu"))
    with pytest.raises(RunError, match="this rank runs on cuda:0; use --kernels triton"):
        _check_kernels("cpu", torch.device("cuda", 0))
    _check_kernels("triton", torch.device("cuda", 0))
    _check_kernels("torch", torch.device("cpu"))


def test_ranks_run_compiled_triton_on_gpus_and_torch_ops_on_cpus_unless_told():
    from planc.runtime.kernel_ops import default_kernels

    assert (default_kernels("nccl"), default_kernels("gloo")) == ("triton", "torch")

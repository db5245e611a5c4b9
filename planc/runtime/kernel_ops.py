"""The op implementations a run can choose (`--kernels`), over the reference ops (`torch`).

- `triton`: GEMM, RMSNorm and decode attention in Triton (compiled on CUDA, interpreted on CPU);
  a T3-fused GEMM (passes/t3.py) makes its pieces with kernels/t3_gemm.py and its tile counters;
  routed experts run as grouped GEMMs over expert-sorted rows (kernels/grouped_gemm.py), and rows
  are permuted by kernels/permute.py (token shuffling, expert sorting).
- `cpu`: MLA decode attention fused for a CPU core in C (kernels/mla_decode_cpu.c, built with the
  machine's C compiler), float32; other dtypes and every other op run the reference.

The kernels are the artifact's own copies (ARTIFACT/kernels/), checked against the manifest's
hashes as they load, so a run uses exactly the code the compile emitted. Prefill attention
(S > 1) stays in PyTorch.
"""
from __future__ import annotations

from types import ModuleType

import torch

from planc.codegen.artifact import kernel_file
from planc.ops import Ops
from planc.runtime import KERNELS
from planc.runtime.artifact import ArtifactDir


def _load(artifact: ArtifactDir, name: str) -> ModuleType:
    return artifact.load_module(kernel_file(f"{name}.py"), f"planc_artifact_kernels.{name}")


class TritonOps(Ops):
    name = "triton"

    def __init__(self, artifact: ArtifactDir):
        k = {name: _load(artifact, name) for name in ("linear", "rmsnorm", "mla_decode", "gqa_decode", "t3_gemm",
                                                      "grouped_gemm", "permute")}
        self._linear, self._rmsnorm = k["linear"].linear, k["rmsnorm"].rmsnorm
        self._mla, self._gqa = k["mla_decode"].mla_decode, k["gqa_decode"].gqa_decode
        self._t3_pieces = k["t3_gemm"].Pieces
        self._grouped, self._permute = k["grouped_gemm"].grouped_gemm, k["permute"]

    def linear(self, x, w, b=None):
        y = self._linear(x, w)
        return y if b is None else y + b

    def rmsnorm(self, x, w, eps, offset=0.0):
        return self._rmsnorm(x, w, eps) if not offset else super().rmsnorm(x, w, eps, offset)

    def grouped_linear(self, x_MK, w_GNK, offsets):
        return self._grouped(x_MK, w_GNK, offsets)

    def gather_rows(self, x_ND, idx_M):
        return self._permute.gather_rows(x_ND, idx_M)

    def scatter_rows(self, y_MD, idx_M, num_rows):
        return self._permute.scatter_rows(y_MD, idx_M, num_rows)

    def t3_pieces(self, x_MK, w_NK, b_N, rank, world, pieces):
        return self._t3_pieces(x_MK, w_NK, b_N, rank, world, pieces)

    def mla_decode(self, q_lat_BHC, q_pe_BHR, ckv_BTC, kpe_BTR, key_mask_BT, scale):
        return self._mla(q_lat_BHC.contiguous(), q_pe_BHR.contiguous(), ckv_BTC, kpe_BTR, key_mask_BT, scale)

    def gqa_decode(self, q_BHD, k_BTGD, v_BTGD, key_mask_BT, scale, softcap=None, sinks_H=None):
        return self._gqa(q_BHD.contiguous(), k_BTGD, v_BTGD, key_mask_BT, scale, softcap=softcap, sinks=sinks_H)


class CpuOps(Ops):
    name = "cpu"

    def __init__(self, artifact: ArtifactDir):
        artifact.path(kernel_file("mla_decode_cpu.c"))  # the launcher builds the C source beside it
        self._mla = _load(artifact, "mla_decode_cpu").mla_decode_cpu

    def mla_decode(self, q_lat_BHC, q_pe_BHR, ckv_BTC, kpe_BTR, key_mask_BT, scale):
        if ckv_BTC.dtype != torch.float32:
            return super().mla_decode(q_lat_BHC, q_pe_BHR, ckv_BTC, kpe_BTR, key_mask_BT, scale)
        return self._mla(q_lat_BHC, q_pe_BHR, ckv_BTC, kpe_BTR, key_mask_BT, scale)


def make_ops(kernels: str, artifact: ArtifactDir) -> Ops:
    if kernels == "torch":
        return Ops()
    if kernels == "triton":
        return TritonOps(artifact)
    if kernels == "cpu":
        return CpuOps(artifact)
    raise ValueError(f"--kernels {kernels!r}: choose one of {', '.join(KERNELS)}")


def default_kernels(backend: str | None) -> str:
    """The kernels a rank runs unless told: compiled Triton on GPU ranks (NCCL), torch ops on CPU ranks."""
    return "triton" if backend == "nccl" else "torch"

"""planc.kernels.mla_decode against its reference, and the reference against an fp64 softmax."""
from __future__ import annotations

import planc  # noqa: F401  (selects TRITON_INTERPRET=1 without CUDA, before any kernel is decorated)

import math

import pytest
import torch

from planc.kernels.mla_decode import mla_decode, mla_decode_reference
from tests.kernels import JUNK, _mask


def _inputs(b, h, t, c, r, kind, dtype=torch.float32, device="cpu", seed=0, junk=JUNK):
    gen = torch.Generator().manual_seed(seed)
    q_lat, q_pe = torch.randn(b, h, c, generator=gen), torch.randn(b, h, r, generator=gen)
    ckv, kpe = torch.randn(b, t, c, generator=gen), torch.randn(b, t, r, generator=gen)
    mask = _mask(b, t, kind, gen)
    ckv[~mask], kpe[~mask] = junk, junk
    cast = dict(device=device, dtype=dtype)
    return q_lat.to(**cast), q_pe.to(**cast), ckv.to(**cast), kpe.to(**cast), mask.to(device)


CASES = [  # (B, H, T, C, R, mask kind, num_splits)
    (1, 1, 1, 16, 16, "full", None),
    (1, 3, 1, 32, 16, "full", 4),
    (2, 4, 37, 32, 16, "holes", None),
    (3, 5, 64, 24, 8, "left_pad", 3),  # C, R not powers of two
    (2, 16, 48, 64, 32, "left_pad", 1),
    (3, 20, 40, 32, 16, "empty_row", 2),  # H > 16: two head blocks
    (2, 2, 64, 16, 16, "holes", 4),
]


@pytest.mark.parametrize("b, h, t, c, r, kind, num_splits", CASES)
def test_mla_decode_fp32_matches_reference(b, h, t, c, r, kind, num_splits):
    q_lat, q_pe, ckv, kpe, mask = _inputs(b, h, t, c, r, kind)
    scale = 1 / math.sqrt(c + r)
    out = mla_decode(q_lat, q_pe, ckv, kpe, mask, scale, num_splits=num_splits)
    assert out.shape == (b, h, c) and out.dtype == torch.float32
    # Same math in fp32; only summation order and the split merge differ (~1e-7 on O(1) outputs).
    torch.testing.assert_close(out, mla_decode_reference(q_lat, q_pe, ckv, kpe, mask, scale), rtol=1e-5, atol=1e-5)
    if kind == "empty_row":
        assert torch.equal(out[0], torch.zeros_like(out[0]))


def test_mla_decode_ignores_nan_in_masked_slots():
    q_lat, q_pe, ckv, kpe, mask = _inputs(2, 4, 33, 32, 16, "holes", seed=1, junk=float("nan"))
    out = mla_decode(q_lat, q_pe, ckv, kpe, mask, 0.2, num_splits=2)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, mla_decode_reference(q_lat, q_pe, ckv, kpe, mask, 0.2), rtol=1e-5, atol=1e-5)


def test_mla_decode_split_count_does_not_change_result():
    q_lat, q_pe, ckv, kpe, mask = _inputs(2, 4, 64, 32, 16, "left_pad", seed=2)
    outs = [mla_decode(q_lat, q_pe, ckv, kpe, mask, 0.3, num_splits=n) for n in (1, 2, 4)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mla_decode_low_precision(dtype):
    q_lat, q_pe, ckv, kpe, mask = _inputs(2, 8, 40, 32, 16, "holes", dtype=dtype, seed=3)
    out = mla_decode(q_lat, q_pe, ckv, kpe, mask, 0.2, num_splits=2)
    assert out.dtype == dtype
    # Interpreter: fp32 dots on the same upcast inputs as the reference, then one rounding to
    # `dtype` on each side, so outputs agree to one ulp (2^-7 relative for bf16, 2^-10 for fp16).
    ref = mla_decode_reference(q_lat, q_pe, ckv, kpe, mask, 0.2)
    rtol = 2**-7 if dtype == torch.bfloat16 else 2**-10
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=1e-5)


def _naive_fp64(q_lat, q_pe, ckv, kpe, mask, scale):
    """Explicit per-(b, h) softmax over the valid slots with the key [ckv | kpe], in fp64."""
    b, h, c = q_lat.shape
    out = torch.zeros(b, h, c, dtype=torch.float64)
    for bi in range(b):
        idx = mask[bi].nonzero().flatten().tolist()
        if not idx:
            continue
        keys = torch.cat([ckv[bi, idx], kpe[bi, idx]], dim=-1).double()
        for hi in range(h):
            q = torch.cat([q_lat[bi, hi], q_pe[bi, hi]]).double()
            logits = [scale * float(q @ keys[j]) for j in range(len(idx))]
            top = max(logits)
            weights = [math.exp(x - top) for x in logits]
            total = sum(weights)
            for j, t in enumerate(idx):
                out[bi, hi] += (weights[j] / total) * ckv[bi, t].double()
    return out


@pytest.mark.parametrize("kind", ["holes", "left_pad", "empty_row"])
def test_mla_decode_reference_matches_naive_fp64(kind):
    q_lat, q_pe, ckv, kpe, mask = _inputs(2, 3, 12, 16, 8, kind, seed=4)
    ref = mla_decode_reference(q_lat, q_pe, ckv, kpe, mask, 0.25)
    torch.testing.assert_close(ref.double(), _naive_fp64(q_lat, q_pe, ckv, kpe, mask, 0.25), rtol=1e-5, atol=1e-6)


def test_mla_decode_rejects_bad_inputs():
    q_lat, q_pe, ckv, kpe, mask = _inputs(2, 4, 8, 16, 16, "full")
    with pytest.raises(ValueError, match="inconsistent shapes"):
        mla_decode(q_lat, q_pe, ckv[:, :, :8], kpe, mask, 0.1)
    with pytest.raises(ValueError, match="torch.bool"):
        mla_decode(q_lat, q_pe, ckv, kpe, mask.int(), 0.1)
    with pytest.raises(ValueError, match="one dtype"):
        mla_decode(q_lat, q_pe.half(), ckv, kpe, mask, 0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_decode_cuda_large(dtype):
    q_lat, q_pe, ckv, kpe, mask = _inputs(4, 16, 1500, 512, 64, "left_pad", dtype=dtype, device="cuda", seed=5)
    scale = 1 / math.sqrt(192)
    out = mla_decode(q_lat, q_pe, ckv, kpe, mask, scale)
    ref = mla_decode_reference(q_lat, q_pe, ckv, kpe, mask, scale)
    # fp32: ieee dots, only summation order differs. bf16: p is rounded to bf16 for the p.V dot
    # (~2^-9 relative per weight) and the output once more, so allow two bf16 ulps.
    rtol, atol = (1e-4, 1e-5) if dtype == torch.float32 else (2**-6, 2e-3)
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol)

"""planc.kernels.gqa_decode against its reference, and the reference against an fp64 softmax."""
from __future__ import annotations

import planc  # noqa: F401  (selects TRITON_INTERPRET=1 without CUDA, before any kernel is decorated)

import math

import pytest
import torch

from planc.kernels.gqa_decode import gqa_decode, gqa_decode_reference
from tests.kernels import JUNK, _mask


def _inputs(b, hq, hkv, t, d, kind, dtype=torch.float32, device="cpu", seed=0, junk=JUNK):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, d, generator=gen)
    k, v = torch.randn(b, t, hkv, d, generator=gen), torch.randn(b, t, hkv, d, generator=gen)
    mask = _mask(b, t, kind, gen)
    k[~mask], v[~mask] = junk, junk
    cast = dict(device=device, dtype=dtype)
    return q.to(**cast), k.to(**cast), v.to(**cast), mask.to(device)


CASES = [  # (B, Hq, Hkv, T, D, mask kind, num_splits)
    (1, 1, 1, 1, 16, "full", None),
    (1, 4, 2, 1, 32, "full", 3),
    (2, 8, 2, 37, 32, "holes", None),
    (3, 6, 3, 64, 24, "left_pad", 3),  # D not a power of two
    (2, 4, 4, 48, 64, "left_pad", 1),  # plain MHA
    (2, 40, 2, 40, 16, "empty_row", 2),  # G = 20 > 16: two head blocks per kv head
    (2, 12, 1, 64, 8, "holes", 4),  # MQA, D < 16
]


@pytest.mark.parametrize("b, hq, hkv, t, d, kind, num_splits", CASES)
def test_gqa_decode_fp32_matches_reference(b, hq, hkv, t, d, kind, num_splits):
    q, k, v, mask = _inputs(b, hq, hkv, t, d, kind)
    scale = 1 / math.sqrt(d)
    out = gqa_decode(q, k, v, mask, scale, num_splits=num_splits)
    assert out.shape == (b, hq, d) and out.dtype == torch.float32
    # Same math in fp32; only summation order and the split merge differ (~1e-7 on O(1) outputs).
    torch.testing.assert_close(out, gqa_decode_reference(q, k, v, mask, scale), rtol=1e-5, atol=1e-5)
    if kind == "empty_row":
        assert torch.equal(out[0], torch.zeros_like(out[0]))


def test_gqa_decode_head_mapping():
    # Each kv head's values are a constant = its index, so out[b, h] must equal h // G everywhere.
    q, k, _, mask = _inputs(1, 6, 3, 20, 16, "holes", seed=1)
    v = torch.arange(3, dtype=torch.float32)[None, None, :, None].expand(1, 20, 3, 16).contiguous()
    out = gqa_decode(q, k, v, mask, 0.25, num_splits=2)
    expected = (torch.arange(6) // 2).float()[None, :, None].expand_as(out)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_gqa_decode_ignores_nan_in_masked_slots():
    q, k, v, mask = _inputs(2, 4, 2, 33, 32, "holes", seed=2, junk=float("nan"))
    out = gqa_decode(q, k, v, mask, 0.2, num_splits=2)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, gqa_decode_reference(q, k, v, mask, 0.2), rtol=1e-5, atol=1e-5)


def test_gqa_decode_strided_cache():
    # A cache view that keeps every other kv head: non-contiguous head and slot strides.
    q, k_full, v_full, mask = _inputs(2, 4, 4, 30, 16, "left_pad", seed=3)
    k, v = k_full[:, :, ::2], v_full[:, :, ::2]
    out = gqa_decode(q, k, v, mask, 0.3, num_splits=2)
    torch.testing.assert_close(out, gqa_decode_reference(q, k, v, mask, 0.3), rtol=1e-5, atol=1e-5)


def test_gqa_decode_split_count_does_not_change_result():
    q, k, v, mask = _inputs(2, 4, 2, 64, 32, "left_pad", seed=4)
    outs = [gqa_decode(q, k, v, mask, 0.3, num_splits=n) for n in (1, 2, 4)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gqa_decode_low_precision(dtype):
    q, k, v, mask = _inputs(2, 8, 2, 40, 32, "holes", dtype=dtype, seed=5)
    out = gqa_decode(q, k, v, mask, 0.2, num_splits=2)
    assert out.dtype == dtype
    # Interpreter: fp32 dots on the same upcast inputs as the reference, then one rounding to
    # `dtype` on each side, so outputs agree to one ulp (2^-7 relative for bf16, 2^-10 for fp16).
    ref = gqa_decode_reference(q, k, v, mask, 0.2)
    rtol = 2**-7 if dtype == torch.bfloat16 else 2**-10
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=1e-5)


def _naive_fp64(q, k, v, mask, scale, softcap=None, sinks=None):
    """Explicit per-(b, h) softmax over the valid slots, kv head h // G, in fp64 (logits capped
    as softcap · tanh(logits / softcap) where softcap is given)."""
    b, hq, d = q.shape
    group = hq // k.shape[2]
    out = torch.zeros(b, hq, d, dtype=torch.float64)
    for bi in range(b):
        idx = mask[bi].nonzero().flatten().tolist()
        for hi in range(hq if idx else 0):
            logits = [scale * float(q[bi, hi].double() @ k[bi, t, hi // group].double()) for t in idx]
            if softcap is not None:
                logits = [softcap * math.tanh(x / softcap) for x in logits]
            sink = [] if sinks is None else [float(sinks[hi])]
            top = max(logits + sink)
            weights = [math.exp(x - top) for x in logits]
            total = sum(weights) + sum(math.exp(s - top) for s in sink)
            for w, t in zip(weights, idx):
                out[bi, hi] += (w / total) * v[bi, t, hi // group].double()
    return out


@pytest.mark.parametrize("kind", ["holes", "left_pad", "empty_row"])
def test_gqa_decode_reference_matches_naive_fp64(kind):
    q, k, v, mask = _inputs(2, 4, 2, 12, 8, kind, seed=6)
    ref = gqa_decode_reference(q, k, v, mask, 0.35)
    torch.testing.assert_close(ref.double(), _naive_fp64(q, k, v, mask, 0.35), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind, softcap", [("holes", 2.0), ("empty_row", 50.0), ("left_pad", 0.5)])
def test_gqa_decode_caps_the_scaled_logits(kind, softcap):
    """Gemma 2's attention: softcap · tanh(scale q·k / softcap), then the softmax; a small cap
    changes the result (the test would fail with the cap left out)."""
    q, k, v, mask = _inputs(2, 8, 2, 37, 32, kind, seed=7)
    q = q * 3.0  # logits of several units, where the cap bends them
    out = gqa_decode(q, k, v, mask, 0.3, num_splits=2, softcap=softcap)
    ref = gqa_decode_reference(q, k, v, mask, 0.3, softcap=softcap)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    naive = _naive_fp64(q, k, v, mask, 0.3, softcap=softcap)
    torch.testing.assert_close(ref.double(), naive, rtol=1e-5, atol=1e-6)
    if softcap < 10:
        assert (ref - gqa_decode_reference(q, k, v, mask, 0.3)).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["holes", "empty_row", "left_pad"])
def test_gqa_decode_sinks_join_each_rows_normalizer(kind):
    """gpt-oss: sinks[h] is one more logit in head h's softmax, its probability dropped; merged
    once across the sequence splits (not once per split)."""
    q, k, v, mask = _inputs(2, 8, 2, 37, 32, kind, seed=8)
    sinks = torch.linspace(-2.0, 3.0, 8)
    out = gqa_decode(q, k, v, mask, 0.3, num_splits=3, sinks=sinks)
    ref = gqa_decode_reference(q, k, v, mask, 0.3, sinks=sinks)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref.double(), _naive_fp64(q, k, v, mask, 0.3, sinks=sinks), rtol=1e-5, atol=1e-6)
    assert (ref - gqa_decode_reference(q, k, v, mask, 0.3)).abs().max() > 1e-2


def test_gqa_decode_rejects_bad_inputs():
    q, k, v, mask = _inputs(2, 6, 3, 8, 16, "full")
    with pytest.raises(ValueError, match="multiple of Hkv"):
        gqa_decode(q[:, :5], k, v, mask, 0.1)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        gqa_decode(q, k, v[:, :4], mask, 0.1)
    with pytest.raises(ValueError, match="torch.bool"):
        gqa_decode(q, k, v, mask.float(), 0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gqa_decode_cuda_large(dtype):
    q, k, v, mask = _inputs(4, 32, 8, 1500, 128, "left_pad", dtype=dtype, device="cuda", seed=7)
    scale = 1 / math.sqrt(128)
    out = gqa_decode(q, k, v, mask, scale)
    ref = gqa_decode_reference(q, k, v, mask, scale)
    # fp32: ieee dots, only summation order differs. bf16: p is rounded to bf16 for the p.V dot
    # (~2^-9 relative per weight) and the output once more, so allow two bf16 ulps.
    rtol, atol = (1e-4, 1e-5) if dtype == torch.float32 else (2**-6, 2e-3)
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol)

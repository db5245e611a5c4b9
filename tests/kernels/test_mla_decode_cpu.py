"""planc.kernels.mla_decode_cpu (the C kernel, built with this machine's compiler) against the
reference, on both of its code paths (8-wide intrinsics and portable C), and its build cache."""
from __future__ import annotations

import math
import shutil

import pytest
import torch

from planc.kernels import mla_decode_cpu as cpu
from planc.kernels.mla_decode import mla_decode_reference
from tests.kernels.test_mla_decode import _inputs

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")

CASES = [  # (B, H, T, C, R, mask kind): C, R multiples of 8 take the intrinsics path, others plain C
    (1, 1, 1, 16, 16, "full"),
    (2, 4, 37, 32, 16, "holes"),  # 37: a partial chunk and a partial logits block
    (3, 2, 200, 64, 16, "left_pad"),  # several chunks, rows starting at different slots
    (2, 16, 130, 64, 32, "holes"),  # 8 heads per logits block, 2 chunks + 2 slots
    (3, 6, 70, 40, 8, "empty_row"),  # H = 6: 2-head logits blocks; row 0 attends to nothing
    (2, 3, 50, 24, 8, "holes"),  # odd H: 1-head blocks, 8 slots per block
    (3, 5, 64, 20, 6, "left_pad"),  # C, R not multiples of 8: the portable path
]


@pytest.mark.parametrize("b, h, t, c, r, kind", CASES)
def test_matches_reference(b, h, t, c, r, kind):
    q_lat, q_pe, ckv, kpe, mask = _inputs(b, h, t, c, r, kind)
    scale = 1 / math.sqrt(c + r)
    out = cpu.mla_decode_cpu(q_lat, q_pe, ckv, kpe, mask, scale)
    ref = mla_decode_reference(q_lat, q_pe, ckv, kpe, mask, scale)
    assert out.shape == (b, h, c) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_masked_slots_never_read():
    """NaN in every masked slot: a kernel that loads one (even to multiply it by zero) returns NaN."""
    q_lat, q_pe, ckv, kpe, mask = _inputs(2, 4, 100, 32, 16, "left_pad", junk=float("nan"))
    out = cpu.mla_decode_cpu(q_lat, q_pe, ckv, kpe, mask, 0.2)
    torch.testing.assert_close(out, mla_decode_reference(q_lat, q_pe, ckv.nan_to_num(), kpe.nan_to_num(), mask, 0.2))


def test_cache_views_and_large_logits():
    """A [:, :T] view of a larger cache (the runtime's shape), and logits far from zero (the online
    softmax's rescaling must keep exp finite)."""
    q_lat, q_pe, ckv, kpe, mask = _inputs(2, 4, 300, 32, 16, "holes", seed=3)
    ckv_full, kpe_full = torch.zeros(2, 512, 32), torch.zeros(2, 512, 16)
    ckv_full[:, :300], kpe_full[:, :300] = ckv * 8, kpe * 8
    out = cpu.mla_decode_cpu(q_lat * 8, q_pe, ckv_full[:, :300], kpe_full[:, :300], mask, 1.0)
    torch.testing.assert_close(out, mla_decode_reference(q_lat * 8, q_pe, ckv * 8, kpe * 8, mask, 1.0),
                               rtol=1e-4, atol=1e-4)


def test_rejects_other_dtypes():
    q_lat, q_pe, ckv, kpe, mask = (x.double() if x.is_floating_point() else x
                                   for x in _inputs(1, 2, 8, 16, 16, "full"))
    with pytest.raises(ValueError, match="float32 only"):
        cpu.mla_decode_cpu(q_lat, q_pe, ckv, kpe, mask, 0.1)


def test_build_is_cached_per_shape(tmp_path, monkeypatch):
    monkeypatch.setenv("PLANC_CACHE", str(tmp_path))
    cpu._function.cache_clear()
    try:
        cpu.mla_decode_cpu(*_inputs(1, 2, 8, 16, 8, "full"), 0.1)
        built = sorted(p.name for p in (tmp_path / "cpu_kernels").iterdir())
        assert len(built) == 1 and built[0].startswith("mla_decode_h2_c16_r8_") and built[0].endswith(".so")
        mtime = (tmp_path / "cpu_kernels" / built[0]).stat().st_mtime_ns
        cpu._function.cache_clear()  # a new process: loads the cached object, does not rebuild
        cpu.mla_decode_cpu(*_inputs(1, 2, 8, 16, 8, "full"), 0.1)
        assert (tmp_path / "cpu_kernels" / built[0]).stat().st_mtime_ns == mtime
        assert len(list((tmp_path / "cpu_kernels").iterdir())) == 1
    finally:
        cpu._function.cache_clear()


def test_missing_compiler_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PLANC_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-cc")
    cpu._function.cache_clear()
    try:
        with pytest.raises(cpu.BuildError, match=r"'no-such-cc' .* not on PATH.*--kernels torch"):
            cpu.mla_decode_cpu(*_inputs(1, 2, 8, 16, 8, "full"), 0.1)
    finally:
        cpu._function.cache_clear()

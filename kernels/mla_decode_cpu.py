"""Launcher for mla_decode_cpu.c: MLA decode attention fused for a CPU core (float32).

The C source beside this file is built with the machine's C compiler (`$CC`, default `cc`) into
one shared object per (heads, latent width, rope width), specialized and tuned for this CPU
(`-O3 -march=native`), and cached under `$PLANC_CACHE` (default ~/.cache/planc) by a hash of the
source, the flags, the shape, the compiler and the CPU. Builds are atomic (temporary file, then
rename), so ranks starting together may race harmlessly. The first call for a shape pays the
build (well under a second); later calls and later processes load the cached object.

Same contract and reference as mla_decode.py.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

from planc.kernels.mla_inputs import check_shapes

SOURCE = Path(__file__).with_suffix(".c")
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fPIC", "-shared", "-std=c11")


class BuildError(RuntimeError):
    """The C compiler is missing or rejected the kernel."""


def cache_dir() -> Path:
    return Path(os.environ.get("PLANC_CACHE") or Path.home() / ".cache" / "planc") / "cpu_kernels"


def compiler() -> str:
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise BuildError(f"--kernels cpu builds {SOURCE.name} with a C compiler, and {cc!r} (from $CC, default cc) "
                         f"is not on PATH; install one (e.g. gcc) or run with --kernels torch")
    return cc


@cache
def _cpu_id() -> str:
    try:
        flags = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")]
    except OSError:
        flags = []
    return f"{platform.machine()} {platform.processor()} {flags[0] if flags else ''}"


@cache
def _compiler_id(cc: str) -> str:
    return subprocess.run([cc, "--version"], capture_output=True, text=True).stdout


@cache
def _function(heads: int, latent: int, rope: int):
    cc = compiler()
    source = SOURCE.read_bytes()
    defines = (f"-DKH={heads}", f"-DKC={latent}", f"-DKR={rope}")
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS + defines).encode(), _compiler_id(cc).encode(),
                                     _cpu_id().encode()])).hexdigest()[:20]
    target = cache_dir() / f"mla_decode_h{heads}_c{latent}_r{rope}_{key}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run([cc, *FLAGS, *defines, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
            if done.returncode != 0:
                raise BuildError(f"building {SOURCE.name} for heads={heads}, latent={latent}, rope={rope} failed "
                                 f"({cc} exited {done.returncode}):\n{done.stderr[-2000:]}\n"
                                 f"run with --kernels torch to use the PyTorch reference instead")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    fn = ctypes.CDLL(str(target)).mla_decode_f32
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 7 + [ctypes.c_float]
    return fn


def mla_decode_cpu(q_lat: torch.Tensor, q_pe: torch.Tensor, ckv: torch.Tensor, kpe: torch.Tensor,
                   key_mask: torch.Tensor, scale: float) -> torch.Tensor:
    """MLA decode attention on CPU float32 tensors; returns out [B, H, C].

    q_lat [B, H, C], q_pe [B, H, R], ckv [B, T, C], kpe [B, T, R] (views of a larger cache are
    fine: only the last dimension must be contiguous), key_mask [B, T] bool.
    """
    _check(q_lat, q_pe, ckv, kpe, key_mask)
    b, h, c = q_lat.shape
    t, r = ckv.shape[1], kpe.shape[2]
    out = torch.empty(b, h, c, dtype=torch.float32)
    if b * h * c == 0:
        return out
    q_lat, q_pe = q_lat.contiguous(), q_pe.contiguous()
    ckv, kpe = (x if x.stride(-1) == 1 else x.contiguous() for x in (ckv, kpe))
    mask = key_mask.view(torch.uint8)
    mask = mask if mask.stride(-1) == 1 else mask.contiguous()
    _function(h, c, r)(q_lat.data_ptr(), q_pe.data_ptr(), ckv.data_ptr(), kpe.data_ptr(), mask.data_ptr(),
                       out.data_ptr(), b, t, ckv.stride(0), ckv.stride(1), kpe.stride(0), kpe.stride(1),
                       mask.stride(0), float(scale))
    return out


def _check(q_lat, q_pe, ckv, kpe, key_mask) -> None:
    check_shapes("mla_decode_cpu", q_lat, q_pe, ckv, kpe, key_mask)
    if {x.dtype for x in (q_lat, q_pe, ckv, kpe)} != {torch.float32}:
        raise ValueError(f"mla_decode_cpu: float32 only; got {q_lat.dtype}, {q_pe.dtype}, {ckv.dtype}, {kpe.dtype}")
    if q_lat.device.type != "cpu":
        raise ValueError("mla_decode_cpu: inputs must be CPU tensors")

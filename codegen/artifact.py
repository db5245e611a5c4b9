"""Write an artifact directory atomically: build it beside the target, then rename.

A failed compile leaves nothing behind, and an existing artifact is replaced only once the new
one is complete.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

import planc.kernels
from planc.errors import ArtifactError

# split_merge is host code, imported from planc; mla_decode_cpu.py builds the .c beside it
KERNEL_FILES = ("linear.py", "rmsnorm.py", "mla_decode.py", "gqa_decode.py", "mla_decode_cpu.py", "mla_decode_cpu.c")


def kernel_sources() -> dict[str, str]:
    root = Path(planc.kernels.__file__).parent
    return {name: (root / name).read_text() for name in KERNEL_FILES}


def write_artifact(out: Path, *, manifest: dict, program: str, report: dict,
                   rank_tensors: list[dict[str, torch.Tensor]] | None) -> Path:
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; an artifact is meant to be shared
    try:
        _fill(tmp, manifest, program, report, rank_tensors)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _fill(tmp: Path, manifest: dict, program: str, report: dict, rank_tensors) -> None:
    (tmp / "program.py").write_text(program)
    (tmp / "kernels").mkdir()
    for name, source in kernel_sources().items():
        (tmp / "kernels" / name).write_text(source)
    if rank_tensors is not None:
        (tmp / "weights").mkdir()
        for rank, tensors in enumerate(rank_tensors):
            save_file(_unaliased(tensors), tmp / "weights" / f"rank{rank}.safetensors")
    (tmp / "report.json").write_text(json.dumps(report, indent=1))
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))  # last: its presence marks completeness


def _unaliased(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses views of one storage (e.g. a head slice that is the whole tensor)."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.detach().clone() if ptr in seen else t.detach().contiguous()
        seen.add(ptr)
    return out


def _swap_in(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    if not (out / "manifest.json").is_file():
        raise ArtifactError(f"{out} exists and is not a planc artifact; refusing to replace it (choose another -o)")
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / "artifact")
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)

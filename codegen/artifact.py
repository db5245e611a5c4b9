"""Write an artifact directory atomically: build it beside the target, then swap it in.

A failed, interrupted or killed compile leaves the old artifact (or nothing) at the output path,
and a reader never finds the path empty; an existing artifact is replaced only once the new one
is complete (planc.codegen.replace). Layout (format 3):

    manifest.json                              what was compiled, a sha256 per other file, its own sha256
    report.json
    kernels/*.py, kernels/*.c
    programs/<name>/program.py                 one per model the artifact runs (target, draft)
    programs/<name>/weights/rank<r>.safetensors  (absent for a --meta dry run)
    tokenizer/*                                the checkpoint's tokenizer files, copied (when it has them)

Every file but manifest.json is listed in manifest["files"] with its sha256, and
manifest["manifest_sha256"] is the sha256 of the rest of the manifest, so a reader can refuse a
file that went missing, was truncated or was edited, and a manifest edited to say something else
than what was compiled (planc.runtime.artifact).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

import planc.kernels
from planc import progress
from planc.codegen.replace import staged
from planc.errors import ArtifactError

FORMAT_VERSION = 3
MANIFEST = "manifest.json"
MANIFEST_DIGEST = "manifest_sha256"
REPORT = "report.json"
TOKENIZER_DIR = "tokenizer"
# split_merge is host code, imported from planc; mla_decode_cpu.py builds the .c beside it
KERNEL_FILES = ("linear.py", "rmsnorm.py", "mla_decode.py", "gqa_decode.py", "mla_decode_cpu.py", "mla_decode_cpu.c",
                "t3_gemm.py", "grouped_gemm.py", "permute.py")
_CHUNK = 1 << 20  # weights can be large: hash them a MiB at a time


@dataclass(frozen=True)
class Program:
    """One model of an artifact: its generated source, per-layer cache specs, per-rank weights."""

    source: str
    caches: dict
    rank_tensors: list[dict[str, torch.Tensor]] | None  # None: a --meta dry run
    dtype: str | None = None  # the program's weights and caches, when not the manifest's "dtype"


def program_file(name: str) -> str:
    return f"programs/{name}/program.py"


def weights_file(name: str, rank: int) -> str:
    return f"programs/{name}/weights/rank{rank}.safetensors"


def kernel_file(name: str) -> str:
    return f"kernels/{name}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def kernel_sources() -> dict[str, str]:
    root = Path(planc.kernels.__file__).parent
    return {name: (root / name).read_text() for name in KERNEL_FILES}


def write_artifact(out: Path, *, manifest: dict, programs: dict[str, Program], report: dict,
                   tokenizer: dict[str, Path] | None = None) -> Path:
    """Write programs, kernels, report and a copy of the `tokenizer` files (name -> source path)
    under `out`; manifest gains format_version, programs, files."""
    for name in programs:
        if not name.isidentifier():
            raise ValueError(f"program name {name!r} must be an identifier (it names a directory)")
    for name in tokenizer or {}:
        if Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"tokenizer file name {name!r} must be a plain file name")
    out = Path(out).resolve()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with staged(out, _check_replaceable) as tmp:
            _fill(tmp, manifest, programs, report, tokenizer or {})
    except OSError as exc:  # a read-only or full filesystem, a parent that is a file
        raise ArtifactError(f"{out}: cannot write the artifact there ({exc.strerror or exc}: {exc.filename}); "
                            "choose another -o") from None
    return out


def _check_replaceable(old: Path) -> None:
    if not (old / MANIFEST).is_file():
        raise ArtifactError(f"{old} exists and is not a planc artifact; refusing to replace it (choose another -o)")


def json_text(data: dict) -> str:
    """report.json's and manifest.json's text: one line per top-level key, each value as compact
    JSON. A deep model's report holds every intermediate graph, and json's C encoder writes only
    without indentation (an indent sends it through the pure-Python encoder)."""
    lines = [f"{json.dumps(key)}: {json.dumps(value, separators=(',', ':'))}" for key, value in data.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON, its own digest left out."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _fill(tmp: Path, manifest: dict, programs: dict[str, Program], report: dict, tokenizer: dict[str, Path]) -> None:
    for name, program in programs.items():
        _write_program(tmp, name, program)
    if tokenizer:
        (tmp / TOKENIZER_DIR).mkdir()
    for name, source in tokenizer.items():
        shutil.copyfile(source, tmp / TOKENIZER_DIR / name)
    (tmp / "kernels").mkdir()
    for name, source in kernel_sources().items():
        (tmp / kernel_file(name)).write_text(source)
    (tmp / REPORT).write_text(json_text(report))
    manifest = {**manifest, "format_version": FORMAT_VERSION,
                "programs": {name: {"caches": p.caches, **({"dtype": p.dtype} if p.dtype else {})}
                             for name, p in programs.items()},
                "files": _hashes(tmp)}
    manifest[MANIFEST_DIGEST] = manifest_digest(manifest)
    (tmp / MANIFEST).write_text(json_text(manifest))  # last: its presence marks completeness


def _write_program(tmp: Path, name: str, program: Program) -> None:
    source = tmp / program_file(name)
    source.parent.mkdir(parents=True)
    source.write_text(program.source)
    ranks = program.rank_tensors or []
    for rank, tensors in progress.track(enumerate(ranks), f"write {name} weights", "ranks", total=len(ranks)):
        path = tmp / weights_file(name, rank)
        path.parent.mkdir(exist_ok=True)
        save_file(_unaliased(tensors), path)


def _hashes(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in files}


def _unaliased(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses views of one storage (e.g. a head slice that is the whole tensor)."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.detach().clone() if ptr in seen else t.detach().contiguous()
        seen.add(ptr)
    return out

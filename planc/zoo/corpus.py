"""The training corpus of the bundled models: the installed CPython standard library's sources.

Every machine of this kind has the same Python (3.11.7), so the corpus needs no download.

Files: every `*.py` under sysconfig's `stdlib` directory, except paths with a directory part in
EXCLUDED_DIRS (third-party packages, the test suites, IDLE, lib2to3, generated codec tables and
pydoc topics, caches), the `config-*` build directory, and generated `_sysconfigdata*.py`.
Sorted by relative POSIX path. On 3.11.7: 475 files, 8.85 MB.

Split by file: bucket = first 4 bytes of sha256(relative path), big-endian, mod 100;
bucket < 5 is held-out, 5 <= bucket < 10 is calibration (profiling and PCA passes), the rest
train. A file never straddles splits. On 3.11.7: train 433 files (8.03 M tokens), held-out 21
(466 K), calibration 21 (361 K).

Tokens: byte-level (see planc.models.tokenizer); each file is [BOS] + its raw bytes + [EOS], and a
split's stream is its files concatenated in path order.

`fingerprint()` hashes the file list and sizes; the weights manifest records it, and evaluation
warns when the installed Python's corpus differs from the one the bundled models saw.
"""
from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from planc.models.registry import BOS_ID, EOS_ID

SPLITS = ("train", "heldout", "calibration")
EXCLUDED_DIRS = frozenset({
    "site-packages", "dist-packages", "__pycache__", "test", "tests", "idlelib", "lib2to3",
    "encodings", "pydoc_data",
})
HELDOUT_BUCKETS = range(0, 5)
CALIBRATION_BUCKETS = range(5, 10)


@dataclass(frozen=True)
class CorpusFile:
    rel: str  # POSIX path relative to the stdlib directory
    size: int
    split: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def included(rel: Path) -> bool:
    dirs = rel.parts[:-1]
    if any(d in EXCLUDED_DIRS for d in dirs) or (dirs and dirs[0].startswith("config-")):
        return False
    return rel.suffix == ".py" and not rel.name.startswith("_sysconfigdata")


def _walk(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]  # prune: site-packages is huge
        rel_dir = Path(dirpath).relative_to(root)
        yield from (rel_dir / name for name in filenames)


def split_of(rel: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:4], "big") % 100
    if bucket in HELDOUT_BUCKETS:
        return "heldout"
    return "calibration" if bucket in CALIBRATION_BUCKETS else "train"


@functools.lru_cache(maxsize=None)
def files() -> tuple[CorpusFile, ...]:
    root = stdlib_root()
    rels = sorted(rel for rel in _walk(root) if included(rel))
    return tuple(CorpusFile(r.as_posix(), (root / r).stat().st_size, split_of(r.as_posix())) for r in rels)


def split_files(split: str) -> list[CorpusFile]:
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: choose from {', '.join(SPLITS)}")
    return [f for f in files() if f.split == split]


def fingerprint() -> str:
    """sha256 of 'path<TAB>size' lines over every corpus file: changes with the Python install."""
    lines = "".join(f"{f.rel}\t{f.size}\n" for f in files())
    return hashlib.sha256(lines.encode()).hexdigest()


@functools.lru_cache(maxsize=None)
def stream(split: str) -> torch.Tensor:
    """The split's token stream, int16 [N]: [BOS] bytes [EOS] per file, files in path order."""
    root, parts = stdlib_root(), []
    for f in split_files(split):
        data = torch.from_numpy(np.frombuffer((root / f.rel).read_bytes(), dtype=np.uint8).astype(np.int16))
        parts += [torch.tensor([BOS_ID], dtype=torch.int16), data, torch.tensor([EOS_ID], dtype=torch.int16)]
    return torch.cat(parts)


def batch(split: str, step: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    """Training batch `step`: batch_size windows of seq_len tokens at seeded random offsets, int64.

    Stateless in `step` (the generator is seeded from (seed, step)), so a run's data order is fixed
    by its seed alone, whatever happened before the step.
    """
    tokens = stream(split)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=gen)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()]).long()


def windows(split: str, num_windows: int, seq_len: int) -> torch.Tensor:
    """A fixed evaluation subset: num_windows windows of seq_len tokens evenly spaced over the split."""
    tokens = stream(split)
    stride = (len(tokens) - seq_len) // max(num_windows - 1, 1)
    if stride < seq_len // 2:
        raise ValueError(f"split {split!r} has {len(tokens)} tokens: too few for {num_windows} windows of {seq_len}")
    return torch.stack([tokens[i * stride : i * stride + seq_len] for i in range(num_windows)]).long()

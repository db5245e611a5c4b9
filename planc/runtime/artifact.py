"""Read an artifact directory, trusting nothing in it that its manifest does not vouch for.

read_manifest checks the header (format and planc version) and that the manifest is as compiled
(its manifest_sha256); open_artifact also checks every file's sha256 against manifest["files"],
which `planc run` and `planc verify` do once before any rank starts. A rank then checks only the
files it loads (ArtifactDir.path / load_module): its program, its own weights, the kernels its
--kernels choice runs; the launching process checks the tokenizer/ copy it reads prompts and
outputs with (ArtifactDir.tokenizer_dir).
"""
from __future__ import annotations

import ast
import hashlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from planc import __version__
from planc.codegen.artifact import FORMAT_VERSION, MANIFEST, MANIFEST_DIGEST, TOKENIZER_DIR, manifest_digest, sha256_file
from planc.errors import ArtifactError, read_json

RECOMPILE = "recompile it with `planc compile`"
SEALED_DIRS = ("programs", "kernels", TOKENIZER_DIR)  # everything under these is planc's own output
MAX_MANIFEST_BYTES = 16 * 2**20  # a 1,024-rank manifest is ~0.2 MiB


def read_manifest(artifact: str | Path) -> dict:
    """manifest.json, once it says this planc wrote it in the format this planc reads."""
    path = Path(artifact) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{artifact}: not a planc artifact (no {MANIFEST}); create one with `planc compile`")
    try:
        manifest = read_json(path, MAX_MANIFEST_BYTES)
    except ValueError as exc:
        raise ArtifactError(f"{exc}; {RECOMPILE}") from None
    found = manifest.get("format_version") if isinstance(manifest, dict) else None
    if found != FORMAT_VERSION:
        had = f"format {found}" if found is not None else "no format_version (an older artifact)"
        raise ArtifactError(f"{path}: {had}, but this planc reads artifact format {FORMAT_VERSION}; {RECOMPILE}")
    if manifest.get("planc_version") != __version__:
        raise ArtifactError(f"{path}: written by planc {manifest.get('planc_version')}, but this is planc "
                            f"{__version__}; {RECOMPILE}")
    if manifest.get(MANIFEST_DIGEST) != manifest_digest(manifest):
        raise ArtifactError(f"{path}: edited since it was compiled (its content does not match its "
                            f"{MANIFEST_DIGEST}), so it no longer vouches for the artifact's files; {RECOMPILE}")
    return manifest


def open_artifact(artifact: str | Path) -> ArtifactDir:
    """The artifact with every file checked: none missing, changed, or added to programs/ or kernels/."""
    opened = ArtifactDir(artifact)
    opened.check_all()
    return opened


class ArtifactDir:
    """An artifact directory and its manifest; hands out files only after checking their sha256."""

    def __init__(self, artifact: str | Path):
        self.root = Path(artifact)
        self.manifest = read_manifest(self.root)
        self.files: dict[str, str] = self.manifest["files"]

    def program(self, name: str) -> dict:
        """manifest["programs"][name]: the program's cache specs."""
        programs = self.manifest["programs"]
        if name not in programs:
            raise ArtifactError(f"{self.root}: no program {name!r} (it holds {', '.join(sorted(programs))}); "
                                f"compile a plan that defines it")
        return programs[name]

    def path(self, rel: str) -> Path:
        """The file at `rel`, after checking it against the manifest."""
        self._expect(rel, sha256_file(self._existing(rel)))
        return self.root / rel

    def load_module(self, rel: str, name: str, *,
                    instrument: Callable[[ast.Module], ast.Module] | None = None) -> ModuleType:
        """Execute the checked bytes of a Python file as a fresh module (writes no __pycache__);
        `instrument` rewrites its syntax tree first (a traced run's program, planc.runtime.trace)."""
        source = self._existing(rel).read_bytes()
        self._expect(rel, hashlib.sha256(source).hexdigest())
        module = ModuleType(name)
        module.__file__ = str(self.root / rel)  # kernels find their C source and Triton its text here
        code = source if instrument is None else instrument(ast.parse(source, module.__file__))
        exec(compile(code, module.__file__, "exec"), module.__dict__)
        return module

    def check_all(self) -> None:
        for rel in self.files:
            self.path(rel)
        for folder in SEALED_DIRS:
            self._check_sealed(folder)

    def tokenizer_dir(self) -> Path | None:
        """tokenizer/ with each of its files checked; None when the artifact holds no tokenizer."""
        listed = [rel for rel in self.files if rel.startswith(f"{TOKENIZER_DIR}/")]
        for rel in listed:
            self.path(rel)
        self._check_sealed(TOKENIZER_DIR)
        return self.root / TOKENIZER_DIR if listed else None

    def _check_sealed(self, folder: str) -> None:
        for path in sorted((self.root / folder).rglob("*")):
            rel = path.relative_to(self.root).as_posix()
            if path.is_file() and rel not in self.files:
                raise ArtifactError(f"{path}: not listed in {MANIFEST} (an artifact's {folder}/ holds only "
                                    f"what planc compile wrote); remove it or {RECOMPILE}")

    def _existing(self, rel: str) -> Path:
        path = self.root / rel
        if not path.is_file():
            listed = "listed in manifest.json" if rel in self.files else "this artifact was written without it"
            raise ArtifactError(f"{path} is missing ({listed}); {RECOMPILE}")
        return path

    def _expect(self, rel: str, digest: str) -> None:
        want = self.files.get(rel)
        if want is None:
            raise ArtifactError(f"{self.root / rel}: not listed in {MANIFEST}, so nothing vouches for it; {RECOMPILE}")
        if digest != want:
            raise ArtifactError(f"{self.root / rel}: sha256 {digest[:16]}... differs from {want[:16]}... in {MANIFEST} "
                                f"(truncated or edited since it was compiled); {RECOMPILE}")

"""Reading an artifact: every refusal names the file and says to recompile; nothing unvouched loads."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from planc import __version__
from planc.codegen.artifact import Program, manifest_digest, write_artifact
from planc.errors import ArtifactError
from planc.runtime.artifact import ArtifactDir, open_artifact, read_manifest

SOURCE = "ANSWER = 42\n"
WEIGHTS = "programs/target/weights/rank0.safetensors"


@pytest.fixture
def artifact(tmp_path) -> Path:
    big = {"w": torch.arange(3 * 2**18, dtype=torch.float32)}  # 3 MiB: hashed in several chunks
    return write_artifact(tmp_path / "art", manifest={"planc_version": __version__},
                          programs={"target": Program(SOURCE, {}, [big])}, report={})


def _edit_manifest(artifact: Path, **changes) -> Path:
    """Change manifest fields and reseal it, as a compile writing them would."""
    path = artifact / "manifest.json"
    manifest = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps({**manifest, "manifest_sha256": manifest_digest(manifest)}))
    return path


def test_an_intact_artifact_opens_and_loads(artifact):
    opened = open_artifact(artifact)
    assert opened.program("target") == {"caches": {}}
    assert opened.load_module("programs/target/program.py", "p").ANSWER == 42
    assert opened.path(WEIGHTS) == artifact / WEIGHTS
    assert not list(artifact.rglob("__pycache__"))  # loading writes nothing into the artifact


def test_no_manifest(tmp_path):
    with pytest.raises(ArtifactError, match="not a planc artifact.*planc compile"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("version,said", [(1, "format 1"), (None, "no format_version")])
def test_another_format_version(artifact, version, said):
    path = _edit_manifest(artifact, format_version=version)
    with pytest.raises(ArtifactError) as err:
        ArtifactDir(artifact)
    assert str(path) in str(err.value) and said in str(err.value)
    assert "reads artifact format 3" in str(err.value) and "planc compile" in str(err.value)


def test_another_planc_version(artifact):
    _edit_manifest(artifact, planc_version="0.0.1")
    with pytest.raises(ArtifactError, match=f"planc 0.0.1, but this is planc {__version__}.*planc compile"):
        open_artifact(artifact)


def test_a_manifest_that_is_not_json(artifact):
    (artifact / "manifest.json").write_text('{"format_version": 3,')
    with pytest.raises(ArtifactError, match=r"manifest.json:1:22: not valid JSON \(Expecting property name.*planc compile"):
        read_manifest(artifact)


def test_a_missing_file(artifact):
    (artifact / "kernels" / "linear.py").unlink()
    with pytest.raises(ArtifactError, match=r"kernels/linear.py is missing \(listed in manifest.json\).*planc compile"):
        open_artifact(artifact)


@pytest.mark.parametrize("change", ["truncate", "edit"])
def test_a_truncated_or_edited_file(artifact, change):
    path = artifact / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[:-1] if change == "truncate" else data[:-1] + bytes([data[-1] ^ 1]))
    opened = ArtifactDir(artifact)  # the header alone is fine: hashes are checked when a file is used
    for check in (opened.check_all, lambda: opened.path(WEIGHTS)):
        with pytest.raises(ArtifactError, match=f"{WEIGHTS}: sha256 .* differs .*planc compile"):
            check()


def test_an_edited_program_is_not_executed(artifact):
    (artifact / "programs/target/program.py").write_text("raise SystemExit('ran')\n")
    with pytest.raises(ArtifactError, match="program.py: sha256"):
        ArtifactDir(artifact).load_module("programs/target/program.py", "p")


@pytest.mark.parametrize("extra", ["kernels/extra.py", "programs/target/weights/rank1.safetensors",
                                   "programs/draft/program.py"])
def test_an_unlisted_file_in_programs_or_kernels(artifact, extra):
    (artifact / extra).parent.mkdir(parents=True, exist_ok=True)
    (artifact / extra).write_text("x")
    with pytest.raises(ArtifactError, match=f"{extra}: not listed in manifest.json.*planc compile"):
        open_artifact(artifact)
    with pytest.raises(ArtifactError, match=f"{extra}: not listed in manifest.json"):
        ArtifactDir(artifact).path(extra)


def test_other_files_beside_the_artifact_are_left_alone(artifact):
    (artifact / "NOTES.txt").write_text("mine")
    open_artifact(artifact)


def test_an_unknown_program(artifact):
    with pytest.raises(ArtifactError, match="no program 'draft' \\(it holds target\\)"):
        ArtifactDir(artifact).program("draft")


def test_run_checks_the_whole_artifact_before_starting_a_rank(compiled, tmp_path):
    from planc.run import run

    copy = Path(shutil.copytree(compiled("deepseek_mla_tp_ep.yaml", 2), tmp_path / "copy"))
    weights = copy / "programs/target/weights/rank1.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(ArtifactError, match="rank1.safetensors: sha256"):
        run(copy, max_new_tokens=2, timeout_s=1)  # a launch could not finish in 1 s

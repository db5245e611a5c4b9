"""Artifacts are written atomically (a failure leaves nothing, an existing one survives it), in
format 3: named programs, kernels, a sha256 in the manifest for every other file and one of the manifest."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from planc import __version__
from planc.codegen.artifact import FORMAT_VERSION, KERNEL_FILES, Program, write_artifact
from planc.errors import ArtifactError

CACHES = {"model.layers.0.self_attn": {"kind": "mla", "ckv": 4, "kpe": 2}}


def _write(out, tensors, **programs):
    programs = programs or {"target": Program("def forward(rt, ids, step):\n    pass\n", CACHES, tensors)}
    return write_artifact(out, manifest={"planc_version": __version__}, programs=programs, report={"ok": True})


def _manifest(out):
    return json.loads((out / "manifest.json").read_text())


def test_complete_artifact(tmp_path):
    out = _write(tmp_path / "a", [{"w": torch.ones(2)}, {"w": torch.zeros(2)}])
    manifest = _manifest(out)
    assert manifest["format_version"] == FORMAT_VERSION == 3 and manifest["planc_version"] == __version__
    assert manifest["programs"] == {"target": {"caches": CACHES}} and "caches" not in manifest
    assert (out / "programs" / "target" / "program.py").read_text().startswith("def forward")
    assert (out / "programs" / "target" / "weights" / "rank1.safetensors").is_file()
    assert sorted(p.name for p in (out / "kernels").iterdir()) == sorted(KERNEL_FILES)


def test_every_file_but_the_manifest_is_listed_with_its_sha256(tmp_path):
    out = _write(tmp_path / "a", [{"w": torch.ones(2)}])
    files = _manifest(out)["files"]
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(files) == on_disk and "report.json" in files
    for rel, digest in files.items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == digest, rel


def test_several_programs_and_a_weightless_one(tmp_path):
    out = _write(tmp_path / "a", None, target=Program("t = 1\n", CACHES, [{"w": torch.ones(2)}]),
                 draft=Program("d = 1\n", {}, None))
    manifest = _manifest(out)
    assert manifest["programs"] == {"target": {"caches": CACHES}, "draft": {"caches": {}}}
    assert (out / "programs" / "draft" / "program.py").read_text() == "d = 1\n"
    assert not (out / "programs" / "draft" / "weights").exists()
    assert "programs/target/weights/rank0.safetensors" in manifest["files"]


def test_a_program_name_must_be_an_identifier(tmp_path):
    with pytest.raises(ValueError, match="'../x'"):
        _write(tmp_path / "a", None, **{"../x": Program("", {}, None)})
    assert list(tmp_path.iterdir()) == []


def test_failure_leaves_nothing_and_keeps_the_old_artifact(tmp_path):
    out = _write(tmp_path / "a", [{"w": torch.ones(2)}])
    before = _manifest(out)
    with pytest.raises(Exception):  # a weight with no data cannot be saved: the write fails midway
        _write(out, [{"w": torch.ones(2)}, {"w": torch.ones(2, device="meta")}])
    assert _manifest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_aliased_views_are_saved_as_separate_tensors(tmp_path):
    from safetensors.torch import load_file

    whole = torch.arange(6.0)
    out = _write(tmp_path / "a", [{"all": whole, "head": whole[:2]}])
    loaded = load_file(out / "programs" / "target" / "weights" / "rank0.safetensors")
    assert loaded["all"].tolist() == whole.tolist() and loaded["head"].tolist() == [0.0, 1.0]


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("x")
    with pytest.raises(ArtifactError, match="not a planc artifact"):
        _write(tmp_path / "data", None)
    assert (tmp_path / "data" / "keep.txt").is_file()


def test_tokenizer_files_are_copied_and_hashed(tmp_path):
    source = tmp_path / "ckpt"
    source.mkdir()
    (source / "tokenizer.json").write_text('{"model": {}}')
    out = write_artifact(tmp_path / "a", manifest={"planc_version": __version__}, report={},
                         programs={"target": Program("", CACHES, None)}, tokenizer={"tokenizer.json": source / "tokenizer.json"})
    assert (out / "tokenizer" / "tokenizer.json").read_text() == '{"model": {}}'
    assert _manifest(out)["files"]["tokenizer/tokenizer.json"] == hashlib.sha256(b'{"model": {}}').hexdigest()
    with pytest.raises(ValueError, match="'../tokenizer.json'"):
        write_artifact(tmp_path / "b", manifest={}, report={}, programs={},
                       tokenizer={"../tokenizer.json": source / "tokenizer.json"})
    assert not (tmp_path / "b").exists()

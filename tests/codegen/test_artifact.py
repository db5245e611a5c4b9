"""Artifacts are written atomically: a failure leaves nothing, an existing one survives it."""
from __future__ import annotations

import json

import pytest
import torch

from planc.codegen.artifact import write_artifact
from planc.errors import ArtifactError


def _write(out, tensors):
    return write_artifact(out, manifest={"ok": True}, program="", report={}, rank_tensors=tensors)


def test_complete_artifact(tmp_path):
    out = _write(tmp_path / "a", [{"w": torch.ones(2)}])
    assert json.loads((out / "manifest.json").read_text()) == {"ok": True}
    assert (out / "weights" / "rank0.safetensors").is_file() and len(list((out / "kernels").glob("*.py"))) == 4


def test_failure_leaves_nothing_and_keeps_the_old_artifact(tmp_path):
    out = _write(tmp_path / "a", [{"w": torch.ones(2)}])
    shared = torch.ones(4)
    with pytest.raises(RuntimeError):  # safetensors refuses aliased tensors mid-write
        _write(out, [{"a": shared, "b": shared}])
    assert json.loads((out / "manifest.json").read_text()) == {"ok": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("x")
    with pytest.raises(ArtifactError, match="not a planc artifact"):
        _write(tmp_path / "data", None)
    assert (tmp_path / "data" / "keep.txt").is_file()

"""Artifacts are written atomically: a failure leaves nothing, an existing one survives it."""
from __future__ import annotations

import json

import pytest
import torch

from planc.codegen.artifact import KERNEL_FILES, write_artifact
from planc.errors import ArtifactError


def _write(out, tensors):
    return write_artifact(out, manifest={"ok": True}, program="", report={}, rank_tensors=tensors)


def test_complete_artifact(tmp_path):
    out = _write(tmp_path / "a", [{"w": torch.ones(2)}])
    assert json.loads((out / "manifest.json").read_text()) == {"ok": True}
    assert (out / "weights" / "rank0.safetensors").is_file()
    assert sorted(p.name for p in (out / "kernels").iterdir()) == sorted(KERNEL_FILES)


def test_failure_leaves_nothing_and_keeps_the_old_artifact(tmp_path):
    out = _write(tmp_path / "a", [{"w": torch.ones(2)}])
    with pytest.raises(Exception):  # a weight with no data cannot be saved: the write fails midway
        _write(out, [{"w": torch.ones(2)}, {"w": torch.ones(2, device="meta")}])
    assert json.loads((out / "manifest.json").read_text()) == {"ok": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_aliased_views_are_saved_as_separate_tensors(tmp_path):
    from safetensors.torch import load_file

    whole = torch.arange(6.0)
    out = _write(tmp_path / "a", [{"all": whole, "head": whole[:2]}])
    loaded = load_file(out / "weights" / "rank0.safetensors")
    assert loaded["all"].tolist() == whole.tolist() and loaded["head"].tolist() == [0.0, 1.0]


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("x")
    with pytest.raises(ArtifactError, match="not a planc artifact"):
        _write(tmp_path / "data", None)
    assert (tmp_path / "data" / "keep.txt").is_file()

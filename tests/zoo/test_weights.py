"""The shipped weights: recorded in the manifest, loadable offline, and actually trained."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from planc.models.registry import WEIGHTS_DIR, load_model
from planc.zoo import corpus
from planc.zoo import eval as zoo_eval
from planc.zoo.train import sha256_file

MODELS = ("tiny-deepseek", "tiny-draft")
BPB_BAR = {"tiny-deepseek": 2.6, "tiny-draft": 3.2}  # issue 3, done-means 1
MANIFEST = json.loads((WEIGHTS_DIR / "manifest.json").read_text())


def test_every_weight_file_matches_its_manifest_sha256():
    for name in MODELS:
        files = MANIFEST["models"][name]["files"]
        assert set(files) == {p.name for p in (WEIGHTS_DIR / name).iterdir()}
        for file, digest in files.items():
            assert sha256_file(WEIGHTS_DIR / name / file) == digest, f"{name}/{file}"


def test_shipped_weights_fit_the_size_budget():
    total = sum(p.stat().st_size for name in MODELS for p in (WEIGHTS_DIR / name).iterdir())
    assert total <= 30 * 2**20


OFFLINE_LOAD = """
import socket
def refuse(*args, **kwargs):
    raise OSError("network access during an offline load")
socket.socket.connect = refuse
socket.create_connection = refuse
import torch
from safetensors.torch import load_file
from planc.models.registry import WEIGHTS_DIR, load_model

def shipped(saved, key):
    # save_pretrained writes the fused [E, ...] expert stacks as one tensor per expert.
    if key.endswith("experts.gate_up_proj") or key.endswith("experts.down_proj"):
        prefix, kind = key.rsplit(".", 1)
        parts = ("gate_proj", "up_proj") if kind == "gate_up_proj" else ("down_proj",)
        num = sum(k.startswith(prefix + ".") and k.endswith(parts[0] + ".weight") for k in saved)
        return torch.stack([torch.cat([saved[f"{prefix}.{e}.{p}.weight"] for p in parts]) for e in range(num)])
    return saved[key]

for name in ("tiny-deepseek", "tiny-draft"):
    model = load_model(name)
    saved = load_file(WEIGHTS_DIR / name / "model.safetensors")
    state = model.state_dict()
    assert all(value.equal(shipped(saved, key)) for key, value in state.items()), name
    print(name, type(model).__name__, len(state))
"""


def test_bundled_models_load_offline_with_the_shipped_tensors():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", OFFLINE_LOAD], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "tiny-deepseek DeepseekV3ForCausalLM" in out.stdout and "tiny-draft LlamaForCausalLM" in out.stdout


@pytest.mark.skipif(MANIFEST["corpus"]["fingerprint"] != corpus.fingerprint(),
                    reason="this Python's stdlib is not the corpus the bundled models were trained on")
def test_bundled_models_are_the_trained_ones_and_meet_the_bars():
    bpb = {name: zoo_eval.bits_per_byte(load_model(name)) for name in MODELS}
    for name in MODELS:
        # Same eval set, same weights; only the thread count can reorder fp32 sums.
        assert bpb[name] == pytest.approx(MANIFEST["models"][name]["heldout_bpb"], abs=1e-4), name
        assert bpb[name] <= BPB_BAR[name], name
    assert bpb["tiny-deepseek"] < bpb["tiny-draft"]


def test_manifest_carries_the_bench_figures_that_meet_the_bars():
    bench = MANIFEST["bench_zoo"]
    assert set(bench["bpb"]) == set(MODELS)
    assert bench["draft_agreement"] >= 0.45
    assert len(bench["topk_hotness"]) == 3 and min(bench["topk_hotness"].values()) >= 0.5
    assert len(bench["latent_top_half_energy"]) == 4

"""Calibration profiles: one forward over the calibration split, recorded by hooks, cached per request."""
from __future__ import annotations

import pytest
import torch

from planc.calibrate import Profiles
from planc.lift.recognize import recognize
from planc.zoo.corpus import windows
from tests.passes.blocks import model


def test_routing_counts_count_every_token_top_k_times_under_its_own_id():
    m = model("tiny-deepseek")
    routers = {b.fqn: b.dims for b in recognize(m) if b.kind == "moe"}
    counts = Profiles(m).routing_counts(list(routers), 512, routers)
    ids = windows("calibration", 2, 256).flatten()
    occurrences = torch.bincount(ids, minlength=counts["model.layers.1.mlp"].shape[0])
    for fqn, c in counts.items():
        top_k = routers[fqn].top_k
        assert torch.equal(c.sum(1), occurrences * top_k)  # each token's k distinct experts, under its id
        assert bool((c <= occurrences[:, None]).all())


def test_latents_are_unit_rms_and_cached():
    profiles = Profiles(model("tiny-deepseek"))
    fqn = "model.layers.0.self_attn"
    first = profiles.latents([fqn], 256)[fqn]
    assert first.shape == (256, 64) and first.pow(2).mean(-1).sub(1).abs().max() < 1e-3
    assert profiles.latents([fqn], 256)[fqn] is first  # a second request reuses the recorded profile


def test_meta_has_no_profiles():
    with pytest.raises(RuntimeError, match="needs a model with weights"):
        Profiles(model("tiny-deepseek"), meta=True).latents(["model.layers.0.self_attn"], 256)

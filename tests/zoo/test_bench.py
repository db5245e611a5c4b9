"""`planc bench zoo`'s table: every figure of the JSON result appears, labelled."""
from __future__ import annotations

from planc.bench import zoo

RESULT = {
    "bpb": {"tiny-deepseek": 1.98, "tiny-draft": 2.2},
    "draft_agreement": 0.8,
    "topk_hotness": {"model.layers.1.mlp": 0.79},
    "latent_top_half_energy": {"model.layers.0.self_attn": 0.999},
    "eval_set": {"split": "heldout", "windows": 64, "seq_len": 256},
}


def test_table_lists_every_figure():
    text = zoo.table(RESULT)
    for needle in ("tiny-deepseek", "1.9800", "tiny-draft", "2.2000", "draft agreement", "0.8000",
                   "model.layers.1.mlp", "0.7900", "model.layers.0.self_attn", "0.9990", "64 windows x 256"):
        assert needle in text, needle

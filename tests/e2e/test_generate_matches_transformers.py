"""Done-means of the spine: N-rank greedy decoding reproduces transformers' generate() exactly.

Real processes, real gloo collectives; the reference is transformers' own generate() on one
process. 17 new tokens = the prefill's token + 16 decode steps.
"""
from __future__ import annotations

import json

import pytest

from planc.verify import verify

# fp32 end to end: the absorbed MLA form and the EP partial sums reorder a few additions, which
# moves logits by ~1e-6; 1e-4 is the bar.
LOGIT_TOL = 1e-4


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("plan", ["deepseek_mla_tp_ep.yaml", "draft_tp.yaml"])
def test_greedy_tokens_and_logits_match(compiled, plan, world):
    report = verify(compiled(plan, world), max_new_tokens=17, timeout_s=300)
    assert report["tokens_compared"] == 3 * 17
    assert report["token_agreement"] == 1.0, report
    assert report["max_logit_diff"] <= LOGIT_TOL, report
    assert report["ranks_agree"]


def test_qwen3_with_qk_norm_matches(compiled, tmp_path):
    from transformers import Qwen3Config

    cfg = Qwen3Config(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                      bos_token_id=256, eos_token_id=257, pad_token_id=258, tie_word_embeddings=False)
    path = tmp_path / "qwen3.json"
    path.write_text(json.dumps(cfg.to_dict()))
    report = verify(compiled("draft_tp.yaml", 2, model=str(path)), max_new_tokens=17, timeout_s=300)
    assert report["token_agreement"] == 1.0 and report["max_logit_diff"] <= LOGIT_TOL, report

"""The soak case's own code on 200 steps (the 2,000-step, 4-rank run is `planc bench soak`): RSS
sampled at the steps asked for, over a KV cache allocated for the whole run, with a loose bound."""
from __future__ import annotations

import json

from planc.bench import soak


def test_soak_samples_every_rank_and_stays_flat(compiled):
    result = soak.measure(compiled("deepseek_mla_tp_ep.yaml", 2), 2, steps=200, probes=(20, 200), every=100, bound=0.10)
    assert (result["ranks"], result["decode_steps"], result["probes"]) == (2, 200, [20, 200])
    assert result["kv_slots"] == result["prompt_tokens"] + 201  # the prompt and every new token, allocated up front
    assert set(result["rss_mib"]) == {"0", "1"} and all(set(r) == {"20", "200"} for r in result["rss_mib"].values())
    assert all(set(c) == {"20", "100", "200"} for c in result["rss_curve_mib"].values())
    # 200 steps grew < 1% here (~400 MiB per rank); 10% leaves room for a noisy allocator while a
    # leak of one KV-cache-sized buffer per step (~0.3 MiB here, ~60 MiB over 200 steps) still fails.
    assert result["passed"] and result["max_growth"] <= 0.10, result["growth"]
    assert result["decode_tokens_per_s"] > 0
    json.dumps(result)
    assert "RSS @200 MiB" in soak.table(result)

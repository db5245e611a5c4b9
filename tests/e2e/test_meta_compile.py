"""A weightless dry run of the full DeepSeek-V3 config: per-rank weight and KV bytes."""
from __future__ import annotations

import json

from planc.cli import main
from tests.conftest import PLANS


def test_deepseek_v3_meta_compile_reports_per_rank_bytes(tmp_path, capsys):
    out = tmp_path / "dsv3"
    code = main(["compile", "deepseek-v3", str(PLANS / "deepseek_v3_mla_tp_ep8.yaml"), "-o", str(out), "--meta"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert not (out / "programs" / "target" / "weights").exists()
    assert len(report["per_rank"]) == 8
    # mla_tp keeps the whole 512 + 64 latent on every rank: 61 layers x 576 x 2 bytes (bf16).
    assert {r["kv_bytes_per_token"] for r in report["per_rank"]} == {61 * 576 * 2}
    # 671B parameters in bf16 split 8 ways, plus what every rank replicates: between 1/8 and 1/4 of 1.34 TB.
    weights = report["per_rank"][0]["weight_bytes"]
    assert 671e9 * 2 / 8 < weights < 671e9 * 2 / 4
    calls = report["collectives_per_decode_step"]
    assert calls["all_reduce"]["calls"] == 61 + 3 and calls["all_to_all"]["calls"] == 2 * 58

"""`planc diff`: what TPLA buys over mla_tp on tiny-deepseek, in the terminal and as JSON."""
from __future__ import annotations

import json
import re

from planc.cli import main
from planc.cost import PROFILES
from planc.diff import format_diff
from tests.conftest import PLANS


def test_tpla_against_mla_tp_on_tiny_deepseek(capsys, tmp_path):
    a, b = str(PLANS / "deepseek_mla_tp_ep.yaml"), str(PLANS / "deepseek_tpla.yaml")
    assert main(["diff", a, b, "--json", "-o", str(tmp_path / "diff.html")]) == 0
    found = json.loads(capsys.readouterr().out)
    # mla_tp keeps the whole latent (64) + rope (16) of 4 layers in fp32 on each rank: 4 x 80 x 4 =
    # 1280 B/token; TPLA g = 2 keeps half the latent: 4 x (32 + 16) x 4 = 768.
    assert found["kv_bytes_per_token"] == {"rank 0": [1280, 768], "rank 1": [1280, 768]}
    all_reduce = found["collectives_per_decode_step"]["all_reduce"]
    assert all_reduce[0]["calls"] == all_reduce[1]["calls"] == 5  # one per attention layer + layer 0's MLP
    steps = found["predicted_decode_step_s"]
    assert set(steps) == set(PROFILES) and all(0 < b_s < a_s for a_s, b_s in steps.values())
    assert any(r["blocks"] == "model.layers.{0-3}.self_attn" and r["a"].startswith("mla_tp:")
               and r["b"].startswith("tpla:") for r in found["placements"])
    text = format_diff(found)  # the terminal's table, from the same figures
    kv_line = next(line for line in text.splitlines() if "KV cache, ranks 0-1" in line)
    assert kv_line.split()[-4:] == ["B/token", "768", "B/token", "(-40%)"] and "1280" in kv_line
    assert next(line for line in text.splitlines() if line.strip().startswith("all_reduce")).count("5 calls") == 2
    assert sum(line.strip().split()[0] in PROFILES for line in text.splitlines()) == len(PROFILES)
    # the page: the same rows, the changed ones marked, every value escaped
    page = (tmp_path / "diff.html").read_text()
    assert found["page"] == str(tmp_path / "diff.html") and page.startswith("<!DOCTYPE html>")
    kv_row = re.search(r'<tr class="changed"><td>KV cache, ranks 0-1</td><td>1280 B/token</td><td>768 B/token  \(-40%\)</td>', page)
    assert kv_row and '<tr><td>all_reduce</td><td>5 calls' in page
    assert all(f"<td>{hw}</td>" in page for hw in PROFILES) and "<script" not in page

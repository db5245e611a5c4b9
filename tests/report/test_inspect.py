"""`planc inspect`: the HTML page shows what report.json / program.py hold, escaped, written atomically."""
from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import pytest

import planc.report.inspect as inspect
from planc import __version__
from planc.codegen.artifact import FORMAT_VERSION, manifest_digest
from planc.driver import compile
from planc.errors import ArtifactError
from tests.conftest import PLANS


@pytest.fixture(scope="module")
def artifact(compiled) -> Path:
    return compiled("deepseek_mla_tp_ep.yaml", 2)


@pytest.fixture(scope="module")
def page(artifact) -> str:
    return inspect.render(artifact)


@pytest.fixture(scope="module")
def report(artifact) -> dict:
    return json.loads((artifact / "report.json").read_text())


@pytest.fixture(scope="module")
def meta_artifact(tmp_path_factory) -> Path:
    """A weightless compile of the TPLA plan: no weights, no lift checks, latent transforms noted."""
    return compile("tiny-deepseek", PLANS / "deepseek_tpla.yaml", tmp_path_factory.mktemp("meta") / "art", meta=True).path


def _cell(page: str, key: str) -> str:
    found = re.search(rf'<td [^>]*data-cell="{key}"[^>]*>(.*?)</td>', page)
    assert found, f"no grid cell {key}"
    return found.group(1)


def _section(page: str, anchor: str) -> str:
    return re.search(rf'<section id="{anchor}">(.*?)</section>', page, re.S).group(1)


def test_grid_shows_every_layers_strategy_and_numbers(page, report):
    assert len(report["passes"]) == 8  # 4 attention blocks, 1 dense MLP, 3 MoE
    for record in report["passes"]:
        layer = re.search(r"layers\.(\d+)\.", record["target"]).group(1)
        column = "attention" if record["target"].endswith("self_attn") else "ffn"
        cell = _cell(page, f"{layer}:{column}")
        assert f'<div class="strategy">{record["pass_name"]} ' in cell
    assert "heads_per_rank <b>2</b>" in _cell(page, "3:attention")
    assert "kv_width_per_rank <b>80</b>" in _cell(page, "3:attention")
    assert "intermediate_per_rank <b>128</b>" in _cell(page, "0:ffn")
    assert "experts_per_rank <b>4</b>" in _cell(page, "2:ffn")


def test_per_rank_bytes_appear_formatted(page, report):
    memory = _section(page, "memory")
    for rank in report["per_rank"]:
        for key in ("weight_bytes", "kv_bytes_per_token"):
            assert f"{inspect.human_bytes(rank[key])} <small>({rank[key]:,} B)</small>" in memory
    assert memory.count('class="fill"') == 2 * len(report["per_rank"])


def test_human_bytes():
    assert inspect.human_bytes(768) == "768 B"
    assert inspect.human_bytes(1024) == "1.00 KiB"
    assert inspect.human_bytes(3_300_064) == "3.15 MiB"
    assert inspect.human_bytes(177_487_068_800) == "165.30 GiB"


def test_every_collective_with_calls_and_ring_note(page, report):
    table = _section(page, "collectives")
    ops = report["collectives_per_decode_step"]
    assert set(ops) == {"all_reduce", "all_to_all", "all_gather_varlen"}
    for op, entry in ops.items():
        assert f"<td><code>{op}</code></td><td>{entry['calls']}</td>" in table
    assert f"({ops['all_to_all']['bytes_per_token_max']:,} B, upper bound)" in table
    assert "ring formulas" in table


def test_program_lines_present_escaped_and_tagged(page, artifact):
    program = (artifact / "programs" / "target" / "program.py").read_text()
    body = _section(page, "program")
    for line in program.splitlines():
        code = line[:line.rfind("#")] if "# rules[" in line else line
        assert html.escape(code) in body
    assert "ids [B, S] -&gt; logits" in body and "ids [B, S] -> logits" not in body
    tagged = sum("# rules[0]" in line for line in program.splitlines())
    # mla_tp's lines in 4 layers: q_b_proj, the core, o_proj and the all-reduce after it
    assert tagged == 16 and body.count('data-rule="0" data-cell=') == tagged


def test_plan_rules_pick_their_program_lines(page):
    plan = _section(page, "plan")
    assert 'match: &quot;model.layers.*.self_attn&quot;' in plan
    assert "attention:" in plan and "strategy: mla_tp" in plan
    for index in range(3):
        assert f"data-pick='.ln[data-rule=\"{index}\"]'" in plan
    assert "addEventListener('click'" in page and "<script src" not in page and "http" not in page.split("<body>")[0]


def test_pass_records_lift_checks_and_graphs(page, report):
    records = _section(page, "passes")
    assert "8 applied, 0 declined" in records and 'class="declined"' not in records
    lift = _section(page, "lift")
    for check in report["lift_checks"]:
        err = "None" if check["rel_err"] is None else f"{check['rel_err']:.1e}"  # a structural check ran nothing
        assert f"<code>{check['block']}</code></td><td>{err}</td><td>ok</td>" in lift
    graphs = _section(page, "graphs")
    for name in report["graphs"]:
        assert f"after <b>{name}</b>" in graphs
    assert html.escape(report["graphs"]["ep"]) in graphs


def test_predicted_decode_step_uses_the_cost_model_per_profile(page, report):
    from planc import cost

    predicted = _section(page, "predicted")
    for name, hw in cost.PROFILES.items():
        most = cost.artifact_max_batch(report, hw, inspect.PREDICT_CONTEXT)
        step = cost.artifact_step(report, hw, most, inspect.PREDICT_CONTEXT)
        assert f"<td>{name}</td><td>{most:,}</td>" in predicted
        assert f"{step['tokens_per_s']:,.0f}" in predicted


def test_meta_artifact_renders_without_weights(meta_artifact):
    assert not (meta_artifact / "programs" / "target" / "weights").exists()
    page = inspect.render(meta_artifact)
    assert "weightless dry run (--meta)" in page
    assert "not run: meta device has no values" in _section(page, "lift")
    assert "latent_per_rank <b>32</b>" in _cell(page, "1:attention")
    assert 'id="notes"' in page and "pca (identity on meta)" in _section(page, "notes")


def test_hostile_text_is_escaped_and_declines_highlighted(meta_artifact, tmp_path):
    art = Path(shutil.copytree(meta_artifact, tmp_path / "art"))
    with (art / "programs" / "target" / "program.py").open("a") as f:
        f.write('x = a < b & c  # rules[0] tpla: <script>alert(1)</script>\n')
    report = json.loads((art / "report.json").read_text())
    report["passes"].append({"pass_name": "tpla", "target": "model.layers.2.self_attn", "action": "declined",
                             "detail": "latent 64 not divisible by <3> groups"})
    report["declines"] = [report["passes"][-1]]
    (art / "report.json").write_text(json.dumps(report))
    page = inspect.render(art)
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "x = a &lt; b &amp; c" in page
    assert 'class="cell pick declined"' in page and "not divisible by &lt;3&gt; groups" in _cell(page, "2:attention")
    assert '<tr class="declined">' in _section(page, "passes") and "1 declined rewrite(s)" in page


def test_write_is_atomic(artifact, tmp_path, monkeypatch):
    out = tmp_path / "sub" / "plan.html"
    replaced = []

    def spy(src, dst):
        assert Path(src).parent == Path(dst).parent and not Path(dst).exists()
        replaced.append(Path(src).read_text())
        real_replace(src, dst)

    real_replace = inspect.os.replace
    monkeypatch.setattr(inspect.os, "replace", spy)
    assert inspect.write(artifact, out) == out
    assert replaced == [out.read_text()] and out.read_text().startswith("<!DOCTYPE html>")
    assert [p.name for p in out.parent.iterdir()] == ["plan.html"]


def test_not_an_artifact(tmp_path):
    out = tmp_path / "plan.html"
    out.write_text("old")
    with pytest.raises(ArtifactError, match="no manifest.json"):
        inspect.write(tmp_path / "nothing", out)
    assert out.read_text() == "old" and len(list(tmp_path.iterdir())) == 1
    (tmp_path / "half").mkdir()
    half = {"format_version": FORMAT_VERSION, "planc_version": __version__}
    (tmp_path / "half" / "manifest.json").write_text(json.dumps({**half, "manifest_sha256": manifest_digest(half)}))
    with pytest.raises(ArtifactError, match="report.json and programs/target/program.py missing"):
        inspect.render(tmp_path / "half")


def test_parse_program_reads_rules_cells_and_numbers_from_the_graph_nodes():
    nodes = {"a": {"name": "a", "rule": 0, "strategy": "tpla", "block": "model.layers.5.self_attn",
                   "shard": {"heads_per_rank": 4, "latent_per_rank": 32}},
             "b": {"name": "b", "rule": 1, "strategy": "ep", "block": "model.layers.5.mlp", "shard": {}},
             "x": {"name": "x", "rule": None, "strategy": "replicated", "block": ""}}
    source = "def forward(rt, ids, step):\n    x = f(ids)\n    a = f(x)  # anything\n    b = g(a)\n    c = h(b)"
    lines = inspect.parse_program(source, nodes)
    assert [(l.rule, l.cell) for l in lines] == [(None, None), (None, None), (0, "5:attention"), (1, "5:ffn"), (None, None)]
    assert lines[2].numbers == {"heads_per_rank": "4", "latent_per_rank": "32"} and lines[3].numbers == {}


def test_yamlish_flow_and_block_styles():
    assert inspect.yamlish({"mesh": {"devices": 2}, "rules": [{"match": "a.*", "x": None}]}) == [
        "mesh: {devices: 2}", "rules:", '  - {match: "a.*", x: null}']
    long = {"k": {f"key{i}": i for i in range(12)}}
    assert inspect.yamlish(long)[:2] == ["k:", "  key0: 0"]


def test_expert_placement_heatmap_per_moe_layer(compiled):
    artifact = compiled("deepseek_moe_semantic.yaml", 2)
    report = json.loads((artifact / "report.json").read_text())
    section = _section(inspect.render(artifact), "heatmap")
    for fqn, note in report["notes"]["ep"].items():
        heat = note["heatmap"]
        assert f"<h3>{fqn}: {note['expected_local_rate']:.1%} local (tokens shuffled to their predicted rank)</h3>" in section
        assert len(heat["load"]) == 8 and all(len(row) == 2 for row in heat["load"])
    tables = re.findall(r'<table class="heatmap">(.*?)</table>', section, re.S)
    assert len(tables) == 3
    # one outlined (local) cell per expert: the rank that holds it
    assert all(t.count('class="heat own"') == 8 for t in tables)
    assert "heatmap" not in _section(inspect.render(artifact), "notes")  # drawn here, not dumped as text


def test_no_heatmap_without_a_profile(page):
    assert 'id="heatmap"' not in page

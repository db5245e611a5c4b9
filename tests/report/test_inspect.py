"""`planc inspect`: the HTML page shows what report.json / program.py hold, escaped, written atomically."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from markupsafe import escape

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
    """The grid cell showing KEY ("layer:column"; a folded row shows several layers)."""
    found = re.search(rf'<td [^>]*data-cell="(?:[^"]* )?{key}(?: [^"]*)?"[^>]*>(.*?)</td>', page, re.S)
    assert found, f"no grid cell {key}"
    return found.group(1)


def _section(page: str, anchor: str) -> str:
    return re.search(rf'<section id="{anchor}">(.*?)</section>', page, re.S).group(1)


def test_grid_shows_every_layers_strategy_and_numbers(page, report):
    assert len(report["passes"]) == 8  # 4 attention blocks, 1 dense MLP, 3 MoE
    said = {"mla_tp": "mla_tp", "dense_tp": "tp", "ep": "ep"}  # the plan's words, not the pass names
    for record in report["passes"]:
        layer = re.search(r"layers\.(\d+)\.", record["target"]).group(1)
        column = "attention" if record["target"].endswith("self_attn") else "ffn"
        cell = _cell(page, f"{layer}:{column}")
        assert f'<div class="strategy">{said[record["pass_name"]]} ' in cell
    assert "dense_tp" not in _section(page, "grid")
    # layers 1-3 agree in every column: one row with a count
    assert re.search(r"<th>1–3 <small>\(×3\)</small></th>", _section(page, "grid"))
    assert "heads_per_rank <b>2</b>" in _cell(page, "3:attention")
    assert "kv_width_per_rank <b>80</b>" in _cell(page, "3:attention")
    assert "intermediate_per_rank <b>128</b>" in _cell(page, "0:ffn")
    assert "experts_per_rank <b>4</b>" in _cell(page, "2:ffn")


def test_per_rank_bytes_appear_formatted(page, report):
    memory = _section(page, "memory")
    for rank in report["per_rank"]:
        w, kv = rank["weight_bytes"], rank["kv_bytes_per_token"]
        assert f"weights {inspect.human_bytes(w)} <small>({w:,} B)</small>" in memory
        assert f"KV {inspect.human_bytes(kv)}/token <small>({kv:,} B)</small>" in memory
    assert memory.count('class="stack"') == len(report["per_rank"])
    for name in ("H100", "H200", "H800"):
        assert f"<option{' selected' if name == 'H100' else ''}>{name}</option>" in memory


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
        assert str(escape(code)) in body
    assert "ids [B, S] -&gt; logits" in body and "ids [B, S] -> logits" not in body
    tagged = sum("# rules[0]" in line for line in program.splitlines())
    # mla_tp's lines in 4 layers: q_b_proj, the core, o_proj and the all-reduce after it
    assert tagged == 16 and body.count('data-rule="0" data-cell=') == tagged


def test_plan_as_written_beside_the_resolved_rules(page, artifact):
    plan = _section(page, "plan")
    written = (PLANS / "deepseek_mla_tp_ep.yaml").read_text()
    assert "<h3>as written: deepseek_mla_tp_ep_2.yaml</h3>" in plan
    comment = next(line for line in written.splitlines() if line.startswith("# tiny-deepseek"))
    assert f'<span class="yc">{escape(comment)}</span>' in plan  # comments kept, as written
    assert "match: &#34;model.layers.*.self_attn&#34;" in plan and "strategy: mla_tp" in plan
    details = json.loads(re.search(r'<script type="application/json" id="page-data">(.*?)</script>', page, re.S).group(1))
    program = (artifact / "programs" / "target" / "program.py").read_text().splitlines()
    for index in range(3):
        assert f'data-key="rule:{index}"' in plan
        picked = details["details"][f"rule:{index}"]["lines"]
        assert picked and all(f"# rules[{index}]" in program[n - 1] for n in picked)
    assert "<script src" not in page and "http" not in page.split("<body>")[0]


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
    assert str(escape(report["graphs"]["ep"])) in graphs


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
    assert 'class="cell declined"' in page and "not divisible by &lt;3&gt; groups" in _cell(page, "2:attention")
    assert '<tr class="declined">' in _section(page, "passes") and "1 declined rewrite(s)" in page


def test_write_is_atomic(artifact, tmp_path, monkeypatch):
    out = tmp_path / "sub" / "plan.html"
    replaced = []

    def spy(src, dst):
        assert Path(src).parent == Path(dst).parent and not Path(dst).exists()
        replaced.append(Path(src).read_text())
        real_replace(src, dst)

    real_replace = os.replace
    monkeypatch.setattr(os, "replace", spy)
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


def test_graph_picture_folds_identical_layers_and_keeps_every_collective(artifact, page, report):
    from planc.report import graphview

    nodes = list(inspect.final_nodes(report).values())
    picture = graphview.build(nodes)
    assert picture.runs == [(0, 1), (1, 3)]  # the dense layer, then three identical MoE layers
    drawn = {name for box in picture.nodes for name in box.members}
    collectives = [n["name"] for n in nodes if graphview.collective_of(n)]
    # every collective of every layer is drawn, by the box of its position in its run's first layer
    assert len(collectives) == 5 + 6 + 3 and set(collectives) <= drawn
    assert {box.collective for box in picture.nodes} - {None} == {"all_reduce", "all_to_all", "all_gather_varlen"}
    import networkx as nx

    g = nx.DiGraph([(a.key, b.key) for a, b in picture.edges])
    assert nx.is_directed_acyclic_graph(g) and nx.is_weakly_connected(g) and len(g) == len(picture.nodes)
    assert page.count('class="gnode pick') == len(picture.nodes)
    assert "layers 1–3 (×3)" in _section(page, "graph")


def test_rule_spans_follow_the_yaml_as_written():
    text = "version: 1\nrules:\n  - match: a  # first\n    x: 1\n\n  # about b\n  - match: b\n    y: {a: 1}\nmesh: {devices: 2}\n"
    assert inspect.rule_spans(text) == {0: (3, 4), 1: (7, 8)}
    assert inspect.rule_spans("rules: [{match: a}, {match: b}]\n") == {0: (1, 1), 1: (1, 1)}
    assert inspect.rule_spans("!!python/object:os.system x") == {}  # composed, never constructed


def test_header_lists_the_kernels_the_program_can_run(page, report, artifact):
    from planc.runtime.artifact import read_manifest

    used = inspect.kernels_used(inspect.final_nodes(report), read_manifest(artifact)["kernels"])
    # MLA decode (triton and the C kernel), the GEMM and norm kernels, and EP's grouped GEMM + row permute
    assert used == ["grouped_gemm.py", "linear.py", "mla_decode.py", "mla_decode_cpu.c", "mla_decode_cpu.py",
                    "permute.py", "rmsnorm.py"]
    header = page.split("</header>")[0]
    assert "gqa_decode" not in header and "t3_gemm" not in header and "<b>kernels</b> grouped_gemm.py, linear.py" in header


def test_timeline_section_and_trace_export(artifact, page, tmp_path, capsys):
    from planc.cli import main
    from planc.report import timeline

    section = _section(page, "timeline")
    assert '<select id="tl-profile">' in section and "Download Chrome trace" in section
    report = json.loads((artifact / "report.json").read_text())
    data = json.loads(re.search(r'<script type="application/json" id="page-data">(.*?)</script>', page, re.S).group(1))
    from planc import cost

    for name, hw in cost.PROFILES.items():  # the page's traces are the cost model's, profile by profile
        full = timeline.predicted(report, hw, batch=1, context=inspect.PREDICT_CONTEXT)
        spans = data["timeline"]["predicted"][name]["spans"]
        assert len(spans) == sum(e["ph"] == "X" for e in full["traceEvents"])
        step_us = cost.artifact_step(report, hw, 1, inspect.PREDICT_CONTEXT)["step_s"] * 1e6
        assert max(end for *_, end, _ in spans) == pytest.approx(step_us, abs=1e-3)
        assert {data["timeline"]["names"][s[5]] for s in spans} <= {e["name"] for e in full["traceEvents"]}
    assert data["timeline"]["measured"] is None and "planc run ARTIFACT --trace" in section
    out = tmp_path / "trace.json"
    assert main(["inspect", str(artifact), "-o", str(tmp_path / "p.html"), "--trace-out", str(out), "--profile", "H200"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'p.html'} and {out}"
    assert json.loads(out.read_text()) == timeline.predicted(report, cost.PROFILES["H200"], batch=1,
                                                             context=inspect.PREDICT_CONTEXT)


def test_measured_trace_is_drawn_beside_the_prediction(artifact, tmp_path):
    from planc.report import timeline

    art = Path(shutil.copytree(artifact, tmp_path / "art"))
    report = json.loads((art / "report.json").read_text())
    measured = timeline.predicted(report, inspect.cost.PROFILES["H800"], batch=2, context=64)  # stands in for a run's trace
    (art / timeline.MEASURED).write_text(json.dumps(measured))
    page = inspect.render(art)
    section = _section(page, "timeline")
    assert "measured (planc run --trace)" in section and 'id="tl-measured"' in section
    for row in timeline.summary(measured):
        assert f"<td>{row['name']}</td><td>{inspect.ms(row['busy_s'])}</td>" in section
    (art / timeline.MEASURED).write_text("{not json")
    assert "is not a trace planc wrote" in _section(inspect.render(art), "timeline")


FAMILY_PLAN = """version: 1
mesh: {devices: 2}
rules:
  - match: "model.layers.*.self_attn"
    attention: {strategy: %s}
  - match: "model.layers.*.mlp"
    %s
"""


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen2_moe", "olmoe", "deepseek_v2"])
def test_every_family_page_picks_lines_for_everything_it_shows(family, tmp_path):
    """Across the families: each rule, grid cell and graph box the page shows has program lines."""
    from tests.families.configs import build

    moe = family not in ("llama", "qwen3")
    plan = tmp_path / "plan.yaml"
    plan.write_text(FAMILY_PLAN % ("mla_tp" if family.startswith("deepseek") else "tp",
                                   "moe: {strategy: ep}" if moe else "mlp: {strategy: tp}"))
    art = compile(build(family), plan, tmp_path / "art", meta=True).path
    view = inspect.view(art)
    assert view["details"] and all(entry["lines"] for entry in view["details"].values()), \
        [key for key, entry in view["details"].items() if not entry["lines"]]
    shown = {k for k in view["details"] if k.startswith("node:")}
    assert shown == {f"node:{box.key}" for box in view["picture"].nodes}

"""The inspect page in real headless Chromium (Debian's package, installed here when missing).

Skips, saying why, only where Chromium cannot be installed or Playwright is missing.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from planc.report import browser
from planc.report.inspect import human_bytes, write

HOSTILE = "<script>window.__pwned = 1</script>"


def _install_chromium() -> str | None:
    """Install Debian's chromium if no Chromium is on PATH; the reason it cannot be, or None."""
    if browser.find_chromium():
        return None
    if shutil.which("apt-get") is None:
        return "no Chromium and no apt-get to install Debian's chromium package"
    apt = ["apt-get"] if os.geteuid() == 0 else (["sudo", "-n", "apt-get"] if shutil.which("sudo") else None)
    if apt is None:
        return "no Chromium, and installing Debian's chromium package needs root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*apt, "install", "-y", "-q", "chromium"]
    done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:  # stale package lists: refresh them once
        subprocess.run([*apt, "update", "-q"], env=env, capture_output=True, timeout=600)
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0 or not browser.find_chromium():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"installing Debian's chromium package failed: {tail[0]}"
    return None


@pytest.fixture(scope="module")
def chromium():
    why = _install_chromium() or browser.unavailable()
    if why:  # no Chromium and no way to install one (no apt, not root): the page cannot be driven here
        pytest.skip(f"no headless browser: {why}")


@pytest.fixture(scope="module")
def artifact(compiled) -> Path:
    return compiled("deepseek_mla_tp_ep.yaml", 2)


@pytest.fixture(scope="module")
def page_file(artifact, tmp_path_factory) -> Path:
    return write(artifact, tmp_path_factory.mktemp("page") / "inspect.html")


@pytest.fixture(scope="module")
def report(artifact) -> dict:
    return json.loads((artifact / "report.json").read_text())


def test_loads_clean_and_self_contained(chromium, page_file):
    with browser.open_page(page_file) as opened:
        opened.page.wait_for_timeout(200)
        opened.page.click('[data-key="rule:0"]')
        opened.page.click('#tl-profile')
    assert opened.console == [] and opened.requests == []


def test_totals_equal_report_json(chromium, page_file, report):
    with browser.open_page(page_file) as opened:
        page = opened.page
        for rank in report["per_rank"]:
            shown = page.inner_text(f'.val[data-rank="{rank["rank"]}"]')
            assert shown.startswith(human_bytes(rank["weight_bytes"]) + " + ")
            kv = rank["kv_bytes_per_token"] * int(page.input_value("#mem-context"))
            assert f"+ {human_bytes(kv)} KV" in shown
        rows = page.eval_on_selector_all("#collectives tbody tr",
                                         "rows => rows.map(r => [...r.cells].map(c => c.innerText))")
        decode = report["collectives_per_decode_step"]
        assert {op: int(calls) for op, calls, _ in rows} == {op: e["calls"] for op, e in decode.items()}
        for op, _, shown in rows:
            assert f"{decode[op].get('bytes_per_token', decode[op].get('bytes_per_token_max')):,} B" in shown
        # a bigger context moves the KV bar, and the total follows
        page.fill("#mem-context", "1000")
        rank = report["per_rank"][0]
        assert f"+ {human_bytes(rank['kv_bytes_per_token'] * 1000)} KV" in page.inner_text('.val[data-rank="0"]')


@pytest.mark.parametrize("target", ['[data-key="rule:2"]', '[data-key^="cell:1-3:ffn"]', 'g[data-key="node:n8"]'])
def test_picking_scrolls_its_program_lines_into_view(chromium, page_file, target):
    with browser.open_page(page_file, width=1280, height=800) as opened:
        page = opened.page
        page.click(target)
        box = page.evaluate("""() => {
            const first = document.querySelector('.ln.hl');
            const r = first.getBoundingClientRect(), code = document.getElementById('program-code').getBoundingClientRect();
            return {n: document.querySelectorAll('.ln.hl').length, top: r.top, bottom: r.bottom, height: innerHeight,
                    inCode: r.top >= code.top && r.bottom <= code.bottom,
                    details: document.getElementById('details').hidden ? '' : document.getElementById('details').innerText};
        }""")
    assert box["n"] > 0 and 0 <= box["top"] and box["bottom"] <= box["height"] and box["inCode"], box
    assert "program lines" in box["details"] or "strategy" in box["details"]


def test_trace_download_is_a_valid_chrome_trace_of_the_chosen_profile(chromium, page_file, report):
    from planc import cost
    from tests.report.chrome import threads

    with browser.open_page(page_file) as opened:
        opened.page.select_option("#tl-profile", "H200")
        with opened.page.expect_download() as download:
            opened.page.click("#tl-export")
        trace = json.loads(Path(download.value.path()).read_text())
        assert download.value.suggested_filename == "planc-decode-step-H200.json"
    spans = threads(trace)  # complete events, named ranks and threads, ordered, no overlaps
    end = max(e["ts"] + e["dur"] for events in spans.values() for e in events)
    assert end == pytest.approx(cost.artifact_step(report, cost.PROFILES["H200"], 1, 32768)["step_s"] * 1e6, abs=1e-3)
    assert trace["metadata"]["profile"] == "H200" and opened.requests == []


def test_module_name_with_script_renders_as_text(chromium, artifact, tmp_path):
    art = Path(shutil.copytree(artifact, tmp_path / "art"))
    report = json.loads((art / "report.json").read_text())
    record = report["passes"][0]
    record["detail"] = f"module {HOSTILE} declined"
    record["action"] = "declined"
    report["lift_checks"][0]["block"] = f"model.{HOSTILE}"
    report["declines"] = [record]
    (art / "report.json").write_text(json.dumps(report))
    with browser.open_page(write(art, tmp_path / "page.html")) as opened:
        page = opened.page
        assert page.evaluate("window.__pwned") is None
        assert HOSTILE in page.text_content("#lift") and HOSTILE in page.text_content("#passes")
        assert page.eval_on_selector_all("#lift script, #passes script", "s => s.length") == 0
    assert opened.console == []


def test_keyboard_reaches_rules_and_graph_boxes(chromium, page_file):
    with browser.open_page(page_file) as opened:
        page = opened.page
        reached = None
        for _ in range(40):
            page.keyboard.press("Tab")
            key = page.evaluate("document.activeElement.dataset ? document.activeElement.dataset.key || '' : ''")
            if key.startswith("rule:"):
                reached = key
                break
        assert reached == "rule:0"
        page.keyboard.press("Enter")
        assert page.inner_text("#details-title").startswith("rules[0]")
        page.focus('g[data-key="node:n2"]')
        page.keyboard.press("Enter")
        assert page.evaluate("document.querySelectorAll('.ln.hl').length") > 0
        assert not page.evaluate("document.getElementById('details').hidden")


def test_no_horizontal_overflow_at_800px(chromium, page_file):
    with browser.open_page(page_file, width=800, height=900) as opened:
        widths = opened.page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert widths[0] <= widths[1] == 800

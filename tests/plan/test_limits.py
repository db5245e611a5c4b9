"""Hostile plans: each is refused quickly, in one located line naming the field or the limit, by
`planc compile` exiting 2 with no artifact and no temporary directory left."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from planc.cli import main
from planc.plan.load import MAX_DEPTH, MAX_INT_CHARS, MAX_PLAN_BYTES
from planc.plan.schema import MAX_DEVICES, MAX_RULES, MAX_SOURCE_CHARS

HEAD = "version: 1\nmesh: {devices: 2}\n"
RULE = '  - {match: "model.layers.*.mlp", mlp: {strategy: tp}}\n'
SECONDS = 10  # parse and refuse; a compile that got further would load and lift the model first


def refused(tmp_path: Path, capsys, text: str | bytes) -> str:
    """The error line of `planc compile` on a plan holding `text`."""
    plan = tmp_path / "plan.yaml"
    plan.write_bytes(text if isinstance(text, bytes) else text.encode())
    started = time.monotonic()
    code = main(["compile", "tiny-deepseek", str(plan), "-o", str(tmp_path / "art")])
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 2, err
    assert elapsed < SECONDS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.yaml"]  # no artifact, no .art.tmp-*
    lines = err.removeprefix("planc compile: error: ").splitlines()
    assert all(line.startswith(f"{plan}:") for line in lines), err  # one located line per error
    return "\n".join(line.removeprefix(str(plan)) for line in lines)


@pytest.mark.parametrize("nested, where", [("x: " + "[" * 5000 + "]" * 5000, ":3:35:"),
                                           ("x:\n" + "".join(f"{' ' * i}- \n" for i in range(200)), ":35:32:")],
                         ids=["flow", "block"])
def test_deep_nesting(tmp_path, capsys, nested, where):
    said = refused(tmp_path, capsys, HEAD + nested + "\n")  # where: the collection 33 levels down
    assert said == f"{where} invalid YAML: nested more than {MAX_DEPTH} collections deep (the limit); a plan nests 4"


def test_nul_byte(tmp_path, capsys):
    said = refused(tmp_path, capsys, HEAD + "rules: []\x00\n")
    assert said.startswith(":3:10: invalid YAML: character U+0000 is not allowed")


def test_a_5000_digit_integer(tmp_path, capsys):
    said = refused(tmp_path, capsys, "version: 1\nmesh: {devices: " + "9" * 5000 + "}\n")
    assert said == f":2:17: invalid YAML: an integer of 5000 characters; plan integers have at most {MAX_INT_CHARS}"


def test_not_utf8(tmp_path, capsys):
    said = refused(tmp_path, capsys, HEAD.encode() + b"# caf\xe9\n")
    assert said == ":3:6: not UTF-8 (byte 0xe9); save the plan as UTF-8"


def test_plan_size(tmp_path, capsys):
    said = refused(tmp_path, capsys, HEAD + "rules:\n" + RULE * (MAX_PLAN_BYTES // len(RULE) + 1))
    assert said.startswith(f": larger than {MAX_PLAN_BYTES} bytes, the limit of a plan")


def test_rule_count(tmp_path, capsys):
    said = refused(tmp_path, capsys, HEAD + "rules:\n" + RULE * (MAX_RULES + 1))
    assert said == f":3:1: rules: Tuple should have at most {MAX_RULES} items after validation, not {MAX_RULES + 1}"


@pytest.mark.parametrize("devices", [MAX_DEVICES + 1, 10**26])
def test_mesh_devices(tmp_path, capsys, devices):
    said = refused(tmp_path, capsys, f"version: 1\nmesh: {{devices: {devices}}}\n")
    assert said == f":2:8: mesh.devices: Input should be less than or equal to {MAX_DEVICES} (got {devices})"


def test_model_source_length(tmp_path, capsys):
    said = refused(tmp_path, capsys, HEAD + f"model: {{source: {'x' * 5000}}}\n")
    assert said.startswith(f":3:9: model.source: String should have at most {MAX_SOURCE_CHARS} characters (got 'xxx")
    assert len(said) < 200


def test_aliases_do_not_expand(tmp_path, capsys):
    """A billion laughs: nine levels of ten aliases each, refused without expanding them."""
    levels = ["a0: &a0 [" + ", ".join(['"lol"'] * 10) + "]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    said = refused(tmp_path, capsys, HEAD + "\n".join(levels) + "\nrules: *a8\n").splitlines()
    assert said[0] == ":12:1: rules[0]: Input should be a valid dictionary or instance of Rule"
    assert len(said) == 10 + 9  # ten rules, nine unknown keys: the aliases were not expanded into errors


def test_a_device_file_is_read_only_up_to_the_limit(tmp_path, capsys):
    zero = Path("/dev/zero")
    if not zero.exists():
        pytest.skip("no /dev/zero")  # a platform without device files; the size limit has its own test above
    code = main(["validate", str(zero)])
    assert code == 2 and f"/dev/zero: larger than {MAX_PLAN_BYTES} bytes" in capsys.readouterr().err

"""Fuzzing the plan front end: generated plans, valid and mutated, through `planc validate` and
`planc compile --meta`. Each succeeds or fails with exit status 2 and an error located in the plan
(or naming the MODEL given on the command line), never a traceback, and never imports a module a
plan names. PLANC_FUZZ_EXAMPLES sets the number of examples (default 500, ~30 s on 2 CPU cores).
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planc.cli import main
from planc.codegen.replace import leftovers
from planc.models.registry import WEIGHTS_DIR

EXAMPLES = int(os.environ.get("PLANC_FUZZ_EXAMPLES", "500"))
TRAP = "planc_fuzz_trap"  # a module on sys.path that no plan may get imported
TRAPS = (TRAP, f"{TRAP}.inner", "planc_fuzz_missing", "os", "subprocess", "builtins", "planc.models.registry")

# Lists repeat an entry to weight it: most plans are nearly valid, so that they reach bind, the passes
# and codegen; sources that load a model are a few, so that 500 examples stay cheap.
SOURCES = [f"{TRAP}:build", f"{TRAP}.inner:build", "planc_fuzz_missing:build", "os:abort", "os:_exit",
           "subprocess:getoutput", "builtins:exit", "planc.models.registry:_tiny_deepseek", ":build", "os:",
           "..:x", "/", "/etc/passwd", "/dev/null", ".", "..", "~/model", "C:\\models\\x", "planc/models/weights",
           "a\x00b", "é" * 300, "x" * 5000, " ", "tiny-deepsek", "deepseek-v3", "kimi-k2", "tiny-deepseek",
           "tiny-draft", "@ckpt", "@config", "@broken-config", "@not-json-config"]
MATCHES = ["model.layers.*.self_attn"] * 4 + ["model.layers.*.mlp"] * 3 + ["model.layers.*.self_attn.o_proj"] + [
    "model.layers.0.mlp", "model.layers.[1-3].mlp", "*", "model.*", "", "[", "model.layers.*.self_att[n\nimport os]",
    "model.layers.99.mlp", "lm_head", "x" * 300]
SECTIONS = {"attention": ["replicated", "tp", "mla_tp", "mla_tp", "tpla", "tpla", "sharded"],
            "mlp": ["replicated", "tp", "tp", "ep"], "moe": ["replicated", "ep", "ep", "tp"], "overlap": ["t3", "t3", "t4"]}
DISCRIMINATORS = {"overlap": "kind"}  # the key that picks a section's strategy, where it is not `strategy`
FIELDS = {"tpla": {"latent_groups": [1, 2, 2, 4, 3, 0, 10**30], "transform": ["none", "hadamard", "pca", "x"],
                   "prefill": ["mla", "tpla"], "rmsnorm": ["sliced", "exact", "recompute"],
                   "scales": ["none", "calibrated"], "calibration_tokens": [16, 4096, 0, 10**30],
                   "seed": [0, 1, -1, 2**70, "s"]},
          "ep": {"placement": ["contiguous", "contiguous", "strided"]},
          "t3": {"min_tokens": ["auto", 0, 1, 64, -1, 10**30], "chunks": ["auto", 1, 2, 0, 10**30]}}
DEVICES = [1, 3] + [2] * 6 + [4] * 4 + [8] * 2 + [0, -1, 1024, 1025, 10**30, True, "2", 2.5, None]
TOKENS = [":", "{", "}", "[", "]", "&a", "*a", "!!python/object/apply:os.system ['true']", "!!binary", "<<", "\x00",
          "\t", "%YAML 1.1", "'", '"', "\n", "- ", "#", "|", ">", "\u2028", "\ufeff", "9" * 60, "---", "...", "?"]


def _section(name: str) -> st.SearchStrategy[dict]:
    return st.sampled_from(SECTIONS[name]).flatmap(lambda strategy: st.fixed_dictionaries(
        {DISCRIMINATORS.get(name, "strategy"): st.just(strategy)},
        optional={"required": st.sampled_from([True, False, False, "yes"]),
                  **{key: st.sampled_from(values) for key, values in FIELDS.get(strategy, {}).items()}}))


def _rule() -> st.SearchStrategy[dict]:
    section = st.sampled_from(sorted(SECTIONS)).flatmap(lambda name: st.fixed_dictionaries({name: _section(name)}))
    return st.builds(lambda match, sec, extra: {"match": match, **sec, **extra}, st.sampled_from(MATCHES), section,
                     st.sampled_from([{}] * 8 + [{"mlp": {"strategy": "tp"}}, {"matches": "x"}]))


def _plan() -> st.SearchStrategy[dict]:
    model = st.fixed_dictionaries({"source": st.sampled_from(SOURCES)},
                                  optional={"dtype": st.sampled_from(["auto", "float32", "bfloat16", "int8"])})
    return st.fixed_dictionaries(
        {"version": st.sampled_from([1] * 14 + [2, "1"]),
         "mesh": st.fixed_dictionaries({"devices": st.sampled_from(DEVICES)},
                                       optional={"backend": st.sampled_from(["auto", "gloo", "nccl", "mpi"])})},
        optional={"model": model, "rules": st.lists(_rule(), max_size=5)})


@st.composite
def _text(draw) -> bytes:
    """A plan as YAML, then 0-3 mutations of its text: a token inserted, a span deleted, a line
    repeated, a byte that is not UTF-8, or flow brackets nested up to 100 deep."""
    text = yaml.safe_dump(draw(_plan()), sort_keys=False, allow_unicode=True).encode()
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2, 3]))):
        at = draw(st.integers(0, len(text)))
        kind = draw(st.sampled_from(["insert", "insert", "delete", "repeat", "byte", "nest"]))
        if kind == "insert":
            text = text[:at] + draw(st.sampled_from(TOKENS)).encode() + text[at:]
        elif kind == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 20)):]
        elif kind == "repeat":
            lines = text.splitlines(keepends=True) or [b""]
            line = lines[at % len(lines)]
            text = b"".join(lines[:at % len(lines)] + [line, line] + lines[at % len(lines):])
        elif kind == "byte":
            text = text[:at] + bytes([draw(st.sampled_from([0x80, 0xC3, 0xFF, 0xFE]))]) + text[at:]
        else:
            depth = draw(st.integers(1, 100))
            text = text[:at] + b"[" * depth + b"]" * depth + text[at:]
    return text


@st.composite
def _case(draw) -> tuple[bytes, list[str]]:
    """(plan bytes, command line with PLAN and OUT placeholders)."""
    command = draw(st.sampled_from(["validate"] * 4 + ["validate --meta"] * 3 + ["validate --model", "compile"]))
    argv = {"validate": ["validate", "PLAN"], "validate --meta": ["validate", "PLAN", "--meta"],
            "validate --model": ["validate", "PLAN", "--meta", "--model", draw(st.sampled_from(["tiny-deepseek", "nope"]))],
            "compile": ["compile", "tiny-deepseek", "PLAN", "-o", "OUT", "--meta"]}[command]
    return draw(_text()), argv + draw(st.sampled_from([[], [], ["--strict"]]))


@contextlib.contextmanager
def _imports_recorded(root: Path) -> Iterator[list[str]]:
    """Names in TRAPS that anything asks importlib to import (refused), and the trap module on sys.path."""
    (root / f"{TRAP}.py").write_text(f"raise SystemExit('{TRAP} was imported')\n")
    attempts: list[str] = []
    real = importlib.import_module

    def recorded(name, package=None):
        if name in TRAPS or name.split(".")[0] == TRAP:
            attempts.append(name)
            raise ImportError(f"the fuzz test refuses to import {name}")
        return real(name, package)

    importlib.import_module = recorded
    sys.path.insert(0, str(root))
    try:
        yield attempts
    finally:
        importlib.import_module = real
        sys.path.remove(str(root))


def _sources(root: Path) -> dict[str, str]:
    """The @-named sources: a checkpoint, a config.json, and broken ones."""
    shutil.copytree(WEIGHTS_DIR / "tiny-draft", root / "ckpt")
    (root / "config.json").write_text(json.dumps(json.loads((WEIGHTS_DIR / "tiny-draft" / "config.json").read_text())))
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text('{"model_type": ')
    (root / "broken" / "model.safetensors").write_bytes(b"\xff" * 16)
    (root / "not-json.json").write_text("[1, 2")
    return {"@ckpt": str(root / "ckpt"), "@config": str(root / "config.json"), "@broken-config": str(root / "broken"),
            "@not-json-config": str(root / "not-json.json")}


def test_generated_plans_fail_located_or_succeed(tmp_path):
    sources = _sources(tmp_path)
    plan, out = tmp_path / "plan.yaml", tmp_path / "out" / "art"

    with _imports_recorded(tmp_path) as attempts:
        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(case=_case())
        def run(case: tuple[bytes, list[str]]) -> None:
            text, argv = case
            attempts.clear()
            for name, path in sources.items():
                text = text.replace(name.encode(), path.encode())
            plan.write_bytes(text)
            argv = [{"PLAN": str(plan), "OUT": str(out)}.get(a, a) for a in argv]
            shutil.rmtree(out.parent, ignore_errors=True)
            stdout, stderr = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                code = main(argv)
            err = stderr.getvalue()
            assert not attempts, attempts
            assert code in (0, 2) and "Traceback" not in err, err
            if code == 2:
                named = argv[argv.index("--model") + 1] if "--model" in argv else None
                first = err.splitlines()[0]
                assert first.startswith(f"planc {argv[0]}: error: "), err
                assert str(plan) in err or (named and repr(named) in first), err
                assert not out.exists(), err
            if argv[0] == "compile":
                assert not leftovers(out)

        run()

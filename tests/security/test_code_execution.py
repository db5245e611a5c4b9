"""Nothing runs that the user did not ask for: a checkpoint's path or a module's name reaches
program.py only as a literal, a checkpoint's custom code is never run (even when a terminal would
answer "y"), a plan cannot make planc import a factory, and pickled weights are never read."""
from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from planc.cli import main
from planc.driver import compile
from planc.errors import ModelError, PlanError
from planc.lift.captured import export_block, load
from planc.models.registry import WEIGHTS_DIR, load_model
from planc.models.tokenizer import load_checkpoint_tokenizer
from planc.runtime.artifact import open_artifact
from tests.conftest import PLANS, ROOT
from tests.models import byte_bpe, tiny_llama

# A name that closes a docstring or a string literal, starts a statement and comments out the rest.
INJECTED = "x\"\"\"'''\nraise SystemExit('injected code ran')\n#"
DRAFT_PLAN = PLANS / "draft_tp.yaml"


def _draft_plan_for(tmp_path) -> str:
    """plans/draft_tp.yaml without its model section: the checkpoint is given as MODEL (a MODEL
    other than the plan's model.source is an error)."""
    lines = DRAFT_PLAN.read_text().splitlines(keepends=True)
    (tmp_path / "draft_tp.yaml").write_text("".join(line for line in lines if not line.startswith("model:")))
    return str(tmp_path / "draft_tp.yaml")


@pytest.fixture
def answer_yes(monkeypatch):
    """A user at a terminal who answers yes to transformers' "run the custom code? [y/N]"."""
    monkeypatch.setattr("builtins.input", lambda *args: "y")


def test_a_checkpoint_path_reaches_program_py_only_as_a_literal(tmp_path, capsys):
    ckpt = tmp_path / INJECTED
    shutil.copytree(WEIGHTS_DIR / "tiny-draft", ckpt)
    out = tmp_path / "art"
    assert main(["compile", str(ckpt), _draft_plan_for(tmp_path), "-o", str(out), "--meta"]) == 0, capsys.readouterr().err
    source = (out / "programs" / "target" / "program.py").read_text()
    tree = ast.parse(source)
    # Below the docstring only imports, constants and definitions: importing the program runs nothing.
    assert all(isinstance(n, (ast.Import, ast.ImportFrom, ast.Assign, ast.FunctionDef)) for n in tree.body[1:])
    assert INJECTED not in ast.get_docstring(tree)
    model = next(n.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "MODEL")
    assert ast.literal_eval(model) == str(ckpt)
    assert open_artifact(out).load_module("programs/target/program.py", "p").MODEL == str(ckpt)


class _Odd(nn.Module):
    """A feed-forward block whose child is named to break out of a string literal."""

    def __init__(self):
        super().__init__()
        self.add_module(INJECTED, nn.Linear(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(getattr(self, INJECTED)(x))


def test_module_names_reach_captured_code_only_as_literals():
    module = _Odd().eval()
    x = torch.randn(2, 3, 8)
    fn = export_block(module, f"model.layers.0.{INJECTED}", x)
    assert fn.name.isidentifier() and fn.name.isascii()
    strings = {n.value for n in ast.walk(ast.parse(fn.source)) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert f"{INJECTED}.weight" in strings  # W['...'], escaped
    W = dict(module.named_parameters())
    torch.testing.assert_close(load(fn)(x, W), module(x), rtol=0, atol=0)


def _custom_code_checkpoint(tmp_path, marker):
    ckpt = shutil.copytree(WEIGHTS_DIR / "tiny-draft", tmp_path / "custom")
    config = json.loads((ckpt / "config.json").read_text())
    config["model_type"] = "planc_custom"  # no class transformers knows: only the shipped code could load it
    config["auto_map"] = {"AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.Model"}
    (ckpt / "config.json").write_text(json.dumps(config))
    (ckpt / "custom.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit('custom code ran')\n")
    return ckpt


def test_a_checkpoints_custom_code_is_not_run(tmp_path, answer_yes, capsys):
    marker = tmp_path / "ran"
    ckpt = _custom_code_checkpoint(tmp_path, marker)
    started = time.monotonic()
    assert main(["validate", _draft_plan_for(tmp_path), "--model", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"{ckpt}/config.json: model_type 'planc_custom' is not one transformers" in err
    assert 'planc runs none); its architectures name LlamaForCausalLM, which transformers has: set "model_type": "llama"' in err
    assert not marker.exists() and time.monotonic() - started < 30


def test_a_tokenizers_custom_code_is_not_run(tmp_path, answer_yes):
    marker = tmp_path / "ran"
    byte_bpe().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(auto_map={"AutoTokenizer": ["tok.Tok", None]}, tokenizer_class="Tok")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "tok.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(ModelError, match="no remote code"):
        load_checkpoint_tokenizer(tmp_path)
    assert not marker.exists()


FACTORY_MODULE = "planc_test_factory"


@pytest.fixture
def factory(tmp_path, monkeypatch):
    """An importable package.module:factory building a tiny Llama; unloaded afterwards."""
    (tmp_path / f"{FACTORY_MODULE}.py").write_text(
        "from transformers import AutoModelForCausalLM, LlamaConfig\n"
        f"def build():\n    return AutoModelForCausalLM.from_config(LlamaConfig(**{tiny_llama().to_diff_dict()!r}))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, FACTORY_MODULE, raising=False)
    yield f"{FACTORY_MODULE}:build"
    sys.modules.pop(FACTORY_MODULE, None)


def _plan(tmp_path, source: str):
    path = tmp_path / "plan.yaml"
    path.write_text(f"version: 1\nmesh: {{devices: 2}}\nmodel: {{source: {json.dumps(source)}}}\n"
                    "rules:\n  - match: \"model.layers.*.self_attn\"\n    attention: {strategy: tp}\n")
    return path


def test_a_factory_a_plan_names_is_not_imported(tmp_path, factory, capsys):
    plan = _plan(tmp_path, factory)
    assert main(["validate", str(plan)]) == 2
    err = capsys.readouterr().err
    assert f"{plan}:3:9: model.source: '{factory}' names Python code" in err and len(err.splitlines()) == 1
    with pytest.raises(PlanError, match="names Python code"):
        compile(None, plan, tmp_path / "art", meta=True)
    assert FACTORY_MODULE not in sys.modules and not (tmp_path / "art").exists()


def test_a_factory_the_user_names_is_honoured(tmp_path, factory, capsys):
    plan = _plan(tmp_path, "tiny-draft")
    assert main(["validate", str(plan), "--model", factory, "--meta"]) == 0, capsys.readouterr().err
    assert FACTORY_MODULE in sys.modules
    assert "valid for planc_test_factory:build" in capsys.readouterr().out


def test_os_abort_in_a_plan_is_refused_in_a_fresh_process(tmp_path):
    """The issue's reproduction: `planc validate` on a plan naming os:abort, as a user runs it."""
    plan = _plan(tmp_path, "os:abort")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "planc.cli", "validate", str(plan)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr  # not -6 (SIGABRT)
    assert done.stderr.splitlines()[-1] == (
        f"planc validate: error: {plan}:3:9: model.source: 'os:abort' names Python code (package.module:factory), "
        "and planc imports nothing a plan names; pass it yourself as MODEL: `planc compile MODEL PLAN -o OUT`, "
        "`planc validate PLAN --model MODEL`, or compile(model=...) in Python")
    assert "Traceback" not in done.stderr and time.monotonic() - started < 60


class _Pickled:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling this calls os.mkdir(marker)
        return os.mkdir, (self.marker,)


def test_pickled_weights_are_never_read(tmp_path):
    marker = tmp_path / "ran"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(WEIGHTS_DIR / "tiny-draft" / "config.json", ckpt)
    with open(ckpt / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Pickled(marker)}, f)
    with pytest.raises(ModelError, match=r"no weight files \(\*.safetensors\); planc does not read pickled weights "
                                         r"\(pytorch_model.bin\)"):
        load_model(str(ckpt))
    assert not marker.exists()

"""model.dtype auto: the checkpoint's own dtype, float32 where nothing is stored."""
from __future__ import annotations

import json

import pytest
import torch

from planc.driver import compile, resolve_model
from planc.errors import ModelError
from planc.models.registry import dtype_name, load_model, resolve_dtype
from planc.plan import Plan
from tests.models import write_checkpoint


def _plan(model: dict | None = None) -> Plan:
    return Plan.model_validate({"version": 1, "mesh": {"devices": 1}, **({"model": model} if model else {})})


def test_auto_is_the_default_and_a_missing_model_section_means_auto():
    assert _plan({"source": "x"}).model.dtype == "auto"
    assert _plan({"source": "x", "dtype": "float16"}).model.dtype == "float16"
    assert "dtype" not in _plan({"source": "x"}).to_yaml_dict()["model"]


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("bf16") / "ckpt", torch.bfloat16)


def test_auto_reads_config_dtype_then_safetensors_then_float32(bf16_ckpt, tmp_path):
    assert json.loads((bf16_ckpt / "config.json").read_text())["dtype"] == "bfloat16"
    assert resolve_dtype(str(bf16_ckpt), "auto") == torch.bfloat16
    config = json.loads((bf16_ckpt / "config.json").read_text())
    for name, value, want in (("torch_dtype", "float16", torch.float16),  # the older key
                              ("dtype", None, torch.bfloat16)):  # no stored name: the tensors' dtype
        ckpt = tmp_path / name
        ckpt.mkdir()
        (ckpt / "model.safetensors").symlink_to(bf16_ckpt / "model.safetensors")
        edited = {k: v for k, v in config.items() if k != "dtype"} | ({name: value} if value else {})
        (ckpt / "config.json").write_text(json.dumps(edited))
        assert resolve_dtype(str(ckpt), "auto") == want, name
    config_file = tmp_path / "config_only.json"
    config_file.write_text(json.dumps(config))  # a random init (or a --meta plan) in the dtype it names
    assert resolve_dtype(str(config_file), "auto") == torch.bfloat16
    config_file.write_text(json.dumps({k: v for k, v in config.items() if k != "dtype"}))
    assert resolve_dtype(str(config_file), "auto") == torch.float32
    assert resolve_dtype("tiny-deepseek", "auto") == torch.float32
    assert resolve_dtype(str(bf16_ckpt), "float32") == torch.float32


def test_a_plan_without_dtype_loads_a_bfloat16_checkpoint_in_bfloat16(bf16_ckpt):
    model, _ = resolve_model(None, _plan({"source": str(bf16_ckpt)}), meta=False)
    assert dtype_name(model) == "bfloat16"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model, _ = resolve_model(str(bf16_ckpt), _plan(), meta=False)  # no model section: auto too
    assert dtype_name(model) == "bfloat16"
    model, _ = resolve_model(None, _plan({"source": str(bf16_ckpt), "dtype": "float32"}), meta=False)
    assert dtype_name(model) == "float32"
    assert dtype_name(load_model("tiny-draft")) == "float32"


def test_a_quantized_checkpoint_is_refused_before_loading_and_a_quantized_config_plans_unquantized(bf16_ckpt, tmp_path):
    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
    ckpt = tmp_path / "fp8"
    ckpt.mkdir()
    (ckpt / "model.safetensors").symlink_to(bf16_ckpt / "model.safetensors")
    config = json.loads((bf16_ckpt / "config.json").read_text()) | {"quantization_config": fp8}
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=rf"{ckpt}/config.json: quantization_config \(quant_method 'fp8'\): the "
                                         "weights are stored quantized"):
        load_model(str(ckpt))
    lines = []
    artifact = compile(str(ckpt / "config.json"), _plan(), tmp_path / "out", meta=True, log=lines.append)
    assert ("note     quantization_config (quant_method 'fp8') not applied: planc compiles the unquantized model, "
            "in bfloat16; weight bytes are for that") in lines
    assert artifact.manifest["dtype"] == "bfloat16"

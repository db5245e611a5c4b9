"""Bad input: a clear error naming the field or file and a fix, exit status 2, no artifact."""
from __future__ import annotations

from pathlib import Path


from planc.cli import main
from tests.conftest import PLANS

GOOD = (PLANS / "deepseek_mla_tp_ep.yaml").read_text()


def compile_fails(tmp_path: Path, capsys, plan_text: str | None = None, *flags: str, model: str = "tiny-deepseek") -> str:
    plan = tmp_path / "plan.yaml"
    plan_text = plan_text if plan_text is not None else GOOD
    if model not in plan_text:  # another MODEL than the plan's model.source is an error of its own
        plan_text = "".join(line for line in plan_text.splitlines(keepends=True) if not line.startswith("model:"))
    plan.write_text(plan_text)
    out = tmp_path / "artifact"
    code = main(["compile", model, str(plan), "-o", str(out), *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".artifact")]  # no temp dirs left
    return err


def test_unknown_key(tmp_path, capsys):
    err = compile_fails(tmp_path, capsys, GOOD.replace("attention: {strategy: mla_tp}", "atention: {strategy: mla_tp}"))
    assert "plan.yaml:" in err and "'atention'" in err and "did you mean 'attention'" in err


def test_duplicate_key(tmp_path, capsys):
    err = compile_fails(tmp_path, capsys, GOOD.replace("mesh: {devices: 2}", "mesh: {devices: 2, devices: 4}"))
    assert "duplicate key 'devices'" in err and "plan.yaml:" in err


def test_malformed_yaml(tmp_path, capsys):
    err = compile_fails(tmp_path, capsys, GOOD.replace("mesh: {devices: 2}", "mesh: {devices: 2"))
    assert "invalid YAML" in err and "plan.yaml:" in err


def test_rule_matching_nothing(tmp_path, capsys):
    err = compile_fails(tmp_path, capsys, GOOD.replace('"model.layers.*.self_attn"', '"model.layer.*.self_attn"'))
    assert "rules[0].match" in err and "bound no attention block" in err and "model.layers.0.self_attn" in err


def test_heads_not_divisible_lists_valid_degrees(tmp_path, capsys):
    err = compile_fails(tmp_path, capsys, GOOD.replace("devices: 2", "devices: 3"), "--strict")
    assert "4 heads do not split over 3 devices; valid degrees: 1, 2, 4" in err


def test_strategy_for_wrong_block_kind(tmp_path, capsys):
    err = compile_fails(tmp_path, capsys, GOOD.replace("strategy: mla_tp", "strategy: tp"))
    assert "'tp' does not apply" in err and "'mla_tp'" in err and "'tpla'" in err


def test_missing_checkpoint_weights(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    err = compile_fails(tmp_path, capsys, model=str(ckpt))
    assert str(ckpt) in err and "no weight files" in err


def test_corrupt_checkpoint(tmp_path, capsys):
    from planc.models.registry import load_model

    ckpt = tmp_path / "ckpt"
    load_model("tiny-draft").save_pretrained(ckpt)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated download
    err = compile_fails(tmp_path, capsys, model=str(ckpt))
    assert str(ckpt) in err and "cannot load checkpoint" in err


def test_a_checkpoint_lacking_a_tensor_is_refused_not_filled_at_random(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from planc.models.registry import load_model

    ckpt = tmp_path / "ckpt"
    load_model("tiny-draft").save_pretrained(ckpt)
    weights = ckpt / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp.down_proj.weight"]  # a weight lost in a hand-made conversion
    save_file(tensors, weights, metadata={"format": "pt"})
    err = compile_fails(tmp_path, capsys, model=str(ckpt))
    assert str(ckpt) in err and "lack 1 of" in err and "model.layers.1.mlp.down_proj.weight" in err


def test_unknown_model_name(tmp_path, capsys):
    err = compile_fails(tmp_path, capsys, model="tiny-deepsek")
    assert "'tiny-deepsek'" in err and "tiny-deepseek" in err


def test_devices_differ_from_launched_world_size(compiled, capsys):
    artifact = compiled("deepseek_mla_tp_ep.yaml", 2)
    code = main(["run", str(artifact), "--nproc", "4", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2
    assert "mesh.devices = 2" in err and "--nproc 2" in err


def test_run_needs_an_artifact(tmp_path, capsys):
    assert main(["run", str(tmp_path)]) == 2
    assert "not a planc artifact" in capsys.readouterr().err


def test_full_size_model_needs_meta(tmp_path, capsys):
    err = compile_fails(tmp_path, capsys, GOOD.replace("tiny-deepseek", "deepseek-v3"), model="deepseek-v3")
    assert "--meta" in err


def test_a_meta_artifact_cannot_run(tmp_path, capsys):
    from planc.driver import compile

    artifact = compile("tiny-deepseek", PLANS / "deepseek_mla_tp_ep.yaml", tmp_path / "dry", meta=True).path
    assert main(["run", str(artifact)]) == 2
    assert "--meta" in capsys.readouterr().err


def test_an_artifact_without_the_chosen_kernel_says_recompile(compiled, tmp_path, capsys):
    import shutil

    artifact = shutil.copytree(compiled("deepseek_mla_tp_ep.yaml", 2), tmp_path / "old")
    (artifact / "kernels" / "mla_decode_cpu.py").unlink()
    assert main(["run", str(artifact), "--kernels", "cpu", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "mla_decode_cpu.py is missing" in err and "planc compile" in err

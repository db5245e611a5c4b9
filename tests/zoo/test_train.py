"""The training loop: reproducible, balancing routers, distilling, and shipping checkpoints."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from planc.models.registry import load_model
from planc.zoo import train as zoo_train
from planc.zoo.train import RouterBalancer, TrainConfig, build_model, lr_at
from tests.zoo import mini_deepseek, mini_llama

MINI = TrainConfig(steps=50, batch_size=4, seq_len=32, warmup=5, threads=1)


def test_same_seed_reproduces_the_first_50_losses():
    first = zoo_train.train(build_model(mini_deepseek(), MINI.seed), MINI)
    second = zoo_train.train(build_model(mini_deepseek(), MINI.seed), MINI)
    assert len(first) == 50 and all(math.isfinite(x) for x in first)
    # Same process, same thread count, same data: the bar is 1e-6.
    assert max(abs(a - b) for a, b in zip(first, second)) <= 1e-6
    assert sum(first[-10:]) < sum(first[:10])  # it learns
    other = zoo_train.train(build_model(mini_deepseek(), 1), dataclasses.replace(MINI, steps=5, seed=1))
    assert other != first[:5]


def test_router_bias_moves_toward_balance():
    model = build_model(mini_deepseek(), 0)
    balancer = RouterBalancer(model, speed=0.01)
    (name,) = balancer.routers
    balancer.load[name] += torch.tensor([6.0, 2.0, 0.0, 0.0])  # mean 2: expert 0 over, 2 and 3 under
    balancer.update()
    bias = balancer.routers[name].e_score_correction_bias
    assert torch.equal(bias, torch.tensor([-0.01, 0.0, 0.01, 0.01]))
    assert not balancer.load[name].any()  # counts restart every step


def test_eval_forwards_do_not_move_the_bias():
    model = build_model(mini_deepseek(), 0)
    balancer = RouterBalancer(model, speed=0.01)
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.arange(16)[None], use_cache=False)
    assert not any(load.any() for load in balancer.load.values())


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    tc = TrainConfig(steps=100, lr=1e-3, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, tc) == pytest.approx(1e-4) and lr_at(9, tc) == pytest.approx(1e-3)
    assert lr_at(10, tc) == pytest.approx(1e-3)
    assert lr_at(99, tc) == pytest.approx(1e-4, rel=1e-2)
    assert all(lr_at(s, tc) >= lr_at(s + 1, tc) for s in range(10, 99))


def test_distillation_is_reproducible_and_leaves_the_teacher_alone():
    teacher = build_model(mini_deepseek(), 0).eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    tc = TrainConfig(steps=5, batch_size=2, seq_len=16, warmup=2, threads=1, distill_weight=0.5)
    first = zoo_train.train(build_model(mini_llama(), 0), tc, teacher=teacher)
    second = zoo_train.train(build_model(mini_llama(), 0), tc, teacher=teacher)
    assert first == second
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())


def test_run_saves_a_loadable_checkpoint_and_records_it(tmp_path):
    out = tmp_path / "weights" / "tiny-deepseek"
    tc = TrainConfig(steps=3, batch_size=2, seq_len=16, warmup=1, threads=1)
    entry = zoo_train.run("tiny-deepseek", tc, out, log=lambda msg: None, config=mini_deepseek())
    manifest = json.loads((out.parent / "manifest.json").read_text())
    assert manifest["models"]["tiny-deepseek"] == json.loads(json.dumps(entry))
    assert "bench_zoo" not in manifest  # only the bundled directory gets the bench figures
    assert set(entry["files"]) == {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors"}
    for name, digest in entry["files"].items():
        assert zoo_train.sha256_file(out / name) == digest
    assert entry["steps"] == 3 and entry["seed"] == 0 and 0 < entry["heldout_bpb"] < 9
    model = load_model(str(out))
    assert model.config.hidden_size == 32
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind

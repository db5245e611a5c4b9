"""Train a bundled model on the stdlib corpus and ship it: `python -m planc.zoo.train NAME`.

    python -m planc.zoo.train tiny-deepseek            # then
    python -m planc.zoo.train tiny-draft               # distilled from the trained tiny-deepseek

The architecture is the registry's config; RECIPES holds each model's fixed hyper-parameters.
AdamW, linear warmup then cosine decay, fixed seed, data order fixed by the seed
(corpus.batch is stateless in the step). The loss is next-byte cross-entropy; with a teacher it is
(1 - w)·CE + w·KL(teacher ‖ student) at temperature 1.

MoE routers are balanced without an auxiliary loss, as DeepSeek-V3 does: after each step every
router's e_score_correction_bias moves by `bias_update` toward balance (down for experts that got
more than the mean number of tokens this step, up for those that got fewer). The bias only
changes which experts are chosen, not their weights.

The checkpoint is written with save_pretrained to a temporary directory beside the target, then
renamed into place; the manifest (weights/manifest.json) records config, recipe, wall time,
final train loss, held-out bits per byte, the sha256 of each file, the corpus fingerprint and,
for the bundled directory, the `planc bench zoo` figures.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from planc.models.registry import BUNDLED, WEIGHTS_DIR, bundled_config, load_model, pin_static_paths
from planc.zoo import corpus

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    # DeepSeek-V3's γ for the routers' correction bias. It uses 1e-3 over 14.8T tokens; a run of
    # a thousand steps needs the bias to catch up with the router within tens of steps.
    bias_update: float = 1e-2
    teacher: str | None = None  # a bundled model (or checkpoint directory) to distill from
    distill_weight: float = 0.7
    threads: int = 1  # on a 2-core machine shared with other jobs, 1 thread is ~3x faster than 2


RECIPES: dict[str, TrainConfig] = {
    "tiny-deepseek": TrainConfig(steps=1000),
    # Distillation makes the draft learn fast: at 1000 steps it edged past its teacher (1.957 vs
    # 1.982 bits/byte). A draft is the cheaper, weaker model, so it gets half the steps.
    "tiny-draft": TrainConfig(steps=500, teacher="tiny-deepseek"),
}


# -- model and optimizer ----------------------------------------------------------------------


def build_model(config: PretrainedConfig, seed: int) -> nn.Module:
    pin_static_paths(config)  # grouped_mm experts: the path planc captures, and it has a CPU backward
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()


def make_optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    # Matrices (and the 3-D expert stacks) decay; norms' gains do not.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, 0.95), eps=1e-8)


def lr_at(step: int, tc: TrainConfig) -> float:
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    progress = (step - tc.warmup) / max(tc.steps - tc.warmup, 1)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class RouterBalancer:
    """Counts each router's expert choices during a step; update() nudges the correction bias."""

    def __init__(self, model: nn.Module, speed: float):
        self.speed = speed
        self.routers = {name: m for name, m in model.named_modules() if hasattr(m, "e_score_correction_bias")}
        self.load = {name: torch.zeros_like(m.e_score_correction_bias) for name, m in self.routers.items()}
        self.handles = [router.register_forward_hook(self._counter(name)) for name, router in self.routers.items()]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _counter(self, name: str) -> Callable:
        def hook(module: nn.Module, args, output) -> None:
            if module.training:  # evaluation forwards must not move the bias
                topk_indices = output[-1]
                self.load[name] += torch.bincount(topk_indices.flatten(), minlength=len(self.load[name]))
        return hook

    @torch.no_grad()
    def update(self) -> dict[str, float]:
        """Apply one DeepSeek-V3 bias step; returns max/mean expert load per router for logging."""
        imbalance = {}
        for name, router in self.routers.items():
            load = self.load[name]
            router.e_score_correction_bias += self.speed * torch.sign(load.mean() - load)
            imbalance[name] = float(load.max() / load.mean().clamp(min=1))
            load.zero_()
        return imbalance


# -- the loop ---------------------------------------------------------------------------------


def step_loss(model: nn.Module, ids_BS: torch.Tensor, teacher: nn.Module | None, tc: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to minimize, next-byte cross-entropy in nats)."""
    logits = model(input_ids=ids_BS, use_cache=False).logits[:, :-1].flatten(0, 1)
    ce = F.cross_entropy(logits, ids_BS[:, 1:].flatten())
    if teacher is None:
        return ce, ce
    with torch.no_grad():
        target_logp = F.log_softmax(teacher(input_ids=ids_BS, use_cache=False).logits[:, :-1].flatten(0, 1), dim=-1)
    kl = F.kl_div(F.log_softmax(logits, dim=-1), target_logp, log_target=True, reduction="batchmean")
    return (1 - tc.distill_weight) * ce + tc.distill_weight * kl, ce


def train(model: nn.Module, tc: TrainConfig, *, teacher: nn.Module | None = None,
          log: Callable[[str], None] | None = None, log_every: int = 25) -> list[float]:
    """Run tc.steps optimizer steps in place; returns the cross-entropy (nats) of every step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(tc.threads)
    try:
        return _loop(model, tc, teacher, log, log_every)
    finally:
        torch.set_num_threads(threads)


def _loop(model: nn.Module, tc: TrainConfig, teacher: nn.Module | None, log: Callable[[str], None] | None,
          log_every: int) -> list[float]:
    model.train()
    opt = make_optimizer(model, tc)
    balancer = RouterBalancer(model, tc.bias_update)
    losses, started = [], time.perf_counter()
    for step in range(tc.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc)
        loss, ce = step_loss(model, corpus.batch("train", step, tc.batch_size, tc.seq_len, tc.seed), teacher, tc)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        imbalance = balancer.update()
        losses.append(ce.item())
        if log and (step % log_every == 0 or step == tc.steps - 1):
            experts = f"  expert max/mean {max(imbalance.values()):.2f}" if imbalance else ""
            log(f"step {step:5d}  ce {ce.item():.4f}  lr {lr_at(step, tc):.2e}{experts}  "
                f"{time.perf_counter() - started:7.1f}s")
    balancer.remove()
    return losses


# -- shipping ---------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(model: nn.Module, out: Path) -> dict[str, str]:
    """save_pretrained into a temporary sibling, then swap it into place; returns {file: sha256}."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = out.with_name(f".{out.name}.tmp{os.getpid()}"), out.with_name(f".{out.name}.old{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.eval().save_pretrained(tmp)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    for path in out.iterdir():
        path.chmod(0o644)  # save_pretrained writes the weights owner-only; they ship in the package
    return {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.is_file()}


def corpus_record() -> dict:
    files = corpus.files()
    return {"fingerprint": corpus.fingerprint(), "python": platform.python_version(),
            "files": len(files), "bytes": sum(f.size for f in files)}


def update_manifest(path: Path, name: str, entry: dict, bench: dict | None) -> None:
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    manifest.setdefault("models", {})[name] = entry
    manifest["corpus"] = entry["corpus"]
    if bench is not None:
        manifest["bench_zoo"] = bench
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def run(name: str, tc: TrainConfig, out: Path, log: Callable[[str], None] = print,
        config: PretrainedConfig | None = None) -> dict:
    """Train NAME (the registry's config unless `config` is given) with recipe tc, save it to `out`
    and record it in out's manifest; returns the manifest entry."""
    from planc.zoo.eval import bits_per_byte

    config = config or bundled_config(name)
    teacher = load_model(tc.teacher) if tc.teacher else None
    model = build_model(config, tc.seed)
    log(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters; recipe {tc}")
    started = time.perf_counter()
    losses = train(model, tc, teacher=teacher, log=log)
    wall_s = time.perf_counter() - started
    files = save_checkpoint(model, out)
    entry = {
        "config": json.loads(config.to_json_string(use_diff=False)),
        "recipe": dataclasses.asdict(tc),
        "seed": tc.seed,
        "steps": tc.steps,
        "tokens_seen": tc.steps * tc.batch_size * tc.seq_len,
        "wall_s": round(wall_s, 1),
        "final_train_loss": losses[-1],
        "final_train_loss_mean50": sum(losses[-50:]) / len(losses[-50:]),
        "heldout_bpb": bits_per_byte(model),
        "files": files,
        "teacher_files": _teacher_files(tc.teacher),
        "corpus": corpus_record(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }
    log(f"{name}: trained in {wall_s:.0f}s, final ce {losses[-1]:.4f}, held-out {entry['heldout_bpb']:.4f} bits/byte")
    update_manifest(out.parent / MANIFEST, name, entry, _bench_if_bundled(out))
    return entry


def _teacher_files(teacher: str | None) -> dict[str, str] | None:
    if teacher is None:
        return None
    path = WEIGHTS_DIR / teacher if teacher in BUNDLED else Path(teacher)
    return {p.name: sha256_file(p) for p in sorted(path.iterdir()) if p.is_file()}


def _bench_if_bundled(out: Path) -> dict | None:
    """The `planc bench zoo` figures, when `out` is a bundled model's directory (they read those)."""
    if out.resolve().parent != WEIGHTS_DIR.resolve():
        return None
    from planc.bench import zoo

    return zoo.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m planc.zoo.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(RECIPES))
    parser.add_argument("--steps", type=int, help="optimizer steps (default: the recipe's)")
    parser.add_argument("--seed", type=int, help="init and data-order seed (default: the recipe's)")
    parser.add_argument("--out", type=Path, help="checkpoint directory (default: the bundled weights/NAME)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: the recipe's)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in {"steps": args.steps, "seed": args.seed, "threads": args.threads}.items() if v is not None}
    tc = dataclasses.replace(RECIPES[args.name], **overrides)
    run(args.name, tc, args.out or WEIGHTS_DIR / args.name, log=lambda msg: print(msg, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

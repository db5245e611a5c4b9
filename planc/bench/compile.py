"""`planc bench compile`: compile time of the full DeepSeek-V3 config on meta against depth.

The same config with num_hidden_layers set to each depth, compiled with the mla_tp + ep plan at
8 devices, all in this process, rounds interleaved so that drift hits every depth alike. One
untimed warm-up compile at the smallest depth runs first (imports, export's first-call caches).
A timed sample is model construction on meta + `planc.driver.compile` (what `planc compile
--meta` waits for, less interpreter start), both with garbage collection paused as the driver
pauses it, after an untimed full collection (a fresh process's heap holds no earlier compile's
garbage); artifacts go to a temporary directory.
"""
from __future__ import annotations

import gc
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from planc.driver import compile, gc_paused
from planc.models.registry import bundled_config, init_model
from planc.plan import Plan, load_plan
from planc.dims import DTYPES

PLAN = Path(__file__).resolve().parents[2] / "plans" / "deepseek_v3_mla_tp_ep8.yaml"
# The driver logs lines after its steps; a stage ends at the first line of the word that closes
# it (the plan's t3 candidates are listed once partition and report are done), and lines of other
# words (captured, declined, note) fall in the stage that is running, so the stages add up.
CLOSED_BY = {"model": "resolve", "lift": "capture+lift", "passes": "passes", "t3": "partition+report"}
STAGES = ("build", "resolve", "capture+lift", "passes", "partition+report", "codegen+write")


def deepseek_v3_on_meta(num_layers: int, dtype: torch.dtype) -> nn.Module:
    """The bundled config at `num_layers`, built as `planc compile deepseek-v3 --meta` builds it."""
    config = bundled_config("deepseek-v3")
    config.num_hidden_layers = num_layers
    return init_model(config, dtype, meta=True)


def time_compile(num_layers: int, plan: Plan, out: Path) -> dict[str, float]:
    """Seconds of one build + compile (artifact written to `out`), split by stage."""
    stamps: dict[str, float] = {}

    def stamp(line: str) -> None:
        stage = CLOSED_BY.get(line.split()[0])
        if stage is not None:
            stamps.setdefault(stage, time.perf_counter())

    gc.collect()
    with gc_paused():
        started = time.perf_counter()
        model = deepseek_v3_on_meta(num_layers, DTYPES.get(plan.model.dtype, torch.float32))
        stamps["build"] = time.perf_counter()
        compile(model, plan, out, meta=True, log=stamp)
        stamps["codegen+write"] = time.perf_counter()
    stages, previous = {}, started
    for name, at in sorted(stamps.items(), key=lambda item: item[1]):
        stages[name], previous = at - previous, at
    return {"total": previous - started, **stages}


def _repeats_per_depth(layers: Sequence[int], repeats: int | Sequence[int]) -> list[int]:
    counts = [repeats] * len(layers) if isinstance(repeats, int) else list(repeats)
    if len(counts) != len(layers) or min(counts) < 1:
        raise ValueError(f"repeats {repeats!r}: give one int >= 1, or one per depth in {list(layers)}")
    return counts


def run(layers: Sequence[int] = (4, 16, 61), repeats: int | Sequence[int] = 5) -> dict:
    dense = bundled_config("deepseek-v3").first_k_dense_replace
    if min(layers) <= dense:
        raise ValueError(f"layers {list(layers)}: DeepSeek-V3's first {dense} layers are dense, so the plan's "
                         f"moe rule binds nothing below {dense + 1} layers; use depths >= {dense + 1}")
    plan = load_plan(PLAN)
    counts = _repeats_per_depth(layers, repeats)
    samples: list[list[dict[str, float]]] = [[] for _ in layers]
    with tempfile.TemporaryDirectory(prefix="planc-bench-compile-") as tmp:
        time_compile(min(layers), plan, Path(tmp, "warmup"))
        for round_ in range(max(counts)):
            for i, num_layers in enumerate(layers):
                if round_ < counts[i]:
                    samples[i].append(time_compile(num_layers, plan, Path(tmp, f"L{num_layers}_{round_}")))
    seconds = [statistics.median(s["total"] for s in depth) for depth in samples]
    compiling = [statistics.median(s["total"] - s["build"] for s in depth) for depth in samples]
    least = [min(s["total"] - s["build"] for s in depth) for depth in samples]
    return {
        "case": "compile",
        "model": "deepseek-v3 (meta)",
        "plan": PLAN.name,
        "devices": plan.mesh.devices,
        "layers": list(layers),
        "seconds": seconds,
        "repeats": counts,
        "seconds_per_layer": _marginal(list(layers), seconds),
        "growth": _growth(seconds),
        "compile_seconds": compiling,
        "compile_growth": _growth(compiling),
        "compile_least": least,
        "compile_least_growth": _growth(least),
        "stages": [{name: statistics.median(s[name] for s in depth) for name in STAGES} for depth in samples],
        "samples": [[s["total"] for s in depth] for depth in samples],
        "note": "median of `repeats` compiles per depth (a single sample where repeats is 1), rounds "
                "interleaved across depths after one untimed warm-up; seconds = model build on meta + "
                "planc.driver.compile (garbage collection paused, as compile pauses it) on this CPU machine; "
                "compile_seconds: the same samples less the model build (transformers' own work), median; "
                "compile_least: their least, the sample least disturbed by the rest of the machine (timeit's "
                "reading: torch.export's capture of the one layer per structure, 90% of a compile and the same "
                "at every depth, varies by a few percent from run to run)",
    }


def _marginal(layers: list[int], seconds: list[float]) -> list[float | None]:
    """Extra seconds per extra layer from the previous depth (None for the first)."""
    return [None] + [(s1 - s0) / (l1 - l0) for l0, l1, s0, s1 in zip(layers, layers[1:], seconds, seconds[1:])]


def _growth(seconds: list[float]) -> list[float | None]:
    """Relative increase of the seconds from the previous depth (None for the first)."""
    return [None] + [s1 / s0 - 1 for s0, s1 in zip(seconds, seconds[1:])]


def table(result: dict) -> str:
    head = (f"compile: {result['model']}, {result['plan']}, {result['devices']} devices "
            f"(median seconds; s/layer and growth: from the previous depth; compile: less the "
            f"model build; least: the least compile sample; stages: median of each stage)")
    cols = (f"{'layers':>6} {'repeats':>7} {'seconds':>8} {'s/layer':>8} {'growth':>7} {'compile':>8} {'growth':>7} "
            f"{'least':>7} {'growth':>7}  "
            + " ".join(f"{s:>{_w(s)}}" for s in STAGES))
    rows = [head, cols]
    for i, num_layers in enumerate(result["layers"]):
        per_layer = result["seconds_per_layer"][i]
        growth, compile_growth, least_growth = (_percent(result[key][i]) for key in
                                                ("growth", "compile_growth", "compile_least_growth"))
        rows.append(f"{num_layers:>6} {result['repeats'][i]:>7} {result['seconds'][i]:>8.3f} "
                    f"{'-' if per_layer is None else f'{per_layer:.4f}':>8} {growth:>7} "
                    f"{result['compile_seconds'][i]:>8.3f} {compile_growth:>7} "
                    f"{result['compile_least'][i]:>7.3f} {least_growth:>7}  "
                    + " ".join(f"{result['stages'][i][s]:>{_w(s)}.3f}" for s in STAGES))
    return "\n".join(rows + [f"note: {result['note']}"])


def _percent(growth: float | None) -> str:
    return "-" if growth is None else f"{growth:+.1%}"


def _w(stage: str) -> int:
    return max(len(stage), 7)

"""`planc bench tpla`: TPLA (DESIGN 4.1) against MLA-TP, side by side in one run.

kv_width_per_rank: per-rank cache width of every MLA layer of the full DeepSeek-V3 / Kimi-K2
  configs on meta at 4 devices (mla_tp, tpla g=2, tpla g=4; g must divide the devices), read from
  the compiler's own cache specs after bind + passes (no export, no artifact).
bpb: held-out bits per byte of tiny-deepseek compiled with each plan (the attention rule only;
  MLPs and experts replicated) and run on 2 gloo ranks, on the same BPB_WINDOWS windows. Each
  window's first PREFIX tokens are prefilled, the rest fed one decode step at a time
  (teacher-forced), and only those predictions are scored: with PD separation a full-window
  forward is the exact MLA prefill and never runs TPLA's decode. bpb_full_window is that figure
  for reference, computed as planc.zoo.eval.artifact_bits_per_byte does (checked against it on
  mla_tp in the same run).
decode_attention_ratio: one decode step of the runtime's fused CPU attention kernel (`--kernels cpu`,
  kernels/mla_decode_cpu.c: one pass over the cache) at tiny-deepseek's dims on 2 gloo ranks,
  mla_tp (H/2 heads over the C+R cache) over TPLA g=2 (H heads over C/2+R), interleaved; a step is
  the slower rank's time, the figure the median over steps. Beside it: the roofline of
  cpu_profile() (measured on both ranks at once, as the steps run) for the same shapes with the
  cache read once (what the fused kernel does); the unfused roofline, every intermediate of the
  torch reference through memory; the width ceiling; and diagnostics: the torch reference
  (`--kernels torch`, Ops.mla_decode), its three stages and a plain read of the cache, on the
  ranks and in one process alone.
predicted_speedup: planc.cost for the paper's setting, next to the paper's figures.

Legend: B batch, T cached tokens, H heads per rank, C latent per rank, R rope dim, e element bytes.
"""
from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from planc import cost
from planc.bench.decode import cores, rank_threads
from planc.driver import compile, parallelize
from planc.kernels.mla_decode_cpu import mla_decode_cpu
from planc.lift.graph import build_graph
from planc.ops import Ops, Step, masked_softmax
from planc.lift.recognize import recognize
from planc.models.registry import WEIGHTS_DIR, bundled_config, load_model
from planc.passes import mla_tp, tpla
from planc.plan import parse_plan_text
from planc.report.report import cache_specs
from planc.runtime.comm import Comm
from planc.runtime.launch import launch, write_result
from planc.zoo import eval as zoo_eval

FULL_MODELS = ("deepseek-v3", "kimi-k2")
WIDTH_DEVICES = 4
WIDTH_PLANS = {"mla_tp": "{strategy: mla_tp}",
               "tpla_g2": "{strategy: tpla, latent_groups: 2, transform: pca, prefill: mla}",
               "tpla_g4": "{strategy: tpla, latent_groups: 4, transform: pca, prefill: mla}"}
BPB_PLANS = {"mla_tp": "{strategy: mla_tp}"} | {
    f"tpla_{t}_{pd}": f"{{strategy: tpla, latent_groups: 2, transform: {t}, prefill: {prefill}, rmsnorm: sliced}}"
    for pd, prefill in (("pd", "mla"), ("nopd", "tpla")) for t in ("none", "hadamard", "pca")}
# Beside them, to tell the per-slice softmax from the per-slice RMSNorm: every transform with the
# exact norm recomputed on each rank (no communication), PCA with it all-reduced, and PCA with
# calibrated slice scales.
BPB_DIAGNOSTIC_PLANS = {
    f"tpla_{t}_pd_rmsnorm_recompute": f"{{strategy: tpla, latent_groups: 2, transform: {t}, prefill: mla, "
                                      f"rmsnorm: recompute}}" for t in ("none", "hadamard", "pca")} | {
    "tpla_pca_pd_rmsnorm_exact": "{strategy: tpla, latent_groups: 2, transform: pca, prefill: mla, rmsnorm: exact}",
    "tpla_pca_pd_scales_calibrated": "{strategy: tpla, latent_groups: 2, transform: pca, prefill: mla, "
                                     "rmsnorm: sliced, scales: calibrated}"}
BPB_WINDOWS = 32  # of eval_ids: 32 x 256 tokens evenly spaced over the held-out split
PREFIX = 128  # tokens prefilled per window; the other 128 are decoded and scored
PAPER_SPEEDUP = {"deepseek-v3": 1.79, "kimi-k2": 1.93}
CONTEXT = 16384  # cached tokens in the attention micro-benchmark
SCALE = 0.1  # softmax scale: any value times the same
NOTE = ("CPU times ({cores} cores shared with other work, gloo ranks with {threads} thread(s) each) are "
        "meaningful as ratios only; absolute ms say nothing about a GPU")


def plan_text(attention: str, devices: int, source: str | None = None) -> str:
    model = f"model: {{source: {source}, dtype: float32}}\n" if source else ""
    return (f"version: 1\nmesh: {{devices: {devices}}}\n{model}rules:\n"
            f"  - match: \"model.layers.*.self_attn\"\n    attention: {attention}\n")


# -- kv widths --------------------------------------------------------------------------------


def kv_widths(model: str, devices: int = WIDTH_DEVICES) -> dict[str, int]:
    """Per-rank cache width of the model's MLA layers under each WIDTH_PLANS plan (compiler specs)."""
    module = load_model(model, meta=True)
    graph = build_graph(recognize(module), module)
    return {name: _uniform_width(graph, attention, devices, model) for name, attention in WIDTH_PLANS.items()}


def _uniform_width(graph, attention: str, devices: int, model: str) -> int:
    plan = parse_plan_text(plan_text(attention, devices), f"bench tpla ({model})")
    specs = cache_specs(parallelize(graph, plan, meta=True)[0])
    widths = {s["ckv"] + s["kpe"] for s in specs.values()}
    assert len(widths) == 1, f"{model}: layers differ in width {widths}"
    return widths.pop()


# -- bits per byte ----------------------------------------------------------------------------


def bpb(tmp: Path, windows: int = BPB_WINDOWS, prefix: int = PREFIX) -> dict:
    """Bits per byte of every BPB_PLANS plan on 2 ranks, decode-scored and full-window, all
    artifacts evaluated in one launch (a launch costs more than a whole evaluation here)."""
    max_bytes = windows * (zoo_eval.EVAL_SEQ - 1)  # eval_ids reads max_bytes as ceil(max_bytes / 255) windows
    artifacts = {}
    for name, attention in (BPB_PLANS | BPB_DIAGNOSTIC_PLANS).items():
        plan = parse_plan_text(plan_text(attention, 2, "tiny-deepseek"), f"bench tpla ({name})")
        artifacts[name] = str(compile(None, plan, tmp / name).path)
    args = {"artifacts": artifacts, "split": "heldout", "max_bytes": max_bytes, "prefix": prefix}
    with rank_threads():
        sums = launch("planc.bench.tpla:bits_worker", args, 2, timeout_s=600)[0]
        reference = zoo_eval.artifact_bits_per_byte(artifacts["mla_tp"], 2, split="heldout", max_bytes=max_bytes)
    decode = {n: s["decode"]["bits"] / s["decode"]["bytes"] for n, s in sums.items()}
    return {"bpb": {n: decode[n] for n in BPB_PLANS},
            "bpb_diagnostic": {n: decode[n] for n in BPB_DIAGNOSTIC_PLANS},
            "bpb_full_window": {n: s["full"]["bits"] / s["full"]["bytes"] for n, s in sums.items()},
            "bpb_full_window_mla_tp_by_zoo_eval": reference,
            "bpb_scored_bytes": {"decode": sums["mla_tp"]["decode"]["bytes"], "full": sums["mla_tp"]["full"]["bytes"]}}


def bits_worker(args: dict) -> None:
    from planc.runtime.model import Model

    comm, sums = Comm(), {}
    ids_NS = zoo_eval.eval_ids(args["split"], args["max_bytes"])
    for name, path in args["artifacts"].items():
        rank = Model(path, comm=comm)
        sums[name] = {"decode": decode_bits(rank, ids_NS, args["prefix"]), "full": full_window_bits(rank, ids_NS)}
    write_result(sums)


@torch.no_grad()
def decode_bits(rank, ids_NS: torch.Tensor, prefix: int) -> dict:
    """Sum of -log2 p over the byte targets decoded one step at a time after a `prefix`-token prefill."""
    bits, count = 0.0, 0
    for ids_BS in ids_NS.split(zoo_eval.EVAL_BATCH):
        B, S = ids_BS.shape
        rank.allocate(B, S)
        key_mask = torch.zeros(B, S, dtype=torch.bool)
        key_mask[:, :prefix] = True
        logits = [rank.forward(ids_BS[:, :prefix], Step(0, torch.arange(prefix).expand(B, prefix), key_mask))[:, -1:]]
        for t in range(prefix, S - 1):
            key_mask[:, t] = True
            logits.append(rank.forward(ids_BS[:, t:t + 1], Step(t, torch.full((B, 1), t), key_mask)))
        # logits[i] predicts ids[prefix + i]; scored_bits pairs logits[:, j] with ids[:, j + 1], so
        # start the ids one earlier and pad the logits with one unscored column.
        b, n = zoo_eval.scored_bits(torch.cat(logits + logits[-1:], dim=1).float(), ids_BS[:, prefix - 1:])
        bits, count = bits + b, count + n
    return {"bits": bits, "bytes": count}


@torch.no_grad()
def full_window_bits(rank, ids_NS: torch.Tensor) -> dict:
    """As planc.zoo.eval.artifact_bits_per_byte: one prefill forward per window, every target scored."""
    bits, count = 0.0, 0
    for ids_BS in ids_NS.split(zoo_eval.EVAL_BATCH):
        B, S = ids_BS.shape
        rank.allocate(B, S)
        logits = rank.forward(ids_BS, Step(0, torch.arange(S).expand(B, S), torch.ones(B, S, dtype=torch.bool)))
        b, n = zoo_eval.scored_bits(logits.float(), ids_BS)
        bits, count = bits + b, count + n
    return {"bits": bits, "bytes": count}


# -- decode attention -------------------------------------------------------------------------


def attention_shapes(heads: int, latent: int) -> dict[str, tuple[int, int]]:
    """(heads, latent) one of 2 ranks holds: mla_tp splits heads, TPLA g=2 splits the latent."""
    return {"mla_tp": (heads // 2, latent), "tpla_g2": (heads, latent // 2)}


def attention_batch(context: int, latent: int, rope: int, llc_bytes: int, e: int = 4) -> int:
    """Smallest multiple of 8 whose TPLA cache per rank (the smaller one) is at least 2x the LLC."""
    per_seq = context * (latent // 2 + rope) * e
    return 8 * max(1, math.ceil(2 * llc_bytes / per_seq / 8))


def time_decode_attention(comm: Comm, shapes: dict[str, tuple[int, int]], batch: int, context: int, rope: int,
                          repeats: int, warmup: int = 2) -> dict[str, dict[str, list[float]]]:
    """Seconds per variant, probe and step (probes: see `probes`); variants alternate order every
    step and all ranks start each call together (barrier)."""
    calls = {name: probes(*_attention_inputs(batch, context, h, c, rope, comm.rank)) for name, (h, c) in shapes.items()}
    times = {name: {probe: [] for probe in calls[name]} for name in shapes}
    for i in range(warmup + repeats):
        for name in (list(shapes) if i % 2 == 0 else list(shapes)[::-1]):
            for probe, fn in calls[name].items():
                comm.barrier()
                start = time.perf_counter()
                fn()
                if i >= warmup:
                    times[name][probe].append(time.perf_counter() - start)
    return times


def probes(q_lat_BHC, q_pe_BHR, ckv_BTC, kpe_BTR, key_mask_BT) -> dict[str, Callable[[], object]]:
    """The fused kernel, then diagnostics: the torch reference, its three stages on precomputed
    inputs, and a plain read of the cache (what a bandwidth-bound op achieves on this machine)."""
    def logits() -> torch.Tensor:
        return torch.einsum("bhc,btc->bht", q_lat_BHC, ckv_BTC) + torch.einsum("bhr,btr->bht", q_pe_BHR, kpe_BTR)

    logits_BHT = logits()
    probs_BHT = masked_softmax(logits_BHT * SCALE, key_mask_BT[:, None, :])
    return {
        "fused_cpu": lambda: mla_decode_cpu(q_lat_BHC, q_pe_BHR, ckv_BTC, kpe_BTR, key_mask_BT, SCALE),
        "torch_reference": lambda: Ops().mla_decode(q_lat_BHC, q_pe_BHR, ckv_BTC, kpe_BTR, key_mask_BT, SCALE),
        "logits": logits,
        "softmax": lambda: masked_softmax(logits_BHT * SCALE, key_mask_BT[:, None, :]),
        "value": lambda: torch.einsum("bht,btc->bhc", probs_BHT, ckv_BTC),
        "cache_read": lambda: (ckv_BTC.sum(), kpe_BTR.sum()),
    }


def _attention_inputs(B: int, T: int, H: int, C: int, R: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    q_lat, q_pe = torch.randn(B, H, C, generator=gen), torch.randn(B, H, R, generator=gen)
    ckv, kpe = torch.randn(B, T, C, generator=gen), torch.randn(B, T, R, generator=gen)
    return q_lat, q_pe, ckv, kpe, torch.ones(B, T, dtype=torch.bool)


def attention_worker(args: dict) -> None:
    comm = Comm()
    comm.barrier()  # both ranks measure the machine at once, as they share it during the steps
    profile = cost.cpu_profile()
    times = time_decode_attention(comm, {k: tuple(v) for k, v in args["shapes"].items()}, args["batch"],
                                  args["context"], args["rope"], args["repeats"])
    write_result({"times": times, "mem_bw": profile.mem_bw, "flops": profile.flops})


def one_process(shapes: dict[str, tuple[int, int]], batch: int, context: int, rope: int, repeats: int) -> dict:
    """time_decode_attention in this process alone, one thread: one rank's step with no co-runner."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return time_decode_attention(Comm.single(), shapes, batch, context, rope, repeats)
    finally:
        torch.set_num_threads(threads)


def reference_ops(B: int, H: int, C: int, R: int, T: int, e: int = 4) -> list[cost.Op]:
    """Ops.mla_decode op by op, every [B, H, T] intermediate written and read through memory."""
    logits = B * H * T * e
    return [cost.Op("q.ckv", 2 * B * H * T * C, B * T * C * e + logits),
            cost.Op("q_pe.kpe", 2 * B * H * T * R, B * T * R * e + logits),
            cost.Op("add, scale, mask, softmax, nan_to_num", 0, 10 * logits),
            cost.Op("p.ckv", 2 * B * H * T * C, B * T * C * e + logits)]


def step_ratio_quartiles(ranks: list[dict], probe: str) -> list[float]:
    """Quartiles over steps of one step's ratio (mla_tp over tpla_g2, each the slower rank's time):
    how much the headline median moves from step to step."""
    slower = {name: [max(per_rank) for per_rank in zip(*(r["times"][name][probe] for r in ranks))]
              for name in ("mla_tp", "tpla_g2")}
    return statistics.quantiles([a / b for a, b in zip(slower["mla_tp"], slower["tpla_g2"])], n=4)


def step_stat(ranks: list[dict], stat: Callable = statistics.median) -> dict[str, dict[str, float]]:
    """Per variant and probe: `stat` over steps of the slower rank's seconds."""
    variants = ranks[0]["times"]
    return {name: {probe: stat([max(per_rank) for per_rank in zip(*(r["times"][name][probe] for r in ranks))])
                   for probe in variants[name]} for name in variants}


def decode_attention(repeats: int = 30, context: int = CONTEXT) -> dict:
    config = bundled_config("tiny-deepseek")
    H, C, R = config.num_attention_heads, config.kv_lora_rank, config.qk_rope_head_dim
    llc = cost.last_level_cache_bytes()
    batch, shapes = attention_batch(context, C, R, llc), attention_shapes(H, C)
    load_before = os.getloadavg()[0]
    with rank_threads() as threads:
        args = {"shapes": shapes, "batch": batch, "context": context, "rope": R, "repeats": repeats}
        ranks = launch("planc.bench.tpla:attention_worker", args, 2, timeout_s=600)
    median = step_stat(ranks)
    alone = step_stat([{"times": one_process(shapes, batch, context, R, repeats)}])
    cpu = cost.Hardware("cpu, 2 ranks at once", min(r["flops"] for r in ranks), min(r["mem_bw"] for r in ranks),
                        0.0, math.inf, 0.0)
    fused = {n: cost.attention(batch, h, c, R, context, 4) for n, (h, c) in shapes.items()}
    unfused = {n: cost.step_seconds(reference_ops(batch, h, c, R, context), cpu) for n, (h, c) in shapes.items()}
    return {
        "decode_attention_ratio": _ratio(median)["fused_cpu"],
        "decode_attention_ratio_step_quartiles": step_ratio_quartiles(ranks, "fused_cpu"),
        "decode_attention_ratio_roofline": cost.op_time(fused["mla_tp"], cpu) / cost.op_time(fused["tpla_g2"], cpu),
        "decode_attention_ratio_roofline_unfused": unfused["mla_tp"] / unfused["tpla_g2"],
        "decode_attention_width_ceiling": (C + R) / (C // 2 + R),
        "decode_attention": {
            "primitive": "kernels/mla_decode_cpu.c (the runtime's --kernels cpu), beside the torch reference",
            "heads_latent_per_rank": shapes, "rope": R, "batch": batch, "context": context, "dtype": "float32",
            "cache_bytes_per_rank": {n: batch * context * (c + R) * 4 for n, (_, c) in shapes.items()},
            "last_level_cache_bytes": llc, "steps": repeats, "threads_per_rank": threads,
            "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
            "median_ms": _ms(median), "ratio_by_probe": _ratio(median),
            "fastest_step_ratio_by_probe": _ratio(step_stat(ranks, min)),
            "one_process_median_ms": _ms(alone), "one_process_ratio_by_probe": _ratio(alone),
            "roofline_ms": {n: cost.op_time(op, cpu) * 1e3 for n, op in fused.items()},
            "roofline_unfused_ms": {n: t * 1e3 for n, t in unfused.items()},
            "roofline_bound": {n: cost.bound(op, cpu) for n, op in fused.items()},
            "cpu_profile_per_rank": [{"mem_GB_per_s": r["mem_bw"] / 1e9, "GFLOP_per_s": r["flops"] / 1e9}
                                     for r in ranks],
        },
    }


def _ratio(median: dict[str, dict[str, float]]) -> dict[str, float]:
    return {probe: median["mla_tp"][probe] / median["tpla_g2"][probe] for probe in median["mla_tp"]}


def _ms(median: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {n: {p: t * 1e3 for p, t in m.items()} for n, m in median.items()}


# -- the case ---------------------------------------------------------------------------------


def run() -> dict:
    started = time.perf_counter()
    out: dict = {"case": "tpla", "kv_width_per_rank": {m: kv_widths(m) for m in FULL_MODELS},
                 "kv_width_devices": WIDTH_DEVICES}
    with tempfile.TemporaryDirectory(prefix="planc-bench-tpla-") as tmp:
        out |= bpb(Path(tmp))
    out["bpb_eval"] = {"model": "tiny-deepseek", "weights": _weights(), "ranks": 2, "split": "heldout",
                       "windows": BPB_WINDOWS, "seq_len": zoo_eval.EVAL_SEQ, "prefill_tokens": PREFIX,
                       "latent_groups": 2, "scored": "decoded tokens only (teacher-forced, after the prefill)"}
    out |= decode_attention()
    detail = {m: cost.compare(m, lambda mm: mla_tp.cost_split(mm, 2), lambda mm: tpla.cost_split(mm, 2, 2))
              for m in FULL_MODELS}
    out["predicted_speedup"] = {m: d["speedup"] for m, d in detail.items()}
    out["paper_speedup"] = PAPER_SPEEDUP
    out["predicted_speedup_setting"] = {"hw": "H800", "tp": 2, "latent_groups": 2, "context": 32768,
                                        "dtype": "bfloat16", "moe_removed": True, "usable_memory": cost.USABLE_MEMORY}
    out["predicted_speedup_detail"] = detail
    out["goals"] = goals(out)
    out["seconds"] = time.perf_counter() - started
    out["note"] = NOTE.format(cores=cores(), threads=out["decode_attention"]["threads_per_rank"])
    return out


def _weights() -> str:
    return "trained" if (WEIGHTS_DIR / "manifest.json").is_file() else "random init (no trained weights bundled)"


def goals(out: dict) -> dict[str, bool]:
    """Issue 4's targets for this output."""
    bpb_, ratio, roof = out["bpb"], out["decode_attention_ratio"], out["decode_attention_ratio_roofline"]
    return {"tpla_pca_pd_bpb_within_3pct_of_mla_tp": bpb_["tpla_pca_pd"] <= 1.03 * bpb_["mla_tp"],
            "decode_attention_ratio_at_least_1.4": ratio >= 1.4,
            "decode_attention_ratio_within_15pct_of_roofline": abs(ratio / roof - 1) <= 0.15,
            **{f"predicted_speedup_{m}_within_15pct_of_paper": abs(v / PAPER_SPEEDUP[m] - 1) <= 0.15
               for m, v in out["predicted_speedup"].items()}}


def table(result: dict) -> str:
    rows = [f"tpla: kv width per rank ({result['kv_width_devices']} devices)"]
    rows += [f"  {m:<12} " + "  ".join(f"{k} {v}" for k, v in w.items())
             for m, w in result["kv_width_per_rank"].items()]
    ev = result["bpb_eval"]
    rows.append(f"bits per byte, {ev['model']} on {ev['ranks']} ranks, {ev['windows']} windows, "
                f"decode-scored after {ev['prefill_tokens']} prefill tokens (full-window forward beside)")
    rows += [f"  {n:<26} {v:.4f}  {result['bpb_full_window'][n]:.4f}"
             for n, v in (result["bpb"] | result["bpb_diagnostic"]).items()]
    d = result["decode_attention"]
    rows.append(f"decode attention, B {d['batch']} T {d['context']}, median ms of {d['steps']} steps (slower rank)")
    rows += [f"  {p:<11} mla_tp {d['median_ms']['mla_tp'][p]:8.2f}  tpla_g2 {d['median_ms']['tpla_g2'][p]:8.2f}  "
             f"ratio {r:.3f}" for p, r in d["ratio_by_probe"].items()]
    q1, _, q3 = result["decode_attention_ratio_step_quartiles"]
    rows.append(f"  ratio {result['decode_attention_ratio']:.3f} (steps' quartiles {q1:.3f}-{q3:.3f})  "
                f"roofline {result['decode_attention_ratio_roofline']:.3f}  "
                f"unfused roofline {result['decode_attention_ratio_roofline_unfused']:.3f}  "
                f"width ceiling {result['decode_attention_width_ceiling']:.3f}")
    rows.append("predicted decode speedup (2xH800, TP 2, 32K, max batch) vs paper")
    rows += [f"  {m:<12} {v:.3f}  paper {result['paper_speedup'][m]:.2f}"
             for m, v in result["predicted_speedup"].items()]
    return "\n".join(rows + [f"note: {result['note']}"])

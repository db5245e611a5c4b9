"""`planc bench t3`: a row-parallel GEMM then its all-reduce, against the T3 ring, on gloo ranks.

Per world size (2 and 4 ranks, one launch each) and shape (tiny-deepseek's o_proj and dense
down_proj, DeepSeek-V3's o_proj at 7168 x 16384/TP; a decode-like step of 4 tokens and a
prefill-like one of 512), each rank times, side by side and interleaved, samples of:
    gemm        ops.linear alone
    all_reduce  comm.all_reduce of its output alone
    sequential  ops.linear, then comm.all_reduce            (what planc runs without T3)
    fused       t3.linear_all_reduce with one piece per rank (the ring, then the all-gather)
A sample starts after a barrier; its time is the slowest rank's; figures are medians over samples
(7, or 31 for a GEMM under a GFLOP).
exposed_comm_fraction = (fused - gemm) / (sequential - gemm): the share of the communication that
the fused op did not hide under its GEMM (0 = all hidden; 1 = none; above 1 = the ring costs more
than the all-reduce it replaces); ratio_ceiling = sequential / max(gemm, all_reduce), what perfect
overlap would give. `fused_by_pass`: whether the pass fuses the step with min_tokens auto (from
`auto_min_tokens`, where the cost model predicts T3 faster on H100, H200 and H800; what it declines
it declines because the model predicts a loss); predicted_ratio: planc.passes.t3.predict per GPU
profile (bf16), and for this CPU with the ranks' measured GEMM FLOP/s and gloo point-to-point
latency and bandwidth (fp32).

Every rank runs with one intra-op thread (OMP_NUM_THREADS=1 unless set): 2 and 4 ranks share this
machine's cores with gloo's transport threads, so the ring's transfers compete with the GEMM for the
same cores; the note says what was measured rather than a benchmark tuned until it passes.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from planc import cost
from planc.bench.decode import cores, rank_threads
from planc.ops import Ops
from planc.passes import t3
from planc.runtime.comm import Comm
from planc.runtime.launch import launch, write_result

WORLDS = (2, 4)
TOKENS = {"decode": 4, "prefill": 512}
GEMMS = {  # name -> (input features over all ranks, output features)
    "tiny-deepseek o_proj": (4 * 32, 128),
    "tiny-deepseek down_proj": (256, 128),
    "deepseek-v3 o_proj": (16384, 7168),
}
SAMPLES, WARMUP = 7, 1  # a GEMM under a GFLOP takes milliseconds at most: those shapes get SMALL_SAMPLES
SMALL_SAMPLES, SMALL_FLOP = 31, 1e9


def shapes(world: int, samples: int = SAMPLES) -> list[dict]:
    return [{"gemm": name, "step": step, "tokens": tokens, "in_features_per_rank": k // world, "out_features": n,
             "world": world, "chunks": world,
             "samples": SMALL_SAMPLES if 2 * tokens * k // world * n < SMALL_FLOP else samples}
            for name, (k, n) in GEMMS.items() for step, tokens in TOKENS.items()]


def _timed(comm: Comm, fn: Callable[[], object]) -> float:
    comm.barrier()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(comm: Comm, shape: dict, warmup: int = WARMUP) -> dict[str, list[float]]:
    """This rank's seconds per probe, one per sample, probes interleaved within each sample."""
    gen = torch.Generator().manual_seed(comm.rank)
    x = torch.randn(shape["tokens"], shape["in_features_per_rank"], generator=gen)
    w = torch.randn(shape["out_features"], shape["in_features_per_rank"], generator=gen) / shape["in_features_per_rank"] ** 0.5
    ops, y = Ops(), torch.zeros(shape["tokens"], shape["out_features"])
    probes = {
        "gemm": lambda: ops.linear(x, w),
        "all_reduce": lambda: comm.all_reduce(y),
        "sequential": lambda: comm.all_reduce(ops.linear(x, w)),
        "fused": lambda: t3.linear_all_reduce(ops, comm, x, w, None, chunks=shape["chunks"], min_tokens=0),
    }
    times: dict[str, list[float]] = {name: [] for name in probes}
    for sample in range(warmup + shape["samples"]):
        for name, fn in probes.items():
            seconds = _timed(comm, fn)
            if sample >= warmup:
                times[name].append(seconds)
    return times


def link(comm: Comm, large: int = 1 << 22, rounds: int = 9) -> tuple[float, float]:
    """(latency s, bandwidth B/s) of one gloo message between ranks 0 and 1: half the median round
    trip of a 4-byte message, and of a 16 MiB one less that latency."""
    def trip(elems: int) -> float:
        buf, times = torch.zeros(elems), []
        for _ in range(rounds + 1):  # the first round trip sets the pair up
            comm.barrier()
            start = time.perf_counter()
            if comm.rank == 0:
                comm.send(buf, 1)
                comm.recv(buf, 1)
            elif comm.rank == 1:
                comm.recv(buf, 0)
                comm.send(buf, 0)
            times.append((time.perf_counter() - start) / 2)
        return statistics.median(times[1:])

    latency = trip(1)
    return latency, 4 * large / max(trip(large) - latency, 1e-9)


def worker(args: dict) -> None:
    comm = Comm()
    comm.barrier()
    flops = cost.matmul_flops(512, repeats=5)  # every rank at once: the cores as the ranks share them
    latency, bandwidth = link(comm)
    results = [measure(comm, shape, args["warmup"]) for shape in args["shapes"]]
    write_result({"rank": comm.rank, "flops": flops, "latency": latency, "bandwidth": bandwidth, "times": results})


def summarize(shape: dict, ranks: list[dict]) -> dict:
    """Medians over samples of the slowest rank's time, the ratio and the exposed share of the comm."""
    i = shape["index"]
    median = {probe: statistics.median(max(r["times"][i][probe][s] for r in ranks)
                                       for s in range(len(ranks[0]["times"][i][probe])))
              for probe in ranks[0]["times"][i]}
    hidden_from = median["sequential"] - median["gemm"]
    cpu = cost.Hardware("cpu", min(r["flops"] for r in ranks), cost.cpu_profile().mem_bw, 0.0,
                        ranks[0]["bandwidth"], ranks[0]["latency"])
    profiles = {h: cost.PROFILES[h] for h in t3.PROFILES}
    predicted = {}
    for name, hw in (profiles | {"cpu": cpu}).items():
        e = 4 if name == "cpu" else t3.ELEM
        sequential, fused = t3.predict(hw, shape["tokens"], shape["in_features_per_rank"], shape["out_features"],
                                       shape["world"], shape["chunks"], e)
        predicted[name] = sequential / fused
    pays = [t3.pays_from(hw, shape["in_features_per_rank"], shape["out_features"], shape["world"], shape["chunks"])
            for hw in profiles.values()]
    auto = None if None in pays else max(pays)
    out = {k: v for k, v in shape.items() if k != "index"}
    return out | {"sequential_s": median["sequential"], "fused_s": median["fused"], "gemm_s": median["gemm"],
                  "all_reduce_s": median["all_reduce"], "ratio": median["sequential"] / median["fused"],
                  "ratio_ceiling": median["sequential"] / max(median["gemm"], median["all_reduce"]),
                  "exposed_comm_fraction": (median["fused"] - median["gemm"]) / hidden_from if hidden_from > 0 else None,
                  "auto_min_tokens": auto, "fused_by_pass": auto is not None and shape["tokens"] >= auto,
                  "predicted_ratio": predicted}


def run(worlds: tuple[int, ...] = WORLDS, samples: int = SAMPLES, warmup: int = WARMUP,
        gemms: tuple[str, ...] = tuple(GEMMS)) -> dict:
    started = time.perf_counter()
    rows, links = [], {}
    with rank_threads() as threads:
        for world in worlds:
            todo = [s | {"index": i} for i, s in enumerate(x for x in shapes(world, samples) if x["gemm"] in gemms)]
            ranks = launch("planc.bench.t3:worker", {"shapes": todo, "warmup": warmup}, world, timeout_s=1800)
            rows += [summarize(s, ranks) for s in todo]
            links[str(world)] = {"latency_s": ranks[0]["latency"], "bandwidth_B_per_s": ranks[0]["bandwidth"],
                                 "gemm_flops_per_rank": min(r["flops"] for r in ranks)}
    out = {"case": "t3", "cores": cores(), "threads_per_rank": threads, "shapes": rows, "gloo": links}
    out["goals"] = goals(rows)
    out["seconds"] = time.perf_counter() - started
    out["note"] = note(out)
    return out


def goals(rows: list[dict]) -> dict[str, bool]:
    """The issue's targets: >= 1.15 on the prefill-like shapes at 2 ranks, never below 0.97 where fused."""
    prefill2 = [r["ratio"] for r in rows if r["step"] == "prefill" and r["world"] == 2]
    fused = [r["ratio"] for r in rows if r["fused_by_pass"]]
    return {"prefill_ratio_at_2_ranks_at_least_1.15": bool(prefill2) and min(prefill2) >= 1.15,
            "fused_shapes_never_below_0.97": all(r >= 0.97 for r in fused)}


def note(out: dict) -> str:
    """What was measured, in words: the shapes the pass fuses, the ones it declines, and whether this
    CPU could overlap at all (the communication's share of the sequential time caps the ratio)."""
    rows = out["shapes"]
    fused = [r for r in rows if r["fused_by_pass"]]
    declined = [r for r in rows if not r["fused_by_pass"]]
    text = (f"{out['cores']} CPU cores shared by every rank's GEMM and gloo's transport threads: ratios only, "
            f"side by side in one run. ")
    if fused:
        text += "Fused by the pass (min_tokens auto): " + "; ".join(
            f"{r['gemm']} {r['step']} at {r['world']} ranks ratio {r['ratio']:.3f} (ceiling {r['ratio_ceiling']:.3f}, "
            f"exposed comm {_fraction(r['exposed_comm_fraction'])}, all-reduce {r['all_reduce_s'] / r['sequential_s']:.0%} "
            f"of the sequential time)" for r in fused) + ". "
    if declined:
        low, high = min(r["ratio"] for r in declined), max(r["ratio"] for r in declined)
        text += (f"Declined because the cost model predicts a loss at that step size on a GPU profile: "
                 f"{len(declined)} shapes, measured {low:.2f}-{high:.2f} here. ")
    prefill2 = [r for r in rows if r["step"] == "prefill" and r["world"] == 2]
    if prefill2 and not out["goals"]["prefill_ratio_at_2_ranks_at_least_1.15"]:
        best = max(prefill2, key=lambda r: r["ratio_ceiling"])
        text += (f"Ratio >= 1.15 on the prefill-like shapes at 2 ranks is not met: perfect overlap would give at most "
                 f"{best['ratio_ceiling']:.3f} ({best['gemm']}), because at these shapes the GEMM "
                 f"({out['gloo']['2']['gemm_flops_per_rank'] / 1e9:.0f} GFLOP/s per rank) and gloo's loopback "
                 f"({out['gloo']['2']['bandwidth_B_per_s'] / 1e9:.1f} GB/s, {out['gloo']['2']['latency_s'] * 1e3:.2f} ms "
                 f"per message) are far apart: the tiny GEMMs are all latency, DeepSeek-V3's all GEMM.")
    return text.strip()


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(result: dict) -> str:
    rows = [f"t3: GEMM then all-reduce vs the T3 ring on gloo ranks, medians over samples (slowest rank), "
            f"{result['threads_per_rank']} thread(s) per rank",
            f"  {'gemm':<24} {'step':<8} {'n':>2} {'tokens':>6} {'seq ms':>9} {'fused ms':>9} {'ratio':>6} "
            f"{'ceiling':>7} {'exposed':>7}  fused?  predicted ratio"]
    for r in result["shapes"]:
        exposed = _fraction(r["exposed_comm_fraction"])
        predicted = " ".join(f"{h} {v:.2f}" for h, v in r["predicted_ratio"].items())
        rows.append(f"  {r['gemm']:<24} {r['step']:<8} {r['world']:>2} {r['tokens']:>6} {r['sequential_s'] * 1e3:9.3f} "
                    f"{r['fused_s'] * 1e3:9.3f} {r['ratio']:6.3f} {r['ratio_ceiling']:7.3f} {exposed:>7}  "
                    f"{'yes' if r['fused_by_pass'] else 'no ':<6} "
                    f"{predicted}")
    rows += [f"  goal {k}: {v}" for k, v in result["goals"].items()]
    return "\n".join(rows + [f"note: {result['note']}"])

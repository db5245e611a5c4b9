"""`planc bench t3`: a row-parallel GEMM then its all-reduce, against the T3 ring, on gloo ranks.

Per world size (2 and 4 ranks, one launch each) and shape (tiny-deepseek's o_proj and dense
down_proj, DeepSeek-V3's o_proj at 7168 x 16384/TP; a decode-like step of 4 tokens and a
prefill-like one of 512), each rank times, side by side and interleaved, samples of:
    gemm        ops.linear alone
    pieces      the fused op's GEMMs alone: one ops.linear per piece, in the ring's order
    all_reduce  comm.all_reduce of its output alone
    sequential  ops.linear, then comm.all_reduce            (what planc runs without T3)
    fused       t3.linear_all_reduce with one piece per rank (the ring, then the all-gather)
A sample starts after a barrier; its time is the slowest rank's; figures are medians over samples
(7, or 31 for a GEMM under a GFLOP).
exposed_comm_fraction = (fused - pieces) / all_reduce: the time the fused op spends beyond its own
GEMMs, as a share of the all-reduce it replaces (0 = the communication is hidden under the GEMM;
1 = none of it is; above 1 = the ring costs more than the all-reduce); ratio_ceiling =
(gemm + all_reduce) / max(gemm, all_reduce), what perfect overlap of the measured parts would give.
`fused_by_pass`: whether the pass fuses the step with min_tokens auto (from
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
from planc.ring import ring_piece_order
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
    k = shape["in_features_per_rank"]
    w = torch.randn(shape["out_features"], k, generator=gen) / k ** 0.5
    ops, y = Ops(), torch.zeros(shape["tokens"], shape["out_features"])
    pieces = t3.TorchPieces(ops, x, w, None, shape["chunks"])
    order = ring_piece_order(comm.rank, comm.world_size, shape["chunks"])
    probes = {
        "gemm": lambda: ops.linear(x, w),
        "pieces": lambda: [pieces.compute(p) for p in order],
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
                  "pieces_s": median["pieces"],
                  "ratio_ceiling": (median["gemm"] + median["all_reduce"]) / max(median["gemm"], median["all_reduce"]),
                  "exposed_comm_fraction": (median["fused"] - median["pieces"]) / median["all_reduce"],
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
            f"exposed comm {r['exposed_comm_fraction']:.2f}; its pieces' GEMMs took "
            f"{r['pieces_s'] / r['gemm_s']:.2f}x the whole GEMM)" for r in fused) + ". "
        if all(r["exposed_comm_fraction"] >= 1 for r in fused):
            text += ("Exposed communication of 1 or more on every fused shape: the ring's transfers did not run under "
                     "the GEMM on this CPU (every rank's GEMM and gloo's threads share the cores); a ratio above 1 "
                     "there comes from the pieces' GEMMs, not from overlap. ")
    if declined:
        low, high = min(r["ratio"] for r in declined), max(r["ratio"] for r in declined)
        text += (f"Declined because the cost model predicts a loss at that step size on a GPU profile: "
                 f"{len(declined)} shapes, measured {low:.2f}-{high:.2f} here. ")
    prefill2 = [r for r in rows if r["step"] == "prefill" and r["world"] == 2]
    if prefill2 and not out["goals"]["prefill_ratio_at_2_ranks_at_least_1.15"]:
        link = out["gloo"]["2"]
        text += ("Ratio >= 1.15 on the prefill-like shapes at 2 ranks is not met; perfect overlap of the measured "
                 "GEMM and all-reduce would give at most " + ", ".join(
                     f"{r['ratio_ceiling']:.2f} for {r['gemm']} (GEMM {r['gemm_s'] * 1e3:.2f} ms, all-reduce "
                     f"{r['all_reduce_s'] * 1e3:.2f} ms)" for r in prefill2)
                 + f": with gloo's {link['latency_s'] * 1e3:.2f} ms per message and "
                 f"{link['bandwidth_B_per_s'] / 1e9:.1f} GB/s against {link['gemm_flops_per_rank'] / 1e9:.0f} "
                 f"GFLOP/s per rank, the tiny GEMMs are shorter than a message and DeepSeek-V3's dwarfs its "
                 f"all-reduce.")
    return text.strip()


def table(result: dict) -> str:
    rows = [f"t3: GEMM then all-reduce vs the T3 ring on gloo ranks, medians over samples (slowest rank), "
            f"{result['threads_per_rank']} thread(s) per rank",
            f"  {'gemm':<24} {'step':<8} {'n':>2} {'tokens':>6} {'seq ms':>9} {'fused ms':>9} {'gemm ms':>9} "
            f"{'AR ms':>8} {'ratio':>6} {'ceiling':>7} {'exposed':>7}  fused?  predicted ratio"]
    for r in result["shapes"]:
        predicted = " ".join(f"{h} {v:.2f}" for h, v in r["predicted_ratio"].items())
        rows.append(f"  {r['gemm']:<24} {r['step']:<8} {r['world']:>2} {r['tokens']:>6} {r['sequential_s'] * 1e3:9.3f} "
                    f"{r['fused_s'] * 1e3:9.3f} {r['gemm_s'] * 1e3:9.3f} {r['all_reduce_s'] * 1e3:8.3f} "
                    f"{r['ratio']:6.3f} {r['ratio_ceiling']:7.3f} {r['exposed_comm_fraction']:7.2f}  "
                    f"{'yes' if r['fused_by_pass'] else 'no ':<6} {predicted}")
    rows += [f"  goal {k}: {v}" for k, v in result["goals"].items()]
    return "\n".join(rows + [f"note: {result['note']}"])

"""A first-principles cost model of one decode step on one rank: a roofline per op, ring collectives.

Each op is (FLOPs, bytes moved through HBM, weight bytes it holds); its time is
max(flops / peak, bytes / bandwidth). A collective costs latency + ring bytes / link bandwidth
(planc.runtime.comm's formulas). A step is the sum of its ops: no overlap, no kernel-efficiency
factors, no launch overheads; the same assumptions for every strategy, so ratios are what it is for.
A compiled artifact's step is timed op by op on every rank, its collectives barriers the ranks meet
at (artifact_timeline; planc.report.timeline draws it).

Legend (units): seconds s, bytes B, FLOP, FLOP/s, B/s.
Shapes: b batch (sequences), L cached tokens per sequence, D hidden, H heads, Hr heads on one
rank, C latent (kv_lora_rank), Cs latent on one rank (C/g), R rope dim, P nope dim, V value dim,
Q q_lora_rank, I dense MLP intermediate, Vocab vocabulary, e bytes per element, n ranks.
"""
from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

from planc.lazy import lazy
from planc.models.registry import bundled_config
from planc.ring import ring_all_gather_bytes, ring_all_reduce_bytes, ring_reduce_scatter_bytes

torch = lazy("torch")


@dataclass(frozen=True)
class Hardware:
    name: str
    flops: float  # FLOP/s, dense, at the model's dtype (BF16 tensor cores on GPUs; fp32 on the CPU)
    mem_bw: float  # B/s, HBM (DRAM on the CPU)
    mem_bytes: float  # B, HBM capacity
    link_bw: float  # B/s per direction per device (NVLink)
    latency: float  # s per collective call


# Public spec-sheet figures (SXM parts; dense = without 2:4 sparsity). The H800 is an H100 SXM
# with NVLink cut to 400 GB/s total (NVIDIA H800 product brief); its HBM3 and tensor cores match.
# NVLink is quoted as total bidirectional bandwidth, so per direction is half. Memory is what the
# device reports as its total (nvidia-smi, torch.cuda.mem_get_info), the figure vLLM's
# gpu_memory_utilization multiplies: the "80 GB" of the sheets is 80 GiB of HBM, of which
# 81,559 MiB is visible on H100/H800 and 81,920 MiB on A100; H200's 141 GB shows as 143,771 MiB.
# Latency: ~10 us, the order of a small-message NCCL all-reduce inside one NVLink node
# (nccl-tests); a round figure.
MiB = 1 << 20
PROFILES = {
    # H100 SXM5 datasheet: 989 TFLOPS BF16 dense, 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s.
    "H100": Hardware("H100", 989e12, 3.35e12, 81559 * MiB, 450e9, 10e-6),
    # H800 SXM5: as H100, NVLink 400 GB/s.
    "H800": Hardware("H800", 989e12, 3.35e12, 81559 * MiB, 200e9, 10e-6),
    # H200 SXM datasheet: 989 TFLOPS BF16 dense, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s.
    "H200": Hardware("H200", 989e12, 4.8e12, 143771 * MiB, 450e9, 10e-6),
    # A100 SXM 80GB datasheet: 312 TFLOPS BF16 dense, 80 GB HBM2e at 2,039 GB/s, NVLink 600 GB/s.
    "A100": Hardware("A100", 312e12, 2.039e12, 81920 * MiB, 300e9, 10e-6),
}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
USABLE_MEMORY = 0.9  # share of HBM for weights + KV: vLLM's default gpu_memory_utilization


# -- this machine -----------------------------------------------------------------------------


@functools.cache
def cpu_profile() -> Hardware:
    """This CPU, measured once per process with torch's current thread count."""
    memory = float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return Hardware("cpu", matmul_flops(), stream_bandwidth(), memory,
                    link_bw=math.inf, latency=0.0)  # collectives are not predicted on the CPU


def stream_bandwidth(nbytes: int = 256 << 20, repeats: int = 7) -> float:
    """B/s of a read-only sweep (sum) over a buffer far larger than the last-level cache."""
    x = torch.ones(nbytes // 4)
    x.sum()  # first touch: page faults are not bandwidth
    return nbytes / _best_seconds(lambda: x.sum(), repeats)


def matmul_flops(n: int = 1024, repeats: int = 7) -> float:
    """fp32 FLOP/s of an n x n x n matmul."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    return 2 * n ** 3 / _best_seconds(lambda: a @ b, repeats)


def _best_seconds(fn, repeats: int) -> float:
    """The fastest of `repeats` calls: a roofline's ceilings are the best this machine does (a
    median would fold the co-runners of a shared machine into the ceiling)."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return min(samples)


def last_level_cache_bytes() -> int:
    """Size of cpu0's highest-level data/unified cache, from sysfs (0 when unreadable)."""
    best = (0, 0)
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            best = max(best, (int((index / "level").read_text()), _size(index / "size")))
        except (OSError, ValueError):
            continue
    return best[1]


def _size(path: Path) -> int:
    text = path.read_text().strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
    return int(text.rstrip("KMG")) * scale


# -- ops ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    name: str
    flops: float
    bytes: float  # through memory: weights + activations + KV
    weight_bytes: float = 0.0


@dataclass(frozen=True)
class Collective:
    name: str
    ring_bytes: float  # logical bytes each rank sends (ring formulas)


def op_time(op: Op | Collective, hw: Hardware) -> float:
    if isinstance(op, Collective):
        return hw.latency + op.ring_bytes / hw.link_bw
    return max(op.flops / hw.flops, op.bytes / hw.mem_bw)


def bound(op: Op, hw: Hardware) -> str:
    return "compute" if op.flops / hw.flops > op.bytes / hw.mem_bw else "memory"


def gemm(name: str, b: int, k_in: int, n_out: int, e: int) -> Op:
    """[b, k_in] @ [k_in, n_out]: the weights read once per step."""
    weights = k_in * n_out * e
    return Op(name, 2 * b * k_in * n_out, weights + b * (k_in + n_out) * e, weights)


def attention(b: int, heads: int, latent: int, rope: int, context: int, e: int) -> Op:
    """Absorbed MLA decode over one rank's cache, read once (a fused kernel: FA3, FlashMLA).

    Per head per key: 2(Cs + R) FLOPs for the logit, 2 Cs for the value product."""
    flops = b * heads * context * (2 * (latent + rope) + 2 * latent)
    return Op("attention", flops, b * context * (latent + rope) * e + b * heads * (2 * latent + rope) * e)


# -- models and strategies ----------------------------------------------------------------------


@dataclass(frozen=True)
class MlaModel:
    layers: int
    dense_layers: int  # the first layers' MLP is dense; the rest are MoE
    D: int
    H: int
    C: int
    R: int
    P: int
    V: int
    Q: int
    I: int
    vocab: int


def mla_model(name: str) -> MlaModel:
    c = bundled_config(name)
    return MlaModel(c.num_hidden_layers, c.first_k_dense_replace, c.hidden_size, c.num_attention_heads,
                    c.kv_lora_rank, c.qk_rope_head_dim, c.qk_nope_head_dim, c.v_head_dim, c.q_lora_rank,
                    c.intermediate_size, c.vocab_size)


@dataclass(frozen=True)
class Split:
    """One rank's share of an MLA layer (a strategy's `cost_split` builds it)."""

    name: str
    tp: int
    heads: int  # Hr
    latent: int  # Cs


def mla_layer(m: MlaModel, s: Split, b: int, context: int, e: int) -> list[Op | Collective]:
    """One rank's decode step of an MLA layer (absorbed form), ending in the one all-reduce."""
    return [
        gemm("q_a_proj", b, m.D, m.Q, e),  # replicated
        gemm("q_b_proj", b, m.Q, s.heads * (m.P + m.R), e),
        gemm("kv_a_proj", b, m.D, s.latent + m.R, e),  # an unsplit latent: every rank makes all of it
        _per_head("absorb_uk", b, s.heads, m.P, s.latent, e),
        attention(b, s.heads, s.latent, m.R, context, e),
        _per_head("w_uv", b, s.heads, s.latent, m.V, e),
        gemm("o_proj", b, s.heads * m.V, m.D, e),
        Collective("all_reduce", ring_all_reduce_bytes(b * m.D * e, s.tp)),
    ]


def _per_head(name: str, b: int, heads: int, k_in: int, n_out: int, e: int) -> Op:
    op = gemm(name, b, k_in, n_out, e)
    return Op(name, heads * op.flops, heads * op.bytes, heads * op.weight_bytes)


def dense_mlp_layer(m: MlaModel, tp: int, b: int, e: int) -> list[Op | Collective]:
    return [gemm("gate_up", b, m.D, 2 * m.I // tp, e), gemm("down", b, m.I // tp, m.D, e),
            Collective("all_reduce", ring_all_reduce_bytes(b * m.D * e, tp))]


def decode_step(m: MlaModel, s: Split, b: int, context: int, e: int) -> list[Op | Collective]:
    """Every op one rank runs in one decode step (vocab-parallel embedding and lm_head).

    MoE layers are left out, as in the TPLA paper's setting: the model predicts attention-side
    gains only."""
    ops: list[Op | Collective] = [Op("embedding", 0, b * m.D * e, m.vocab * m.D * e / s.tp)]
    for layer in range(m.layers):
        ops += mla_layer(m, s, b, context, e)
        ops += dense_mlp_layer(m, s.tp, b, e) if layer < m.dense_layers else []
    return ops + [gemm("lm_head", b, m.D, m.vocab // s.tp, e),
                  Collective("all_gather", ring_all_gather_bytes(b * m.vocab * e, s.tp))]


def step_seconds(ops: list[Op | Collective], hw: Hardware) -> float:
    return sum(op_time(op, hw) for op in ops)


def weights_per_rank(m: MlaModel, s: Split, e: int) -> float:
    return sum(op.weight_bytes for op in decode_step(m, s, 1, 0, e) if isinstance(op, Op))


def kv_bytes_per_seq(m: MlaModel, s: Split, context: int, e: int) -> float:
    """layers x tokens x (Cs + R) x e: one rank's cache of one sequence."""
    return m.layers * context * (s.latent + m.R) * e


def max_batch(hw: Hardware, weights_per_rank: float, kv_bytes_per_seq: float, usable: float = USABLE_MEMORY) -> int:
    """Most sequences whose KV fits beside the weights in the usable share of memory."""
    return max(0, math.floor((usable * hw.mem_bytes - weights_per_rank) / kv_bytes_per_seq))


# -- a compiled artifact ------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """One stretch of one rank's decode step: an op reading memory, a wait for the other ranks at a
    collective, or the collective itself. `op` is the report's decode_ops entry, `collective` the
    entry of op["collectives"] (None for compute)."""

    rank: int
    what: str  # "compute" | "wait" | "collective"
    start: float
    seconds: float
    op: dict
    collective: dict | None = None

    @property
    def end(self) -> float:
        return self.start + self.seconds


def per_token(collective: dict) -> int:
    """Logical bytes per token of a report collective entry (all-to-all: its upper bound)."""
    return collective.get("bytes_per_token", collective.get("bytes_per_token_max", 0))


def collective_time(collective: dict, hw: Hardware, batch: int) -> float:
    """`calls` calls of one collective moving `batch` tokens' logical bytes in all."""
    calls = collective["calls"]
    return calls * op_time(Collective(collective["op"], batch * per_token(collective) / max(calls, 1)), hw)


def decode_ops(report: dict) -> list[dict]:
    """report.json's decode_ops as the program runs them: a folded run's body (its entries carry
    `run`: [first layer, count]) once per layer of the run, layer by layer, each entry's FQN and
    layer moved to that layer."""
    out: list[dict] = []
    for run, body in groupby(report["decode_ops"], key=lambda op: tuple(op["run"]) if op.get("run") else None):
        body = list(body)
        if run is None:
            out += body
            continue
        first, count = run
        out += [op if layer == first else _moved(op, first, layer) for layer in range(first, first + count) for op in body]
    return out


def _moved(op: dict, first: int, layer: int) -> dict:
    """An entry of a folded run's first layer as it reads in `layer` ("model.layers.3.mlp" -> 5)."""
    parts = op["fqn"].split(".")
    if str(first) in parts:  # the layer's index, the first component that is it
        parts[parts.index(str(first))] = str(layer)
    return {**op, "fqn": ".".join(parts), "layer": layer}


def artifact_timeline(report: dict, hw: Hardware, batch: int, context: int) -> list[list[Slot]]:
    """One decode step of a compiled artifact on `hw`, op by op on every rank, from report.json's
    decode_ops (each node's exact per-rank weight and KV bytes and its collectives).

    An op reads its weights and `batch x context` cached tokens of its kv_bytes_per_token at HBM
    bandwidth, taken as memory-bound (decode GEMVs sit below the ridge until the batch nears peak
    FLOP/s over bandwidth per weight byte; the report carries no FLOPs); an MoE rank is taken to
    touch all its experts (a large batch does; a small one reads only its routed experts). A
    collective is a barrier: it starts when the last rank reaches it, so the others wait, and costs
    latency + logical ring bytes / link bandwidth per call (all-to-all at its upper bound). Nothing
    overlaps: a fused GEMM + ring (T3) reads its weights, then moves its bytes."""
    if "decode_ops" not in report:
        raise ValueError("report.json has no decode_ops (written by an older planc); recompile the artifact")
    world = len(report["per_rank"])
    ready = [0.0] * world
    slots: list[list[Slot]] = [[] for _ in range(world)]
    for op in decode_ops(report):
        for r in range(world):
            read = op["weight_bytes"][r] + batch * context * op["kv_bytes_per_token"][r]
            seconds = op_time(Op(op["node"], 0.0, read, op["weight_bytes"][r]), hw)
            if seconds > 0:
                slots[r].append(Slot(r, "compute", ready[r], seconds, op))
                ready[r] += seconds
        for c in op["collectives"]:
            start, seconds = max(ready), collective_time(c, hw, batch)
            for r in range(world):
                if start > ready[r]:
                    slots[r].append(Slot(r, "wait", ready[r], start - ready[r], op, c))
                slots[r].append(Slot(r, "collective", start, seconds, op, c))
                ready[r] = start + seconds
    return slots


def artifact_step(report: dict, hw: Hardware, batch: int, context: int) -> dict:
    """One decode step of a compiled artifact on `hw` (artifact_timeline): its length is the last
    rank's end. Ranks meet at every collective, so a rank slow in one layer and fast in another
    does not average out: the step is the slowest rank's time between each pair of collectives,
    summed, plus the collectives. Per rank: weights_s + kv_s (reading memory) + waiting_s +
    collectives_s = its end; `slowest` is the rank that ends last (of those, the one that waited
    least: the others waited for it)."""
    timeline = artifact_timeline(report, hw, batch, context)
    ranks = [_rank_step(r, slots, report, hw, batch, context) for r, slots in enumerate(timeline)]
    slowest = max(ranks, key=lambda t: (t["end_s"], -t["waiting_s"]))
    step = slowest["end_s"]
    return {"batch": batch, "context": context, "step_s": step, "tokens_per_s": batch / step if step else 0.0,
            "slowest": slowest, "ranks": ranks}


def _rank_step(rank: int, slots: list[Slot], report: dict, hw: Hardware, batch: int, context: int) -> dict:
    ops = decode_ops(report)
    weights = sum(op["weight_bytes"][rank] for op in ops)
    kv = batch * context * sum(op["kv_bytes_per_token"][rank] for op in ops)
    return {"rank": rank,
            "weights_s": op_time(Op("weights", 0.0, weights, weights), hw), "kv_s": op_time(Op("kv", 0.0, kv), hw),
            "waiting_s": sum((s.seconds for s in slots if s.what == "wait"), 0.0),
            "collectives_s": sum((s.seconds for s in slots if s.what == "collective"), 0.0),
            "end_s": slots[-1].end if slots else 0.0}


def artifact_max_batch(report: dict, hw: Hardware, context: int) -> int:
    """Most sequences of `context` tokens whose cache fits beside the weights on every rank that
    has a cache (0 when none has: memory does not bound the batch)."""
    return min((max_batch(hw, r["weight_bytes"], r["kv_bytes_per_token"] * context)
                for r in report["per_rank"] if r["kv_bytes_per_token"]), default=0)


# -- the TPLA paper's setting -------------------------------------------------------------------


def throughput(m: MlaModel, s: Split, hw: Hardware, context: int, e: int) -> dict:
    """Decode tokens/s of one TP group at its largest batch, with the step's breakdown."""
    weights, kv = weights_per_rank(m, s, e), kv_bytes_per_seq(m, s, context, e)
    b = max_batch(hw, weights, kv)
    if b < 1:
        raise ValueError(f"{s.name}: no sequence of {context} tokens fits {hw.name}'s memory beside "
                         f"{weights / 1e9:.1f} GB of weights per rank")
    ops = decode_step(m, s, b, context, e)
    seconds = step_seconds(ops, hw)
    by_name: dict[str, float] = {}
    for op in ops:
        by_name[op.name] = by_name.get(op.name, 0.0) + op_time(op, hw)
    return {"strategy": s.name, "batch": b, "weights_per_rank_GB": weights / 1e9, "kv_per_seq_GB": kv / 1e9,
            "step_ms": seconds * 1e3, "tokens_per_s": b / seconds,
            "step_ms_by_op": {k: v * 1e3 for k, v in by_name.items()}}


def compare(model: str, base_split, ours_split, hw: str = "H800", context: int = 32768,
            dtype: str = "bfloat16") -> dict:
    """Two splits of one model (`base_split(m)`, `ours_split(m)`: strategies' cost_split), each at its
    maximal batch: their throughputs, the speedup and the batch and KV-width ratios."""
    m, profile, e = mla_model(model), PROFILES[hw], DTYPE_BYTES[dtype]
    base_s, ours_s = base_split(m), ours_split(m)
    base = throughput(m, base_s, profile, context, e)
    ours = throughput(m, ours_s, profile, context, e)
    return {"base": base, "ours": ours, "speedup": ours["tokens_per_s"] / base["tokens_per_s"],
            "batch_ratio": ours["batch"] / base["batch"],
            "kv_width_ratio": (base_s.latent + m.R) / (ours_s.latent + m.R)}


# -- an expert-parallel MoE layer (Speculative MoE / Sem-MoE) -------------------------------------


@dataclass(frozen=True)
class MoeModel:
    D: int
    E: int  # routed experts
    K: int  # experts per token
    I: int  # per routed expert
    shared_I: int  # the shared experts' intermediate size (0: none)


def moe_model(name: str) -> MoeModel:
    c = bundled_config(name)
    return MoeModel(c.hidden_size, c.n_routed_experts, c.num_experts_per_tok, c.moe_intermediate_size,
                    c.moe_intermediate_size * (c.n_shared_experts or 0))


def moe_layer(m: MoeModel, world: int, tokens: int, remote_per_token: float, imbalance: float, shuffled: bool,
              e: int) -> list[Op | Collective]:
    """One rank's MoE layer under expert parallelism with attention split over the same `world`
    ranks, `tokens` tokens per rank (N = world x tokens in the step), from the collective that
    sums the attention output to every rank holding the layer's output again.

    Without token shuffling: all-reduce of N rows, the router on all N tokens (every rank routes
    every token), dispatch and combine of `remote_per_token` rows per token of its slice, the
    experts on `imbalance` x the mean activations (N K / world), the shared expert on its slice,
    all-gather of N rows. With it: a reduce-scatter instead of the all-reduce, the router on the
    rank's own tokens, an all-gather of every token's K expert ids and weights (8 bytes each)."""
    N, row = world * tokens, m.D * e
    activations = imbalance * tokens * m.K
    experts = Op("experts", 2 * 3 * m.D * m.I * activations, m.E // world * 3 * m.D * m.I * e
                 + activations * (2 * m.D + 3 * m.I) * e, m.E // world * 3 * m.D * m.I * e)
    a2a = Collective("all_to_all", tokens * remote_per_token * row)
    ops: list[Op | Collective] = [
        Collective("reduce_scatter", ring_reduce_scatter_bytes(N * row, world)) if shuffled
        else Collective("all_reduce", ring_all_reduce_bytes(N * row, world)),
        gemm("router", tokens if shuffled else N, m.D, m.E, e),
    ]
    ops += [Collective("all_gather", ring_all_gather_bytes(N * 2 * m.K * 8, world))] if shuffled else []
    ops += [a2a, experts, a2a]
    ops += [gemm("shared_gate_up", tokens, m.D, 2 * m.shared_I, e), gemm("shared_down", tokens, m.shared_I, m.D, e)] \
        if m.shared_I else []
    return ops + [Collective("all_gather", ring_all_gather_bytes(N * row, world))]

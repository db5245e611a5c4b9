"""`overlap: {kind: t3}` — T3 (arXiv 2401.16677): a row-parallel GEMM fused with its all-reduce.

    before:  a = linear[o_proj](o)  (row: a per-rank partial sum);  a' = all_reduce(a);  h = add(h, a')
    after:   a' = t3_linear_all_reduce[o_proj](o);  h = add(h, a')
             a step of >= min_tokens tokens: the GEMM makes its output columns piece by piece in the
             ring's order, each partial sum goes to rank d-1 as soon as it is complete while the next
             piece is computed (a ring reduce-scatter), then one all-gather; fewer: GEMM, then all_reduce

Schedule: the N output columns are cut into P = k·n pieces; chunk c (pieces c·k ... c·k+k-1) is
owned by rank c. At ring step s rank d computes its partial sums of chunk (d+1+s) % n, adds the
partial sums rank d+1 sent at step s-1 and sends the result to rank d-1; at step n-1 its own chunk
d is complete (chunk c is summed over ranks c-1, c-2, ..., c). The transfer of step s overlaps the
GEMM of step s+1. All-reduce = this reduce-scatter + an all-gather, which nothing hides.

Every producer linear -> all_reduce / reduce_scatter in the final graph is a candidate, matched by
a rule or not (`candidates`): report.json lists each as fused, declined (why) or without a rule,
with the cost model's sequential and fused time per GPU profile.

Legend: M tokens of the step (B·S), K input features on this rank, N output features, n ranks,
P pieces, k = P / n pieces per chunk, e bytes per element.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from planc import cost
from planc.ir import (OPS, Call, LinearShard, NodeInfo, Traffic, add_node, copy_graph, declare_op, info,
                      is_kind)
from planc.lazy import lazy
from planc.ring import (ring_all_gather_bytes, ring_all_reduce_bytes, ring_piece_order, ring_reduce_scatter_bytes,
                        ring_sum_order)
from planc.strategy import Section, Strategy

torch = lazy("torch")
fx = lazy("torch.fx")


class T3Section(Section):
    """Fuse each matched row-parallel GEMM with the all-reduce after it, chunk by chunk (T3)."""

    discriminator: ClassVar[str] = "kind"
    kind: Literal["t3"] = Field(description="t3: the GEMM's output pieces go around a ring as soon as each is made.")
    min_tokens: Annotated[int, Field(ge=0, strict=True)] | Literal["auto"] = Field(
        "auto", description="Steps with fewer tokens (batch x new tokens) run the GEMM, then the all-reduce, as "
        "without T3: on a small step the ring's per-message latency costs more than it hides. auto: the fewest "
        "tokens from which the cost model predicts T3 faster on every one of H100, H200 and H800 (a GEMM it "
        "predicts slower on one of them at every size is declined).")
    chunks: Annotated[int, Field(ge=1, strict=True)] | Literal["auto"] = Field(
        "auto", description="Pieces the GEMM's output columns are cut into: a multiple of the ranks that divides "
        "the output features. auto: the count the cost model predicts fastest on H100, H200 and H800.")


@dataclass(frozen=True)
class ChunkedRow(LinearShard):
    """A row-parallel GEMM whose output columns are made in `chunks` pieces around the ring."""

    chunks: int = 0
    min_tokens: int = 0

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"chunks": self.chunks, "min_tokens": self.min_tokens}


FUSED = "t3_linear_all_reduce"
PROFILES = ("H100", "H200", "H800")  # the GPU profiles of planc.cost each candidate is predicted on
PREDICT_TOKENS = (8, 512, 4096)  # a decode batch, a short prefill, a long one
ELEM = 2  # predictions are for bf16, as these GPUs serve
MOST_TOKENS = 1 << 20  # the largest step the break-even search tries


def _emit(c: Call) -> str:
    s: ChunkedRow = c.info.shard
    return (f"t3.linear_all_reduce(ops, comm, {c.args[0]}, {c.weight('weight')}, {c.maybe('bias')}, "
            f"chunks={s.chunks}, min_tokens={s.min_tokens})")


def fused_in(step: str, shard: ChunkedRow) -> bool:
    """The report's reading of the runtime's choice: a decode step is taken as one token per
    sequence below min_tokens sequences, a prefill as at least min_tokens tokens."""
    return step == "prefill" or shard.min_tokens <= 1


def _traffic(m: NodeInfo, step: str, elem: int, world: int) -> tuple[Traffic, ...]:
    """Sequential: one all-reduce. Fused: (n-1)·k sends and receives of one piece each (a ring
    reduce-scatter's bytes in all), then one all-gather."""
    S = m.dims.out_features * elem  # bytes per token of the whole output
    if not fused_in(step, m.shard):
        return (Traffic("all_reduce", 1, ring_all_reduce_bytes(S, world)),)
    messages = (world - 1) * (m.shard.chunks // world)
    ring = ring_reduce_scatter_bytes(S, world)
    return (Traffic("send", messages, ring), Traffic("recv", messages, ring),
            Traffic("all_gather", 1, ring_all_gather_bytes(S, world)))


declare_op(FUSED, _emit, owns_weights=True, imports=("from planc.passes import t3",), collective="all_reduce",
           traffic=_traffic, kernels=("t3_gemm.py", "linear.py"))


# -- the pass ---------------------------------------------------------------------------------------


def t3(graph: fx.Graph, section: T3Section, ctx) -> fx.Graph:
    graph = copy_graph(graph)
    for gemm in ctx.bound(graph, ("linear",)):
        collective, chunks, min_tokens, reason = _decide(gemm, section, ctx.world_size)
        if reason:
            ctx.decline(gemm, reason)
            continue
        _fuse(graph, gemm, collective, ChunkedRow("row", info(gemm).shard.segments, chunks, min_tokens), ctx)
        auto = (" (auto: where the cost model predicts T3 faster on every profile)"
                if section.min_tokens == "auto" else "")
        ctx.applied(gemm, f"fused with its all_reduce: {chunks} pieces, steps of >= {min_tokens} tokens{auto}")
        if not auto:
            _advise(ctx, min_tokens, info(gemm), _pays_from(info(gemm), ctx.world_size, chunks))
    return graph


def _decide(gemm: fx.Node, section: T3Section, world: int) -> tuple[fx.Node | None, int, int, str]:
    """(collective, pieces, min_tokens, "") for a GEMM the rule can fuse; (None, 0, 0, why) otherwise."""
    collective, reason = _after(gemm, world)
    m = info(gemm)
    chunks = 0 if reason else _chunks(section, m, world)
    reason = reason or _bad_chunks(m, chunks, world, section.chunks)
    if reason:
        return None, 0, 0, reason
    if section.min_tokens != "auto":
        return collective, chunks, section.min_tokens, ""
    pays = _pays_from(m, world, chunks)
    if None in pays.values():
        return None, 0, 0, (f"min_tokens auto: the cost model predicts T3 slower than the GEMM then the all-reduce "
                            f"at every step up to {MOST_TOKENS} tokens ({pays_text(pays)}); set min_tokens to fuse "
                            f"it anyway")
    return collective, chunks, max(pays.values()), ""


def _advise(ctx, min_tokens: int, m: NodeInfo, pays: dict[str, int | None]) -> None:
    """Once per rule: say so when min_tokens lets through steps the cost model predicts T3 to slow."""
    early = {h: t for h, t in pays.items() if t is None or t > min_tokens}
    label = f"t3 {ctx.rule.label}"
    if early and not any(line.startswith(label + ":") for line in ctx.advice):
        ctx.advice.append(f"{label}: min_tokens {min_tokens} fuses steps the cost model predicts slower than "
                          f"the GEMM then the all-reduce for {m.fqn} ({pays_text(early)}); raise min_tokens on "
                          f"those GPUs")


def _after(gemm: fx.Node, world: int) -> tuple[fx.Node | None, str]:
    """The collective the GEMM's output goes to, or why there is none to fuse with."""
    m = info(gemm)
    users = list(gemm.users)
    found = [u for u in users if "planc" in u.meta and OPS[info(u).kind].collective in ("all_reduce", "reduce_scatter")]
    if not found and any(is_kind(u, "add") and any(is_kind(r, "all_reduce") for r in u.users) for u in users):
        return None, (f"{m.fqn}'s partial output is summed with another partial (the other branch of a parallel "
                      "layer, or routed experts) before one all-reduce, which no single GEMM produces")
    if not found:
        layout = m.shard.layout + "-parallel" if isinstance(m.shard, LinearShard) else "replicated"
        return None, f"{m.fqn} is {layout}: no all-reduce or reduce-scatter follows it, so there is nothing to overlap"
    if len(users) > 1:
        others = ", ".join(u.name for u in users if u is not found[0])
        return None, (f"its output is consumed before the collective (by {others}), so the GEMM cannot hand pieces "
                      f"to the ring")
    if info(found[0]).kind != "all_reduce":
        return None, f"it feeds {info(found[0]).kind}; planc fuses a GEMM with a plain all_reduce only"
    if world == 1:
        return None, "one rank: the all-reduce moves nothing"
    return found[0], ""


def _chunks(section: T3Section, m: NodeInfo, world: int) -> int:
    if section.chunks != "auto":
        return section.chunks
    options = valid_chunks(m.dims.out_features, world)
    k_in = m.local_dims().in_features
    tokens = max(section.min_tokens if section.min_tokens != "auto" else 0, PREDICT_TOKENS[-1])
    return min(options, key=lambda p: sum(predict(cost.PROFILES[h], tokens, k_in, m.dims.out_features, world, p)[1]
                                          for h in PROFILES))


def valid_chunks(width: int, world: int, most: int = 8) -> list[int]:
    """Piece counts the ring can use: multiples of the ranks (up to `most` per rank) dividing `width`."""
    return [world * j for j in range(1, most + 1) if width % (world * j) == 0] or [world]


def _bad_chunks(m: NodeInfo, chunks: int, world: int, asked: int | str) -> str:
    width = m.dims.out_features
    if chunks % world == 0 and width % chunks == 0:
        return ""
    valid = [world * j for j in range(1, width // world + 1) if width % (world * j) == 0]
    shown = ", ".join(map(str, valid[:8])) + (", ..." if len(valid) > 8 else "")
    return (f"the {width} output rows of {m.fqn} do not split into chunks: {asked} (a multiple of the {world} ranks "
            f"dividing {width} is needed); valid chunks: {shown or 'none'}")


def _fuse(graph: fx.Graph, gemm: fx.Node, collective: fx.Node, shard: ChunkedRow, ctx) -> None:
    m = info(gemm)
    meta = m.with_(kind=FUSED, strategy="t3", rule=ctx.rule, shard=shard,
                   why=f"{m.fqn.rsplit('.', 1)[-1]}'s partial sums reduce-scattered piece by piece as the GEMM makes "
                       f"them (steps of >= {shard.min_tokens} tokens), then all-gathered")
    with graph.inserting_before(collective):
        fused = add_node(graph, FUSED, gemm.args, meta, name=f"{gemm.name}_t3")
    collective.replace_all_uses_with(fused)
    graph.erase_node(collective)
    graph.erase_node(gemm)


# -- every candidate, for the report ----------------------------------------------------------------


def candidates(graph: fx.Graph, ctx) -> list[dict[str, Any]]:
    """Each GEMM -> all_reduce / reduce_scatter of the final graph (fused, declined or without a
    rule), with its serialized collectives and the cost model's prediction."""
    declined = {r.target: r for r in ctx.records if r.pass_name == "t3" and r.action == "declined"}
    out = []
    for node in graph.nodes:
        if "planc" not in node.meta:
            continue
        m = info(node)
        if m.kind == FUSED:
            out.append(_fused_entry(m, ctx.world_size))
        elif OPS[m.kind].collective in ("all_reduce", "reduce_scatter") and _producer(node) is not None:
            gemm = info(_producer(node))
            record = declined.get(gemm.fqn)
            status, detail = (("declined", record.detail) if record else
                              ("no rule", f"no overlap rule matches {gemm.fqn}; `overlap: {{kind: t3}}` would fuse it"))
            out.append(_entry(gemm, m.kind, status, detail, record.rule if record else None, 1, ctx.world_size))
    return out


def _producer(collective: fx.Node) -> fx.Node | None:
    source = collective.args[0] if collective.args else None
    if isinstance(source, fx.Node) and "planc" in source.meta and info(source).kind == "linear" \
            and info(source).fqn == info(collective).fqn:
        return source
    return None


def _fused_entry(m: NodeInfo, world: int) -> dict[str, Any]:
    s: ChunkedRow = m.shard
    steps = {step: ("fused" if fused_in(step, s) else "sequential") for step in ("decode", "prefill")}
    when = ("every step fused" if steps["decode"] == "fused" else f"steps of >= {s.min_tokens} tokens fused "
            f"(prefill fused, decode sequential below {s.min_tokens} sequences)")
    detail = (f"{s.chunks} pieces, {when}; serialized collectives after the GEMM 1 -> 0; cost model: "
              + pays_text(_pays_from(m, world, s.chunks)))
    entry = _entry(m, "all_reduce", "fused", detail, m.rule.index, 0, world, s.chunks)
    return entry | {"chunks": s.chunks, "min_tokens": s.min_tokens, "steps": steps}


def _entry(m: NodeInfo, collective: str, status: str, detail: str, rule: int | None, serialized: int, world: int,
           chunks: int | None = None) -> dict[str, Any]:
    return {"target": m.fqn, "layer": m.layer, "collective": collective, "status": status, "detail": detail,
            "rule": rule, "serialized_collectives_after": serialized,
            "in_features_per_rank": m.local_dims().in_features, "out_features": m.dims.out_features,
            "predicted": _predicted(m, world, chunks or valid_chunks(m.dims.out_features, world)[0])}


# -- the cost model ---------------------------------------------------------------------------------


def predict(hw: cost.Hardware, tokens: int, k_in: int, n_out: int, world: int, pieces: int,
            e: int = ELEM) -> tuple[float, float]:
    """(sequential, fused) seconds of one rank: GEMM then ring all-reduce, against the T3 schedule.

    Fused: one GEMM launch makes the pieces one after another, 1/P of its time each, without
    waiting (the ring runs beside it, as on a GPU side stream; the model assumes the transfers do
    not slow the GEMM, which T3's near-memory reduction is for). A piece of step s >= 1 is sent once
    it is made, its predecessor from rank d+1 has arrived (by symmetry: when this rank's own send of
    that piece at step s-1 ended) and the link is free; a message costs latency + bytes / link
    bandwidth, the reduction riding with the transfer as in NCCL's ring. Then the all-gather, which
    nothing hides."""
    S = tokens * n_out * e
    gemm = cost.op_time(cost.gemm("gemm", tokens, k_in, n_out, e), hw)
    sequential = gemm + cost.op_time(cost.Collective("all_reduce", ring_all_reduce_bytes(S, world)), hw)
    message = cost.op_time(cost.Collective("send", S // pieces), hw)
    k = pieces // world
    made = link = done = 0.0
    arrived = [0.0] * k
    for step in range(world):
        for j in range(k):
            made += gemm / pieces
            ready = max(made, arrived[j])
            if step < world - 1:
                link = max(ready, link) + message
                arrived[j] = link
            else:
                done = max(done, ready)
    fused = done + cost.op_time(cost.Collective("all_gather", ring_all_gather_bytes(S, world)), hw)
    return sequential, fused


def pays_from(hw: cost.Hardware, k_in: int, n_out: int, world: int, pieces: int, e: int = ELEM,
              most: int = MOST_TOKENS) -> int | None:
    """The fewest tokens (a power of two) from which the model predicts T3 faster; None below `most`."""
    tokens = 1
    while tokens <= most:
        sequential, fused = predict(hw, tokens, k_in, n_out, world, pieces, e)
        if fused < sequential:
            return tokens
        tokens *= 2
    return None


def pays_text(pays: dict[str, int | None]) -> str:
    """{'H100': 4096, 'H200': 4096, 'H800': None} -> 'pays from 4096 tokens on H100, H200; never on H800'."""
    by: dict[int | None, list[str]] = {}
    for profile, tokens in pays.items():
        by.setdefault(tokens, []).append(profile)
    return "; ".join(f"pays from {t} tokens on {', '.join(h)}" if t else f"never pays on {', '.join(h)}"
                     for t, h in by.items())


def _pays_from(m: NodeInfo, world: int, pieces: int) -> dict[str, int | None]:
    return _pays_from_shape(m.local_dims().in_features, m.dims.out_features, world, pieces)


@functools.cache
def _pays_from_shape(k_in: int, n_out: int, world: int, pieces: int) -> dict[str, int | None]:
    return {h: pays_from(cost.PROFILES[h], k_in, n_out, world, pieces) for h in PROFILES}


def _predicted(m: NodeInfo, world: int, pieces: int) -> dict[str, dict]:
    return _predicted_shape(m.local_dims().in_features, m.dims.out_features, world, pieces)


@functools.cache
def _predicted_shape(k_in: int, n_out: int, world: int, pieces: int) -> dict[str, dict]:
    """The prediction of one GEMM shape, computed once per compile however many layers share it
    (the entries of a 61-layer model share one dict; nothing edits it)."""
    out = {}
    for h in PROFILES:
        hw = cost.PROFILES[h]
        at = {str(t): dict(zip(("sequential_s", "fused_s"), predict(hw, t, k_in, n_out, world, pieces)))
              for t in PREDICT_TOKENS}
        out[h] = {"pieces": pieces, "pays_from_tokens": pays_from(hw, k_in, n_out, world, pieces),
                  **{t: v | {"ratio": v["sequential_s"] / v["fused_s"]} for t, v in at.items()}}
    return out


# -- runtime ----------------------------------------------------------------------------------------


class TorchPieces:
    """One rank's partial sums of `x @ w.T (+ b)`, one output piece per `ops.linear` call."""

    def __init__(self, ops, x_MK: torch.Tensor, w_NK: torch.Tensor, b_N: torch.Tensor | None, pieces: int):
        self.ops, self.x_MK, self.w_NK, self.b_N, self.num = ops, x_MK, w_NK, b_N, pieces
        self.width = w_NK.shape[0] // pieces

    def compute(self, piece: int) -> torch.Tensor:
        lo = piece * self.width
        b = self.b_N[lo:lo + self.width] if self.b_N is not None else None
        return self.ops.linear(self.x_MK, self.w_NK[lo:lo + self.width], b)

    def ready(self, piece: int) -> bool:
        return True  # compute() returned the finished piece

    def running(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def ring_reduce_scatter(comm, pieces) -> torch.Tensor:
    """This rank's chunk [M, N/n] of the sum over ranks, each piece sent as soon as it is made.

    The receives of step s+1 are posted before step s computes, so the neighbour's transfer runs
    while this rank's GEMM does; a received partial sum is added and passed on."""
    n, rank = comm.world_size, comm.rank
    k = pieces.num // n
    order = ring_piece_order(rank, n, pieces.num)
    left, right = (rank - 1) % n, (rank + 1) % n
    shape = (pieces.x_MK.shape[0], pieces.width)
    sends, mine, incoming = [], [], []
    for step in range(n):
        ahead = [comm.irecv(pieces.x_MK.new_empty(shape), right) for _ in range(k)] if step < n - 1 else []
        for j, piece in enumerate(order[step * k:(step + 1) * k]):
            partial = pieces.compute(piece)
            if step:
                partial = incoming[j].wait().add_(partial)
            assert pieces.ready(piece), f"piece {piece} would be sent before its tiles are all written"
            if step < n - 1:
                sends.append(comm.isend(partial, left))
            else:
                mine.append(partial)
        incoming = ahead
    for send in sends:
        send.wait()
    return torch.cat(mine, dim=-1)


def linear_all_reduce(ops, comm, x: torch.Tensor, w_NK: torch.Tensor, b_N: torch.Tensor | None, *, chunks: int,
                      min_tokens: int) -> torch.Tensor:
    """all_reduce(linear(x, w, b)): through the T3 ring on a step of >= min_tokens tokens, else in sequence."""
    x_MK = x.reshape(-1, x.shape[-1])
    if comm.world_size == 1 or x_MK.shape[0] < min_tokens:
        return comm.all_reduce(ops.linear(x, w_NK, b_N))
    make = getattr(ops, "t3_pieces", None)  # a kernel backend's GEMM with per-piece counters
    pieces = (make(x_MK, w_NK, b_N, comm.rank, comm.world_size, chunks) if make
              else TorchPieces(ops, x_MK, w_NK, b_N, chunks))
    with pieces.running():
        mine_MC = ring_reduce_scatter(comm, pieces)
    n, (M, C) = comm.world_size, mine_MC.shape
    every_nMC = comm.all_gather(mine_MC)  # chunk r of rank r, stacked along dim 0
    return every_nMC.view(n, M, C).transpose(0, 1).reshape(*x.shape[:-1], n * C)


def ring_reference(ops, x_MK: list[torch.Tensor], w_NK: list[torch.Tensor], b_N: list[torch.Tensor | None],
                   pieces: int) -> list[torch.Tensor]:
    """What the ring leaves on each rank, on one process: every piece computed as the ring does
    (TorchPieces) and summed over ranks in the ring's order; rank r's chunk [M, N/n]."""
    n = len(x_MK)
    made = [TorchPieces(ops, x_MK[r], w_NK[r], b_N[r], pieces) for r in range(n)]
    k = pieces // n
    out = []
    for chunk in range(n):
        parts = []
        for piece in range(chunk * k, (chunk + 1) * k):
            first, *rest = ring_sum_order(chunk, n)
            total = made[first].compute(piece)
            for r in rest:
                total = total + made[r].compute(piece)
            parts.append(total)
        out.append(torch.cat(parts, dim=-1))
    return out


STRATEGY = Strategy("t3", "overlap", "t3", ("linear",), T3Section, t3, "GEMM fused with its all-reduce (T3)",
                    candidates=candidates)

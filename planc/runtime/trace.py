"""`planc run --trace`: wall-clock spans of every program node of the decode steps, on every rank,
gathered to rank 0 and written as one Chrome trace in planc.report.timeline's layout (pid = rank;
tid 0 compute, tid 1 collectives).

A traced run loads the target's program.py with `forward` instrumented: an AST rewrite of the
checked source, in memory only, puts `__planc_trace__(k)` before node k's statement and before the
return, so node k's span runs from its stamp to the next one:

    h = ops.embedding(ids, W['model.embed_tokens.weight'])
        -> __planc_trace__(0); h = ops.embedding(ids, W['model.embed_tokens.weight'])
    return logits  ->  __planc_trace__(N); return logits

An untraced run loads the program as compiled and runs nothing more (the Comm wrapper checks, once
per collective, that no trace records).

Traced steps are the target's forwards in TRACED_PHASES: the decode steps of plain decoding, the
verify forwards of a speculative run. A node whose span holds Comm calls goes on the collectives
thread with their ops, logical bytes and time inside the wrapper; the part of it before the last
rank reached the node is drawn as "wait" (the ranks meet there). Clock: time.perf_counter on each
rank, zero at the end of a barrier all ranks meet just before their first traced step (in phase
"trace", outside the decode counts), so the ranks line up to that barrier's exit skew (tens of
microseconds with gloo on one machine). On a rank that uses CUDA each stamp synchronizes the device
first, so a span is the node's work rather than its launch, and a traced step is slower than an
untraced one.
"""
from __future__ import annotations

import ast
import bisect
import time
from pathlib import Path
from types import ModuleType

import torch

from planc.report import timeline
from planc.runtime.artifact import ArtifactDir
from planc.runtime.comm import Comm

HOOK = "__planc_trace__"
TRACED_PHASES = ("decode", "verify")
COMM_OPS = ("all_reduce", "reduce_scatter", "all_gather", "all_gather_varlen", "all_to_all", "broadcast", "send",
            "recv", "barrier")  # what Comm records, by index in a gathered row
NODE, CALL = 0, 1  # row kinds: (kind, step, node index | COMM_OPS index, start_ns, end_ns, logical bytes)
NS = 1e9


class Tracer:
    """Stamps the nodes of one program's traced forwards on this rank; `finish` gathers every rank's."""

    def __init__(self, comm: Comm):
        self.comm = comm
        self.nodes: list[str] = []  # node k's name
        self._sync = torch.cuda.is_available() and torch.cuda.is_initialized()  # this rank runs on a GPU
        self._stamps: list[tuple[int, int, float]] = []  # (step, node index or len(nodes) for the end, time)
        self._on = False
        self._steps = 0
        self._zero = 0.0

    def load(self, artifact: ArtifactDir, rel: str, name: str) -> ModuleType:
        """The program at `rel`, its forward stamping this tracer."""
        module = artifact.load_module(rel, name, instrument=self.instrument)
        setattr(module, HOOK, self.mark)
        return module

    def instrument(self, tree: ast.Module) -> ast.Module:
        """A stamp before every node statement of `forward` (`name = ...`) and before its return."""
        forward = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "forward")
        body: list[ast.stmt] = []
        for stmt in forward.body:
            name = _assigned_name(stmt)
            if name is not None or isinstance(stmt, ast.Return):
                body.append(_stamp(len(self.nodes), stmt))
            if name is not None:
                self.nodes.append(name)
            body.append(stmt)
        forward.body = body
        return ast.fix_missing_locations(tree)

    def mark(self, k: int) -> None:
        if k == 0:
            self._begin()
        if not self._on:
            return
        if self._sync:
            torch.cuda.synchronize()
        self._stamps.append((self._steps, k, time.perf_counter()))
        if k == len(self.nodes):
            self._on = False

    def _begin(self) -> None:
        self._on = self.comm.current_phase in TRACED_PHASES
        if not self._on:
            return
        if self._steps == 0:
            with self.comm.phase("trace"):
                self.comm.barrier()
            self._zero = time.perf_counter()
            self.comm.spans = []
        self._steps += 1

    def rows(self) -> torch.Tensor:
        """This rank's node spans and Comm calls as int64 rows (NODE / CALL), ns from the zero."""
        rows = [(NODE, step, k, self._ns(t), self._ns(t_next), 0)
                for (step, k, t), (step_next, _, t_next) in zip(self._stamps, self._stamps[1:])
                if step_next == step and k < len(self.nodes)]
        rows += [(CALL, 0, COMM_OPS.index(op), self._ns(start), self._ns(end), nbytes)
                 for op, nbytes, start, end in self.comm.spans or []]
        return torch.tensor(rows, dtype=torch.int64).reshape(-1, 6)

    def _ns(self, t: float) -> int:
        return round((t - self._zero) * NS)

    def finish(self, out: Path, metadata: dict) -> dict | None:
        """On every rank: stop recording and gather every rank's rows; rank 0 writes the Chrome trace
        to `out` (atomically) and returns where and what, the other ranks None."""
        mine = self.rows()
        self.comm.spans = None
        with self.comm.phase("trace"):
            device = self.comm.device
            sizes = self.comm.all_gather(torch.tensor([[mine.shape[0]]], device=device))[:, 0].tolist()
            every = (self.comm.all_gather_varlen(mine.to(device), sizes) if any(sizes) else mine).cpu()
        if self.comm.rank != 0:
            return None
        per_rank = every.split(sizes)
        trace = measured_trace([r.tolist() for r in per_rank], self.nodes,
                               {**metadata, "decode_steps": self._steps, "traced_phases": list(TRACED_PHASES)})
        timeline.write(trace, out)
        return {"file": str(out), "decode_steps": self._steps,
                "events": sum(e["ph"] == "X" for e in trace["traceEvents"])}


def _assigned_name(stmt: ast.stmt) -> str | None:
    """The node a program statement computes (`name = expr`), None for any other statement."""
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
        return stmt.targets[0].id
    return None


def _stamp(k: int, at: ast.stmt) -> ast.stmt:
    call = ast.Expr(ast.Call(ast.Name(HOOK, ast.Load()), [ast.Constant(k)], []))
    return ast.copy_location(call, at)


# -- rank 0: the Chrome trace -----------------------------------------------------------------


def measured_trace(rows_by_rank: list[list[list[int]]], nodes: list[str], metadata: dict) -> dict:
    """Every rank's rows as complete events: a node without Comm calls on the compute thread, one
    with them on the collectives thread, after a "wait" while the last rank had not reached it."""
    spans = [_spans(rows, nodes) for rows in rows_by_rank]
    latest: dict[tuple[int, int], int] = {}  # (step, node) -> the last rank's start there
    for rank_spans in spans:
        for s in rank_spans:
            if s["calls"]:
                key = (s["step"], s["node"])
                latest[key] = max(latest.get(key, s["start"]), s["start"])
    events = []
    for rank, rank_spans in enumerate(spans):
        events += timeline.process(rank, f"rank {rank}")
        for s in rank_spans:
            events += _events(rank, s, nodes, latest.get((s["step"], s["node"])))
    return timeline.chrome_trace(events, {"source": "measured", "clock": "time.perf_counter, zero at a barrier "
                                          "before each rank's first traced step", "world_size": len(rows_by_rank),
                                          **metadata})


def _spans(rows: list[list[int]], nodes: list[str]) -> list[dict]:
    """Node spans in time order, each with the Comm calls that ended inside it."""
    calls = sorted((r for r in rows if r[0] == CALL), key=lambda r: r[4])
    ends = [r[4] for r in calls]
    spans = []
    for _, step, k, start, end, _ in sorted((r for r in rows if r[0] == NODE), key=lambda r: r[3]):
        inside = calls[bisect.bisect_right(ends, start):bisect.bisect_right(ends, end)]  # (start, end]
        spans.append({"step": step, "node": k, "start": start, "end": end, "calls": inside})
    return spans


def _us(ns: int) -> float:
    return ns / 1e3


def _events(rank: int, s: dict, nodes: list[str], latest: int | None) -> list[dict]:
    name, start, end = nodes[s["node"]], s["start"], s["end"]
    if not s["calls"]:
        return [timeline.complete(name, "compute", _us(start), _us(end - start), rank, timeline.COMPUTE,
                                  {"step": s["step"]})]
    met = min(max(latest, start), end)
    args = {"step": s["step"], "op": "+".join(sorted({COMM_OPS[c[2]] for c in s["calls"]})), "calls": len(s["calls"]),
            "logical_bytes": sum(c[5] for c in s["calls"]), "in_comm_us": _us(sum(c[4] - c[3] for c in s["calls"]))}
    waited = [timeline.complete("wait", "wait", _us(start), _us(met - start), rank, timeline.COLLECTIVES,
                                {"step": s["step"], "for": name})] if met > start else []
    return waited + [timeline.complete(name, "collective", _us(met), _us(end - met), rank, timeline.COLLECTIVES, args)]

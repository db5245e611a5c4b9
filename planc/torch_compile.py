"""planc as a torch.compile backend: `torch.compile(model, backend="planc", options={"plan": ...})`.

The backend runs the pipeline `planc compile` runs (driver.compile), fed by the Dynamo producer
(planc.lift.dynamo) instead of torch.export: the same lift, passes, partition and program, written
as an artifact in a temporary directory. The compiled module then runs that artifact's per-rank
program (planc.runtime.model.Model, as `planc run` ranks do) holding this rank's shard of the
weights alone:

- in a job torchrun or planc's launcher started (RANK / WORLD_SIZE in the environment, or a
  default process group already up), as this rank, with the plan's mesh.devices ranks; every rank
  compiles the same artifact (the compile is deterministic: the ranks compare what they loaded,
  as `planc run` ranks do, before the first step);
- otherwise in this process, which needs a plan of one device.

The program keeps its own KV cache. A call whose token ids extend the previous call's (a decode
loop calling model(ids) on a growing sequence) runs only the new tokens against the cache and
returns the logits of every position, as the eager model does; any other call starts again with a
prefill. The weights are copied into the artifact when Dynamo first compiles: later changes to the
model's parameters are not seen (an inference compile).

Recompiles are bounded and counted: Dynamo compiles once per new input shape until it marks the
sequence length dynamic (twice for a growing sequence); every graph it hands over reuses the
artifact and the cache of the first, and `compile_records()` lists each (also logged at INFO by
the `planc.backend` logger).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn

from planc.errors import PlancError, PlanError
from planc.lift.dynamo import DynamoGraph, from_dynamo
from planc.plan import Plan, load_plan
from planc.runtime import KERNELS

OPTIONS = ("plan", "strict", "kernels")  # what options= may hold
MIN_CAPACITY = 256  # KV cache slots allocated at a prefill (at least twice the prompt)
log = logging.getLogger("planc.backend")


@dataclass(frozen=True)
class CompileRecord:
    """One graph Dynamo handed the backend."""

    index: int  # 1 for the first graph of this model and plan
    inputs: str  # the token ids' shape as Dynamo traced it ("[1, s0]" once dynamic)
    artifact: str
    reused: bool  # the artifact (and its cache) of an earlier graph
    seconds: float


_RECORDS: list[CompileRecord] = []


def compile_records() -> list[CompileRecord]:
    """Every graph the planc backend has compiled in this process, oldest first."""
    return list(_RECORDS)


class Backend:
    """A torch.compile backend bound to a plan: `torch.compile(model, backend=planc.backend(plan=...))`."""

    def __init__(self, plan: str | Path | Plan, *, model: nn.Module | None = None, strict: bool = False,
                 kernels: str | None = None):
        self.plan = plan if isinstance(plan, Plan) else load_plan(plan)
        if kernels is not None and kernels not in KERNELS:
            raise PlanError(f"planc backend option kernels={kernels!r}: choose one of {', '.join(KERNELS)}")
        self.model, self.strict, self.kernels = model, bool(strict), kernels
        self._sessions: weakref.WeakKeyDictionary[nn.Module, _Session] = weakref.WeakKeyDictionary()

    def __call__(self, gm: fx.GraphModule, example_inputs: list, **unused: object):
        started = time.perf_counter()
        graph = from_dynamo(gm, example_inputs, self.model)
        reused = graph.model in self._sessions
        if not reused:
            self._sessions[graph.model] = _Session(graph, self.plan, self.strict, self.kernels)
        session = self._sessions[graph.model]
        record = CompileRecord(len(_RECORDS) + 1, _shape(example_inputs[graph.ids_input], gm, graph.ids_input),
                               str(session.artifact), reused, time.perf_counter() - started)
        _RECORDS.append(record)
        log.info("planc backend: graph %d of %s (ids %s) %s %s in %.2f s", record.index, type(graph.model).__name__,
                 record.inputs, "reuses" if reused else "compiled", record.artifact, record.seconds)
        return session.runner(graph.ids_input)


def backend(plan: str | Path | Plan, *, model: nn.Module | None = None, strict: bool = False,
            kernels: str | None = None) -> Backend:
    """planc as a torch.compile backend object (options as arguments; `model` when Dynamo's graph
    cannot name it, see planc.lift.dynamo)."""
    return Backend(plan, model=model, strict=strict, kernels=kernels)


_BY_OPTIONS: dict[tuple, Backend] = {}


def planc_backend(gm: fx.GraphModule, example_inputs: list, options: dict | None = None, mode: str | None = None):
    """The backend registered as "planc" (entry point torch_dynamo_backends): options from torch.compile."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown or "plan" not in options:
        what = f"unknown option{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}" if unknown else "no plan"
        raise PlancError(f"torch.compile(backend='planc'): {what}; valid options are {', '.join(OPTIONS)} "
                         f"(plan: a plan file or planc.Plan, required; strict: bool; kernels: {'|'.join(KERNELS)})")
    if mode is not None:
        raise PlancError(f"torch.compile(backend='planc', mode={mode!r}): planc takes no mode; its plan says what to do")
    plan = options["plan"] if isinstance(options["plan"], Plan) else load_plan(options["plan"])
    key = (plan.hash(), bool(options.get("strict", False)), options.get("kernels"))
    if key not in _BY_OPTIONS:
        _BY_OPTIONS[key] = Backend(plan, strict=key[1], kernels=key[2])
    return _BY_OPTIONS[key](gm, example_inputs)


def _shape(ids: torch.Tensor, gm: fx.GraphModule, index: int) -> str:
    node = [n for n in gm.graph.nodes if n.op == "placeholder"][index]
    value = node.meta.get("example_value", ids)
    return f"[{', '.join(str(d) for d in value.shape)}]"


class _Session:
    """One model compiled under one plan on this rank: the artifact, its Model and KV cache."""

    def __init__(self, graph: DynamoGraph, plan: Plan, strict: bool, kernels: str | None):
        from planc.driver import compile
        from planc.runtime.comm import Comm
        from planc.runtime.kernel_ops import default_kernels
        from planc.runtime.model import Model

        joined = _join_job(plan)
        self._dir = tempfile.TemporaryDirectory(prefix="planc-backend-")
        self.artifact = _on_own_thread(lambda: compile(graph.model, plan, Path(self._dir.name, "artifact"),
                                                       strict=strict, captured=graph.captured)).path
        comm = joined or Comm.single()
        self.model = Model(self.artifact, comm=comm, kernels=kernels or default_kernels(comm.backend))
        if joined is not None:
            _check_ranks_compiled_alike(self.model.manifest)
        self.ids_BL: torch.Tensor | None = None  # the tokens in the cache
        self.logits_BLV: torch.Tensor | None = None

    def runner(self, ids_input: int):
        def run(*args: object) -> tuple[torch.Tensor]:
            return (self.forward(args[ids_input]),)

        return run

    @torch.no_grad()
    def forward(self, ids_BS: torch.Tensor) -> torch.Tensor:
        B, S = ids_BS.shape
        if not self._extends(ids_BS):
            self.model.allocate(B, max(MIN_CAPACITY, 2 * S))
            self.ids_BL, self.logits_BLV = ids_BS[:, :0], None
        new_BN = ids_BS[:, self.ids_BL.shape[1]:]
        if new_BN.shape[1]:
            logits_BNV = self.model.extend(new_BN)
            self.logits_BLV = logits_BNV if self.logits_BLV is None else torch.cat([self.logits_BLV, logits_BNV], 1)
            self.ids_BL = ids_BS.clone()
        return self.logits_BLV

    def _extends(self, ids_BS: torch.Tensor) -> bool:
        """The cache holds a prefix of these ids, with room for the rest."""
        cached = self.ids_BL
        if cached is None or cached.shape[0] != ids_BS.shape[0] or cached.shape[1] > ids_BS.shape[1]:
            return False
        fits = ids_BS.shape[1] <= self.model.cache.capacity
        return fits and cached.shape[1] > 0 and torch.equal(ids_BS[:, :cached.shape[1]], cached)


def _on_own_thread(fn):
    """fn() on a helper thread under this thread's grad mode; its exception is raised here. The
    backend runs while Dynamo compiles the user's frame, and Dynamo keeps that compile's tracing
    state per thread: the torch.export planc runs for a block it runs as captured would share it,
    and Dynamo would then find the guards it just built failing ("Guard failed on the same frame
    it was created")."""
    grad, out = torch.is_grad_enabled(), {}

    def run() -> None:
        try:
            with torch.set_grad_enabled(grad):
                out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - raised again on the caller's thread
            out["error"] = exc

    thread = threading.Thread(target=run, name="planc-backend-compile")
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def _check_ranks_compiled_alike(manifest: dict) -> None:
    """Every rank compiled the same programs, kernels and weights (report.json is left out: it
    holds the compile's timings); ranks that did not would pair mismatched tensors."""
    files = {path: digest for path, digest in manifest["files"].items() if path != "report.json"}
    mine = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:12]
    every: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if len(set(every)) > 1:
        groups = "; ".join(f"rank {r}: {d}" for r, d in enumerate(every))
        raise PlancError(f"the ranks compiled different artifacts ({groups}); every rank must compile the same "
                         "model (the same weights) under the same plan and options")


def _join_job(plan: Plan):
    """This rank's Comm inside a launched job (joining its process group), None outside one."""
    from planc.runtime.comm import Comm
    from planc.runtime.launch import COLLECTIVE_TIMEOUT_S, JOB_ENV, _init_process_group, resolve_backend

    in_job = dist.is_initialized() or all(k in os.environ for k in JOB_ENV)
    devices = plan.mesh.devices
    if not in_job:
        if devices != 1:
            raise PlanError(f"the plan is for mesh.devices = {devices} ranks, and this process is not one rank of a "
                            f"launched job; run the script with `torchrun --nproc-per-node {devices} SCRIPT`, or "
                            f"compile a plan of one device")
        return None
    if not dist.is_initialized():
        _init_process_group(resolve_backend(plan.mesh.backend), COLLECTIVE_TIMEOUT_S)
    if dist.get_world_size() != devices:
        raise PlanError(f"the plan is for mesh.devices = {devices} ranks, but this job has {dist.get_world_size()}; "
                        f"launch {devices} ranks or change mesh.devices")
    return Comm()

"""The compile pipeline as one linear function of named steps.

plan -> model -> capture -> lift -> bind -> passes -> partition -> codegen -> artifact
"""
from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
import transformers
import triton
from torch import nn

from planc import __version__, progress
from planc.bind import bind, layer_blind, rule_refs
from planc.calibrate import Profiles
from planc.codegen.artifact import KERNEL_FILES, Program, write_artifact
from planc.codegen.emit_program import emit_program
from planc.codegen.partition import model_tensors, partition
from planc.dims import DTYPES
from planc.errors import ModelError, PlanError
from planc.ir import RuleRef, loop_misfit, runs
from planc.lift import Lifted, lift
from planc.lift.captured import captured_lines
from planc.lift.dynamo import DynamoCaptured
from planc.lift.restore import restored
from planc.models.registry import (LANGUAGE_MODEL_OF, dtype_name, language_model, load_model, multimodal_name, quant_method,
                                   source_kind)
from planc.models.tokenizer import NONE, model_tokenizer, tokenizer_files
from planc.passes import STRATEGIES
from planc.passmanager import PassContext, run_passes
from planc.plan import Plan, load_plan, locate
from planc.report.report import (approximation_lines, build_report, cache_specs, candidate_lines, candidates,
                                 collectives_per_step, decline_lines)
from planc.strategy import Drafted


@dataclass
class Draft:
    """The draft compiled for speculative decoding: its program, its report and what the runtime
    needs to speculate (manifest["speculate"]); drafting_candidates: its drafting pass's candidates
    (listed with the target's)."""

    program: Program
    report: dict
    speculate: dict
    drafting_candidates: dict[str, list[dict]]


@dataclass
class Artifact:
    path: Path
    manifest: dict
    report: dict
    program: str


def resolve_model(model: nn.Module | str | None, plan: Plan, meta: bool, *, graph_given: bool = False
                  ) -> tuple[nn.Module, str]:
    """The model and its source; a plan without a model section means model.dtype auto.

    MODEL from the caller (command line, Python API) may be any kind registry.load_model takes; a
    plan's model.source may not name Python code (package.module:factory): a plan is data, and
    planc imports nothing it names."""
    dtype = plan.model.dtype if plan.model else "auto"
    if isinstance(model, nn.Module):
        config = getattr(model, "config", None)
        if isinstance(config, transformers.PretrainedConfig) and multimodal_name(config) is not None:
            if graph_given:  # Dynamo's graph is the whole multimodal forward, towers included
                raise ModelError(f"{type(model).__name__} is multimodal: planc compiles its language model alone, and "
                                 "torch.compile hands the backend the whole model's graph; compile it with `planc "
                                 "compile` or planc.driver.compile(model, plan, out), which take its language model")
            return language_model(_evaluating(model), type(model).__name__), type(model).__name__
        return _evaluating(model), type(model).__name__
    if model is not None:
        source = _absolute(model)
        with progress.bar(f"model {model}"):
            return load_model(source, dtype=dtype, meta=meta), source
    source, where = _plan_source(plan)
    try:
        with progress.bar(f"model {plan.model.source}"):
            return load_model(source, dtype=dtype, meta=meta), source
    except ModelError as exc:
        raise ModelError(f"{where}: {exc}") from None


def _evaluating(model: nn.Module) -> nn.Module:
    """The model in eval mode (dropout off); one already there is left untouched (eval() walks and
    sets every module again)."""
    return model.eval() if any(m.training for m in model.modules()) else model


def _plan_source(plan: Plan) -> tuple[str, str]:
    """The plan's model.source and where it is written; refused when it names Python code."""
    if plan.model is None:
        raise PlanError("no model: pass MODEL on the command line or set model.source in the plan")
    source, where = plan.model.source, f"{locate(plan, ('model', 'source')) or 'plan'}: model.source"
    if source_kind(source) == "factory":
        raise PlanError(f"{where}: {source!r} names Python code (package.module:factory), and planc imports "
                        "nothing a plan names; pass it yourself as MODEL: `planc compile MODEL PLAN -o OUT`, "
                        "`planc validate PLAN --model MODEL`, or compile(model=...) in Python")
    return _absolute(source), where


def _absolute(source: str) -> str:
    """A local path made absolute, so that `planc verify` finds it from anywhere."""
    return str(Path(source).resolve()) if source_kind(source) in ("checkpoint", "config") else source


def parallelize(lifted: fx.Graph | Lifted, plan: Plan, model: nn.Module | None = None, *, strict: bool = False,
                meta: bool = False) -> tuple[fx.Graph, PassContext]:
    """Bind the plan's rules to the lifted graph and run every strategy's pass, in STRATEGIES order.

    A folded lift (runs of identical layers built once) stays folded when the plan's rules bind
    every layer of a run alike; otherwise the lift's unfolded graph is used."""
    graph = lifted.graph if isinstance(lifted, Lifted) else lifted
    if isinstance(lifted, Lifted) and lifted.unfolded is not None and runs(graph) and not layer_blind(graph, plan):
        graph = lifted.unfolded()
    ctx = PassContext(plan.mesh.devices, strict, Profiles(model, meta))
    done = run_passes(bind(graph, plan), STRATEGIES, rule_refs(plan), ctx)
    if isinstance(lifted, Lifted) and runs(done) and loop_misfit(done) is not None:  # no loop can run a body: unfold
        return parallelize(lifted.unfolded(), plan, model, strict=strict, meta=meta)
    ctx.unfold(done)
    return done, ctx


def passes_that_ran(ctx: PassContext) -> str:
    """The passes that rewrote or declined something, in pass order (not every pass planc has)."""
    ran = {r.pass_name for r in ctx.records}
    return " -> ".join(name for name in dict.fromkeys(s.name for s in STRATEGIES) if name in ran) or "none"


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: a compile allocates many long-lived objects (module
    trees, FX nodes and their metadata), and each full collection they trigger walks the whole heap
    of a process that imported torch (about 0.3 s on a CPU machine). Cycles made meanwhile are
    collected after, on the interpreter's usual schedule."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@gc_paused()
def compile(model: nn.Module | str | None, plan: Plan | str | Path, out: str | Path, *,
            meta: bool = False, strict: bool = False, log=None, captured: DynamoCaptured | None = None) -> Artifact:
    """`captured`: the model's graph from another front end (the torch.compile backend's Dynamo
    graph); without it the lift captures the model with torch.export. On meta, runs of identical
    layers are compiled folded (parallelize), the program looping over them."""
    log = log or (lambda msg: None)
    started = time.perf_counter()
    plan = plan if isinstance(plan, Plan) else load_plan(plan)
    caller_model = isinstance(model, nn.Module)
    model, source = resolve_model(model, plan, meta, graph_given=captured is not None)
    log(f"model    {source} ({type(model).__name__}{', meta' if meta else ''})")
    multimodal = getattr(model, LANGUAGE_MODEL_OF, None)
    if multimodal is not None:
        log(f"note     {multimodal} is multimodal: planc compiles its language model ({type(model).__name__}), "
            "text in and text out; its vision or audio tower and projector are left out")
    method = quant_method(getattr(getattr(model, "config", None), "quantization_config", None))
    if method is not None:  # only a config.json gets here quantized (a quantized checkpoint is refused when loaded)
        log(f"note     quantization_config (quant_method {method!r}) not applied: planc compiles the unquantized "
            f"model, in {dtype_name(model)}; weight bytes are for that")
    # what the lift attaches to a model the caller passed is taken off again once its weights are partitioned
    with restored(model) if caller_model else nullcontext():
        # on meta nothing tells identical layers apart (no weights, no calibration): fold their runs
        lifted = lift(model, check=not meta, captured=captured, fold=meta)
        log(f"lift     {len(lifted.blocks)} blocks" + (f", {sum(c.method == 'numeric' for c in lifted.checks)} checked numerically against the captured graph, "
                                                 f"{sum(c.method != 'numeric' for c in lifted.checks)} structurally" if lifted.checks else ""))
        for line in captured_lines(lifted.blocks):
            log(f"captured {line}")
        graph, ctx = parallelize(lifted, plan, model, strict=strict, meta=meta)
        log(f"passes   {passes_that_ran(ctx)}: {sum(r.action == 'applied' for r in ctx.records)} rewrites, "
            f"{sum(r.action == 'declined' for r in ctx.records)} declined")
        for line in decline_lines([(r.pass_name, r.target, f" (rules[{r.rule}])", r.detail)
                                   for r in ctx.records if r.action == "declined"]):
            log(line)
        for line in ctx.advice:
            log(f"note     {line}")
        ranks = partition(graph, model_tensors(model, graph), plan.mesh.devices)
    manifest = _manifest(model, source, plan, meta)
    report = build_report(graph, ctx, ranks, elem=DTYPES[manifest["dtype"]].itemsize, checks=lifted.checks, meta=meta)
    for line in candidate_lines(report["candidates"]):
        log(line)
    for line in approximation_lines(report["approximate"]):
        log(line)
    program = emit_program(graph, model=source, world_size=plan.mesh.devices, plan_hash=plan.hash())
    programs = {"target": Program(program, cache_specs(graph), None if meta else ranks)}
    if plan.draft is not None:
        draft = compile_draft(plan, model, meta=meta, strict=strict, log=log)
        programs["draft"], report["draft"], manifest["speculate"] = draft.program, draft.report, draft.speculate
        report["candidates"].update(draft.drafting_candidates)
    report["compile_seconds"] = time.perf_counter() - started
    path = write_artifact(Path(out), manifest=manifest, programs=programs, report=report,
                          tokenizer=tokenizer_files(source))
    return Artifact(path, manifest, report, program)


def compile_draft(plan: Plan, target: nn.Module, *, meta: bool = False, strict: bool = False, check: bool = True,
                  log=None) -> Draft:
    """The plan's draft section through the same pipeline (its own rules, the same mesh), then the
    drafting pass the section names (passes.DRAFTINGS), whose further graphs become further entry
    points of the draft's program (check: the lift's numeric checks, as compile runs them)."""
    log = log or (lambda msg: None)
    sub = plan.draft_plan()
    model, source = resolve_model(None, sub, meta)
    _check_vocabulary(plan, model, target)
    log(f"draft    {source} ({type(model).__name__})")
    graph, ctx = parallelize(lift(model, check=check and not meta).graph, sub, model, strict=strict, meta=meta)
    elem = DTYPES[dtype_name(model)].itemsize
    drafted = [_drafting(drafting, section, graph, plan, ctx) for drafting, section in plan.draft.draftings()]
    graph = drafted[-1][1].forward if drafted else graph
    ranks = partition(graph, model_tensors(model, graph), plan.mesh.devices)
    report = build_report(graph, ctx, ranks, elem=elem, checks=[], meta=meta)
    for line in decline_lines([(r.pass_name, f"draft {r.target}", "", r.detail)
                               for r in ctx.records if r.action == "declined"]):
        log(line)
    more, speculate, listed = {}, _speculate(plan, source, graph), {}
    for name, done in drafted:
        more.update(done.more)
        speculate.update(done.speculate)
        report.update(done.report)
        listed[name] = report["candidates"][name] = done.candidates
        for line in [*done.log, *candidate_lines({name: done.candidates})]:
            log(line)
    # what each further entry point moves per step, as the report counts `forward`'s
    report["entry_points"] = {entry: {"doc": doc, "collectives_per_step": collectives_per_step(g, elem, plan.mesh.devices)}
                              for entry, (g, doc) in more.items()}
    text = emit_program(graph, model=source, world_size=plan.mesh.devices, plan_hash=plan.hash(), more=more)
    program = Program(text, cache_specs(graph), None if meta else ranks, dtype=dtype_name(model))
    return Draft(program, report, speculate, listed)


def _drafting(drafting, section, graph: fx.Graph, plan: Plan, ctx: PassContext) -> tuple[str, Drafted]:
    """A drafting pass over the draft's graph, recorded like the rule passes (records and graphs in
    the draft's report; its declines point at its plan key)."""
    ctx.current = drafting.name
    where = locate(plan, ("draft", drafting.name)) or "plan"
    ctx.rule = RuleRef(-1, f"draft.{drafting.name}", where, section=drafting.name)
    done = drafting.rewrite(graph, section, ctx)
    for name, g in done.graphs:
        g.lint()
        ctx.graphs.append((name, g))
    return drafting.name, done


def _check_vocabulary(plan: Plan, draft: nn.Module, target: nn.Module) -> None:
    if draft.config.vocab_size != target.config.vocab_size:
        raise PlanError(f"{locate(plan, ('draft', 'model', 'source')) or 'plan'}: draft.model.source: the draft's "
                        f"vocabulary has {draft.config.vocab_size} tokens and the target's {target.config.vocab_size}; "
                        "speculative decoding needs the same tokenizer: choose a draft trained on the target's")


def _speculate(plan: Plan, source: str, graph: fx.Graph) -> dict:
    """What the runtime reads of every draft: gamma, the draft, the attention depth of its exact
    forward (a drafting pass adds what drafting its way needs)."""
    return {"tokens": plan.draft.speculate.tokens, "draft": source, "sequential_depth": len(cache_specs(graph))}


def _manifest(model: nn.Module, source: str, plan: Plan, meta: bool) -> dict:
    """What was compiled. "dtype" is the weights' dtype as loaded (model.dtype auto resolved);
    model.tokenizer: bytes | checkpoint | none (planc.models.tokenizer)."""
    config = model.config
    tokenizer = model_tokenizer(source, config)
    return {
        "planc_version": __version__,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "triton": triton.__version__},
        "plan_hash": plan.hash(),
        "plan": plan.to_yaml_dict(),
        "plan_file": {"name": Path(plan._source).name if plan._source else None, "text": plan._text,
                      "resolved": plan.model_dump(mode="json", exclude_none=True)},  # every default filled in
        "model": {"source": source, "class": type(model).__name__, "vocab_size": config.vocab_size,
                  "hidden_size": getattr(config, "hidden_size", None),
                  "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id,
                  "tokenizer": tokenizer.kind if tokenizer else NONE},
        "dtype": dtype_name(model),
        "world_size": plan.mesh.devices,
        "backend": plan.mesh.backend,
        "meta": meta,
        "kernels": list(KERNEL_FILES),
    }


def validation(plan_path: str | Path, model: str | None = None, *, meta: bool = False, strict: bool = False) -> dict:
    """Schema check, and with a model: bind and run the passes exactly as compile does (no
    partition, nothing written). What `planc validate --json` prints."""
    plan = load_plan(plan_path)
    found = {"plan": str(plan_path), "valid": True, "rules": len(plan.rules), "devices": plan.mesh.devices,
             "model": None}
    if model is None and plan.model is None:
        return found
    module, source = resolve_model(model, plan, meta)
    graph, ctx = parallelize(lift(module, check=False, fold=meta), plan, module, strict=strict, meta=meta)
    declines = [{"pass": r.pass_name, "target": r.target, "rule": r.rule, "detail": r.detail}
                for r in ctx.records if r.action == "declined"]
    listed = candidates(graph, ctx)
    if plan.draft is not None:  # the draft through its pipeline too (it is small): its declines, its placement
        draft = compile_draft(plan, module, meta=meta, strict=strict, check=False)
        declines += [{"pass": r["pass_name"], "target": f"draft {r['target']}", "rule": None, "detail": r["detail"]}
                     for r in draft.report["declines"]]
        listed.update(draft.drafting_candidates)
    return {**found, "model": source, "applied": sum(r.action == "applied" for r in ctx.records),
            "declines": declines, "candidates": listed}


def _rule_label(rule: int | None) -> str:
    return "" if rule is None else f" (rules[{rule}])"  # a draft's declines name the draft instead


def validate(plan_path: str | Path, model: str | None = None, *, meta: bool = False, strict: bool = False) -> str:
    """validation() as the lines `planc validate` prints."""
    v = validation(plan_path, model, meta=meta, strict=strict)
    if v["model"] is None:
        return f"{plan_path}: valid plan ({v['rules']} rules, {v['devices']} devices); no model to check against"
    declines = decline_lines([(d["pass"], d["target"], _rule_label(d["rule"]), d["detail"]) for d in v["declines"]])
    found = "".join(f"\n  {line}" for line in candidate_lines(v["candidates"]))
    return (f"{plan_path}: valid for {v['model']} ({v['rules']} rules, {v['applied']} blocks rewritten, "
            f"{len(v['declines'])} declined, {v['devices']} devices)" + "".join(f"\n  {line}" for line in declines) + found)

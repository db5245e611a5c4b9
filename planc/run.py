"""`planc run`: launch an artifact on its ranks, generate, and collect rank 0's figures."""
from __future__ import annotations

import os
from pathlib import Path

from planc.errors import RunError
from planc.models.tokenizer import Tokenizer, artifact_tokenizer
from planc.runtime.artifact import open_artifact
from planc.runtime.decode import batches, choose_strategy
from planc.runtime.launch import COLLECTIVE_TIMEOUT_S, check_limits, launch, resolve_backend
from planc.runtime.kernel_ops import default_kernels
from planc.verify import DEFAULT_PROMPTS, WORKER, default_prompt_ids, ranks_per_machine


def per_step(stats: dict, steps: int) -> dict:
    return {op: {"calls": c["calls"] / max(steps, 1), "bytes": c["bytes"] / max(steps, 1)} for op, c in stats.items()}


def _prompt_ids(artifact: Path, manifest: dict, tokenizer: Tokenizer | None, prompts: list[str] | None) -> list[list[int]]:
    if prompts and tokenizer is None:
        raise RunError(f"{artifact}: compiled from {manifest['model']['source']}, which has no tokenizer (no "
                       f"tokenizer.json / tokenizer_config.json in the checkpoint, and not planc's byte-level "
                       f"vocabulary), so --prompt text cannot be encoded; save the model's tokenizer into the "
                       f"checkpoint directory (tokenizer.save_pretrained(DIR)) and recompile")
    return [tokenizer.encode(p) for p in prompts] if prompts else default_prompt_ids(manifest, tokenizer)


def run(artifact: Path, *, nproc: int | None = None, prompts: list[str] | None = None, max_new_tokens: int = 64,
        sampling: dict | None = None, kernels: str | None = None, timeout_s: float = 900,
        collective_timeout_s: float = COLLECTIVE_TIMEOUT_S, rdzv: dict | None = None, speculate: bool = True,
        trace: Path | None = None, batch_size: int | None = None) -> dict:
    """Generate on the artifact's ranks; speculatively when it holds a draft (unless speculate is
    False: vanilla decoding of its target). trace: rank 0 writes every rank's spans of the decode
    steps there as a Chrome trace (`planc run --trace`, planc.runtime.trace). batch_size: decode the
    prompts that many at a time, one batch after another in the same launch (None: all at once);
    the figures are summed over the batches."""
    if nproc is not None and nproc < 1:
        raise RunError(f"--nproc {nproc}: the number of ranks on this machine must be at least 1 (leave it out "
                       f"for the plan's mesh.devices)")
    if batch_size is not None and batch_size < 1:
        raise RunError(f"--batch-size {batch_size}: the prompts decoded together must be at least 1 (leave it out "
                       f"to decode all prompts as one batch)")
    check_limits(nproc or 1, timeout_s, collective_timeout_s)
    if trace is not None:
        _check_writable(Path(trace))
    opened = open_artifact(artifact)
    manifest = opened.manifest
    if manifest.get("meta"):
        raise RunError(f"{artifact}: compiled with --meta (a weightless dry run); recompile without --meta to run it")
    world = manifest["world_size"]
    nproc = ranks_per_machine(artifact, world, nproc, rdzv)
    kernels = kernels or default_kernels(resolve_backend(manifest["backend"]))
    choose_strategy(**(sampling or {}))  # a bad temperature or top_k fails here, not on every rank
    tokenizer = artifact_tokenizer(manifest, opened.tokenizer_dir())
    ids = _prompt_ids(artifact, manifest, tokenizer, prompts)
    args = {"artifact": str(Path(artifact).resolve()), "prompts": ids, "batch_size": batch_size,
            "max_new_tokens": max_new_tokens, "sampling": sampling or {}, "kernels": kernels, "speculate": speculate,
            "trace": str(Path(trace).resolve()) if trace is not None else None}
    results = launch(WORKER, args, nproc, timeout_s=timeout_s, collective_timeout_s=collective_timeout_s, rdzv=rdzv,
                     backend=manifest["backend"])
    r0 = results[0]
    new_tokens = sum(len(t) for t in r0["tokens"])
    decoded = new_tokens - len(r0["tokens"])  # the first token of each row comes from its batch's prefill
    return {
        "world_size": world, "kernels": kernels,
        "batch_size": min(batch_size or len(ids), len(ids)), "batches": len(batches(ids, batch_size)),
        "prompts": (prompts or list(DEFAULT_PROMPTS)) if tokenizer else ids,
        "texts": [tokenizer.decode(t) for t in r0["tokens"]] if tokenizer else None,
        "tokens": r0["tokens"],
        "ranks_agree": all(r is None or r["tokens"] == r0["tokens"] for r in results),
        "new_tokens": new_tokens, "decode_tokens": decoded,
        "prefill_s": r0["prefill_s"], "decode_s": r0["decode_s"], "decode_steps": r0["decode_steps"],
        "decode_tokens_per_s": decoded / r0["decode_s"] if r0["decode_s"] else 0.0,
        "collectives_per_decode_step": per_step(r0["comm"].get("decode", {}), r0["decode_steps"]),
        "collectives_prefill": r0["comm"].get("prefill", {}),
        "ranks": [_rank_figures(r) for r in results if r is not None],
        "speculation": _speculation(manifest, results) if r0["speculation"] else None,
        "trace": r0["trace"],
    }


def _check_writable(trace: Path) -> None:
    """Before any rank starts: rank 0 can write the trace file (a new file beside it, then a rename)."""
    folder = trace.resolve().parent
    if trace.is_dir():
        raise RunError(f"--trace {trace}: a directory; name the trace file (e.g. {trace / 'trace.json'})")
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise RunError(f"--trace {trace}: {folder} is not a directory this process can write in; "
                       f"pass --trace FILE in one")


def _rank_figures(r: dict) -> dict:
    decode = r["comm"].get("decode", {})
    return {"rank": r["rank"], "prefill_s": r["prefill_s"], "decode_s": r["decode_s"],
            "decode_collective_calls": sum(c["calls"] for c in decode.values()),
            "decode_logical_bytes": sum(c["bytes"] for c in decode.values())}


def _speculation(manifest: dict, results: list[dict]) -> dict:
    """Rank 0's acceptance figures, each rank's draft work, rank 0's collectives per round by phase."""
    r0, spec = results[0], manifest["speculate"]
    rounds = r0["speculation"]["rounds"]
    return {**r0["speculation"], "draft": spec["draft"], "drafting": _drafting(spec),
            "draft_work_per_rank": [{"rank": r["rank"], **r["draft_work"]} for r in results],
            "collectives_per_round": {phase: per_step(r0["comm"].get(phase, {}), rounds)
                                      for phase in ("verify", "draft", "calibrate") if phase in r0["comm"]}}


def format_run(result: dict) -> str:
    lines = []
    for prompt, text in zip(result["prompts"], result["texts"] or result["tokens"]):
        lines += [f"--- prompt: {prompt!r}", f"{prompt}{text}" if isinstance(text, str) else str(text)]
    lines.append(f"--- {result['world_size']} ranks, kernels={result['kernels']}: prefill {result['prefill_s'] * 1e3:.1f} ms, "
                 f"{result['decode_steps']} decode steps at {result['decode_tokens_per_s']:.1f} tokens/s ({_batching(result)})")
    for op, c in sorted(result["collectives_per_decode_step"].items()):
        lines.append(f"    per decode step: {op:<18} {c['calls']:.0f} calls  {c['bytes']:.0f} logical bytes (rank 0)")
    for r in result.get("ranks", []):
        lines.append(f"    rank {r['rank']}: prefill {r['prefill_s'] * 1e3:.1f} ms, decode {r['decode_s'] * 1e3:.1f} ms, "
                     f"{r['decode_collective_calls']} collectives moving {r['decode_logical_bytes']} logical bytes "
                     f"over the decode steps")
    if result.get("speculation"):
        lines += format_speculation(result["speculation"])
    if result.get("trace"):
        t = result["trace"]
        lines.append(f"--- trace: {t['file']}: {t['events']} spans of {t['decode_steps']} decode steps on "
                     f"{result['world_size']} ranks (Chrome trace JSON: open it in https://ui.perfetto.dev)")
    return "\n".join(lines)


def _batching(result: dict) -> str:
    if result["batches"] == 1:
        return f"batch {result['batch_size']}"
    return f"batch {result['batch_size']}: {len(result['tokens'])} prompts in {result['batches']} batches, one after another"


def _drafting(speculate: dict) -> str:
    """How the artifact drafts, in the words of the drafting that compiled it (passes.DRAFTINGS)."""
    from planc.passes import DRAFTINGS

    return next((how for d in DRAFTINGS if (how := d.describe(speculate))), "layer by layer")


def format_speculation(s: dict) -> list[str]:
    lines = [f"--- speculative: draft {s['draft']}, {s['tokens']} tokens per round, {s['drafting']}",
             f"    {s['rounds']} rounds: drafted {s['drafted']}, accepted {s['accepted']}, acceptance rate "
             f"{s['acceptance_rate']:.3f}, mean accepted length {s['mean_accepted_length']:.2f} tokens per verification",
             f"    draft sequential depth {s['draft_sequential_depth']:.2f} attention steps per drafted token "
             f"(layer by layer: {s['sequential_depth']})"]
    for w in s["draft_work_per_rank"]:
        lines.append(f"    rank {w['rank']} draft work: {w.get('forwards', 0)} exact forwards, "
                     f"{w.get('layer_parallel_forwards', 0)} layer-parallel, {w.get('grouped_attention', 0)} grouped "
                     f"attentions run here, {w['draft_s'] * 1e3:.1f} ms drafting")
    for phase, ops in s["collectives_per_round"].items():
        for op, c in sorted(ops.items()):
            lines.append(f"    per round, {phase:<9}: {op:<18} {c['calls']:.1f} calls  {c['bytes']:.0f} logical bytes (rank 0)")
    return lines

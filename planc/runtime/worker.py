"""The per-rank entry point that `planc run`, `planc verify` and the benchmarks launch."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.distributed as dist

from planc.errors import RunError
from planc.runtime.comm import Comm
from planc.runtime.decode import Generation, batches, choose_strategy, concat, generate
from planc.runtime.launch import write_result
from planc.runtime.model import Model
from planc.runtime.speculative import Speculation, combined, speculative_generate
from planc.runtime.trace import Tracer

AGREED = ("compiled program (manifest sha256)", "request (prompts, batch_size, max_new_tokens, sampling, kernels)")


def main(args: dict) -> None:
    comm = Comm() if dist.is_initialized() else Comm.single()
    result = run_rank(args, comm)
    if dist.is_initialized():
        write_result(result)


def run_rank(args: dict, comm: Comm) -> dict:
    """Generate with the artifact's target; speculatively with its draft when it has one, unless
    args["speculate"] is False (vanilla decoding of the same target). args["batch_size"]: decode the
    prompts that many at a time, one batch after another (None: all at once). args["trace"]: a file
    to write the target's traced decode steps to, from rank 0 (planc.runtime.trace)."""
    kernels = args.get("kernels", "torch")
    tracer = Tracer(comm) if args.get("trace") else None
    model = Model(args["artifact"], comm=comm, kernels=kernels, tracer=tracer)
    check_ranks_agree(comm, model, args)
    config = model.manifest["model"]
    speculate = model.manifest.get("speculate") if args.get("speculate", True) else None
    draft = Model(args["artifact"], "draft", comm=comm, kernels=kernels) if speculate else None
    spec = Speculation.from_manifest(speculate) if speculate else None
    options = {"eos_id": config["eos_token_id"] if args.get("stop_at_eos", True) else None,
               "pad_id": config["pad_token_id"] or 0, "keep_logits": args.get("keep_logits", False)}
    out = _generate(model, draft, spec, args, options)
    traced = tracer.finish(Path(args["trace"]), {"kernels": kernels}) if tracer is not None else None
    return {
        "rank": comm.rank,
        "tokens": out.tokens,
        "logits": [l.tolist() for l in out.step_logits],
        "prefill_s": out.prefill_s,
        "decode_s": out.decode_s,
        "decode_steps": out.decode_steps,
        "speculation": out.speculation,
        "draft_work": None if draft is None else {**draft.work, "draft_s": out.speculation["draft_s"]},
        "comm": comm.stats(),
        "trace": traced,
    }


def _generate(model: Model, draft: Model | None, spec: Speculation | None, args: dict, options: dict) -> Generation:
    """args["prompts"] args["batch_size"] at a time, each batch prefilled and decoded as if alone (its
    own caches and a fresh seeded sampling stream), as one Generation with every batch's figures summed."""
    parts = []
    for prompts in batches(args["prompts"], args.get("batch_size")):
        strategy = choose_strategy(**args.get("sampling", {}))
        if draft is None:
            parts.append(generate(model, prompts, args["max_new_tokens"], strategy, **options))
        else:
            parts.append(speculative_generate(model, draft, prompts, args["max_new_tokens"], strategy, spec, **options))
    out = concat(parts)
    if spec is not None:
        out.speculation = combined([p.speculation for p in parts])
    return out


def check_ranks_agree(comm: Comm, model: Model, args: dict) -> None:
    """Before the first step, every rank compares what it loaded and was asked to do with every other
    rank; ranks that differ (another artifact on one machine, other options) would pair mismatched
    tensors in their collectives, a hang or garbage, so every rank raises instead. Paths (the
    artifact, the trace file) are left out: machines may keep the same artifact at different paths."""
    if comm.world_size == 1:
        return
    request = json.dumps({**{k: v for k, v in args.items() if k not in ("artifact", "trace")},
                          "trace": bool(args.get("trace"))}, sort_keys=True).encode()
    mine_D = torch.frombuffer(bytearray(model.fingerprint() + hashlib.sha256(request).digest()), dtype=torch.uint8)
    with comm.phase("load"):
        every_RD = comm.all_gather(mine_D[None].to(comm.device)).cpu()
    for what, part_RD in zip(AGREED, every_RD.split(32, dim=1)):
        ranks_by_digest: dict[str, list[int]] = {}
        for rank, digest in enumerate(part_RD.tolist()):
            ranks_by_digest.setdefault(bytes(digest).hex()[:12], []).append(rank)
        if len(ranks_by_digest) > 1:
            groups = "; ".join(f"rank{'s' * (len(r) > 1)} {', '.join(map(str, r))}: {h}"
                               for h, r in ranks_by_digest.items())
            raise RunError(f"the ranks disagree on the {what}: {groups}. Rank {comm.rank} loaded {args['artifact']}; "
                           f"give every machine the same compiled artifact and the same `planc run` options")

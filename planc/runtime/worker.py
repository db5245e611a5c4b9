"""The per-rank entry point that `planc run`, `planc verify` and the benchmarks launch."""
from __future__ import annotations

import torch.distributed as dist

from planc.runtime.comm import Comm
from planc.runtime.engine import Rank, Sampling, generate
from planc.runtime.launch import write_result


def main(args: dict) -> None:
    comm = Comm() if dist.is_initialized() else Comm.single()
    result = run_rank(args, comm)
    if dist.is_initialized():
        write_result(result)


def run_rank(args: dict, comm: Comm) -> dict:
    rank = Rank(args["artifact"], comm, args.get("kernels", "torch"))
    model = rank.manifest["model"]
    out = generate(rank, args["prompts"], args["max_new_tokens"], Sampling(**args.get("sampling", {})),
                   eos_id=model["eos_token_id"] if args.get("stop_at_eos", True) else None,
                   pad_id=model["pad_token_id"] or 0, keep_logits=args.get("keep_logits", False))
    return {
        "rank": comm.rank,
        "tokens": out.tokens,
        "logits": [l.tolist() for l in out.step_logits],
        "prefill_s": out.prefill_s,
        "decode_s": out.decode_s,
        "decode_steps": out.decode_steps,
        "comm": comm.stats(),
    }

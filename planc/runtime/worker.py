"""The per-rank entry point that `planc run`, `planc verify` and the benchmarks launch."""
from __future__ import annotations

import torch.distributed as dist

from planc.runtime.comm import Comm
from planc.runtime.decode import choose_strategy, generate
from planc.runtime.launch import write_result
from planc.runtime.model import Model


def main(args: dict) -> None:
    comm = Comm() if dist.is_initialized() else Comm.single()
    result = run_rank(args, comm)
    if dist.is_initialized():
        write_result(result)


def run_rank(args: dict, comm: Comm) -> dict:
    model = Model(args["artifact"], comm=comm, kernels=args.get("kernels", "torch"))
    config = model.manifest["model"]
    out = generate(model, args["prompts"], args["max_new_tokens"], choose_strategy(**args.get("sampling", {})),
                   eos_id=config["eos_token_id"] if args.get("stop_at_eos", True) else None,
                   pad_id=config["pad_token_id"] or 0, keep_logits=args.get("keep_logits", False))
    return {
        "rank": comm.rank,
        "tokens": out.tokens,
        "logits": [l.tolist() for l in out.step_logits],
        "prefill_s": out.prefill_s,
        "decode_s": out.decode_s,
        "decode_steps": out.decode_steps,
        "comm": comm.stats(),
    }
